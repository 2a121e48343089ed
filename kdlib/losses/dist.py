"""DIST: distillation by correlation of predictions (``dist``).

Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022,
arXiv:2205.10536. Instead of matching probabilities exactly (KL), the student matches the teacher's
*relations*: per image across classes (inter-class) and per class across the batch (intra-class),
each by Pearson correlation, so a stronger teacher's sharper scale is not imposed:

.. math::

    L = w_{ce}\\,\\mathrm{CE}_\\epsilon(z_s, y) + w_{kd}\\,\\tau^2\\Big[\\beta\\Big(1 - \\frac{1}{B}\\sum_i
        \\rho(Y^s_{i,:}, Y^t_{i,:})\\Big) + \\gamma\\Big(1 - \\frac{1}{C}\\sum_c \\rho(Y^s_{:,c}, Y^t_{:,c})\\Big)\\Big]

with :math:`Y = \\mathrm{softmax}(z/\\tau)` row-wise, and
:math:`\\rho(a, b) = \\frac{(a-\\bar a)\\cdot(b-\\bar b)}{\\lVert a-\\bar a\\rVert\\,\\lVert b-\\bar b\\rVert + 10^{-8}}`.

Knobs (the authors' ImageNet recipe, ``configs/strategies/distill/resnet_dist.yaml`` of
hunto/image_classification_sota): ``tau`` 1, ``beta`` 1, ``gamma`` 1, ``kd_weight`` 2, ``ce_weight``
1 (their CIFAR-100 recipe: ``tau`` 4); context: ``label_smoothing`` ε of the CE term. Terms logged:
``ce`` (unweighted), ``inter`` and ``intra`` (each τ²·(1 − mean ρ), unweighted).

Tested against the authors' ``DIST`` module (``lib/models/losses/dist_kd.py``). The intra-class term
correlates each class over the batch, so it needs more than one image per batch (a batch of one has
nothing to correlate: ρ = 0); under several processes it is computed per process on its shard, as in the
authors' multi-GPU training. Soft (MixUp/CutMix) targets only enter the CE term.
"""
from __future__ import annotations

from torch import Tensor

from kdlib.losses._common import check_nonnegative, check_positive, check_smoothing, require_teacher
from kdlib.losses.base import Method
from kdlib.losses.ce import ce_loss
from kdlib.losses.registry import MULTICLASS, LossOutput, StudentOutput, TeacherOutput, register_method

EPS = 1e-8  # the authors' eps in the correlation's denominator


def pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """``(N,)``: the Pearson correlation of each row of ``a`` with the same row of ``b``."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)


def dist_terms(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """``(inter, intra)``: τ²·(1 − mean correlation) over images (rows) and over classes (columns) of the
    tempered softmax outputs; no gradient flows into ``teacher_logits``."""
    ys = (student_logits.float() / tau).softmax(dim=1)
    yt = (teacher_logits.detach().float() / tau).softmax(dim=1)
    inter = 1.0 - pearson_rows(ys, yt).mean()
    intra = 1.0 - pearson_rows(ys.t(), yt.t()).mean()
    return inter * tau**2, intra * tau**2


@register_method("dist")
class DISTLoss(Method):
    """``w_ce·CE_ε + w_kd·(β·inter + γ·intra)`` (see the module docstring)."""

    needs_teacher = True
    needs_features = False
    uses_distillation_token = False
    tasks = (MULTICLASS,)
    soft_targets = "mixed"  # the relation terms use no labels
    uses_progress = False
    uses_positions = False
    uses_layers = False

    def __init__(self, tau: float = 1.0, beta: float = 1.0, gamma: float = 1.0, kd_weight: float = 2.0,
                 ce_weight: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        self.tau = check_positive("tau", tau)
        self.beta = check_nonnegative("beta", beta)
        self.gamma = check_nonnegative("gamma", gamma)
        self.kd_weight = check_nonnegative("kd_weight", kd_weight)
        self.ce_weight = check_nonnegative("ce_weight", ce_weight)
        self.label_smoothing = check_smoothing(label_smoothing)

    def forward(self, student: StudentOutput, targets: Tensor, teacher: TeacherOutput | None = None) -> LossOutput:
        teacher = require_teacher("dist", teacher)
        hard = ce_loss(student.logits, targets, self.label_smoothing)
        inter, intra = dist_terms(student.logits, teacher.logits, self.tau)
        total = self.ce_weight * hard + self.kd_weight * (self.beta * inter + self.gamma * intra)
        return LossOutput(total, {"ce": hard.detach(), "inter": inter.detach(), "intra": intra.detach()})
