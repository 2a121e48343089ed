"""DeiT token distillation, soft variant (``deit_soft``).

Touvron, Cord, Douze, Massa, Sablayrolles, Jégou, "Training data-efficient image transformers &
distillation through attention", ICML 2021, arXiv:2012.12877 (the DeiT+ConvNeXt FGVC project is a
fork of its code).

The student is a *distilled* transformer with two heads: the class token's head gives
:math:`z_{cls}` (``StudentOutput.logits``) and the distillation token's head :math:`z_{dist}`
(``StudentOutput.dist_logits``; timm's ``*_distilled_*`` models return both in train mode).

.. math::

    L = (1-\\alpha)\\,\\mathrm{CE}_{\\epsilon}(z_{cls}, y)
        + \\alpha\\,\\tau^2\\,\\mathrm{KL}\\big(\\mathrm{softmax}(z_t/\\tau)\\,\\|\\,\\mathrm{softmax}(z_{dist}/\\tau)\\big)

The class head gets gradient only from the labels, the distillation head only from the teacher.
At evaluation DeiT averages the two heads' logits (the model's job, not the loss's).

**KL convention.** The KL term is the same as ``kd``'s: summed over classes, averaged over the
batch (``batchmean``), times τ². DeiT's code sums the KL and divides by ``B·C`` (numel), so its
soft term is ours divided by the number of classes C. To reproduce DeiT's loss with weight
:math:`\\alpha_D`, use

.. math::

    \\alpha = \\frac{\\alpha_D}{\\alpha_D + C\\,(1-\\alpha_D)}

which gives exactly DeiT's loss times :math:`C / (\\alpha_D + C(1-\\alpha_D))` (e.g. α_D = 0.5,
C = 200 → α ≈ 0.004975 and a scale of ≈ 1.99; irrelevant under AdamW apart from ε, else
divide the learning rate by it).

Knobs: ``alpha`` α (default 0.5, DeiT's ``--distillation-alpha``, in [0, 1]) and ``temperature``
τ (default 1, DeiT's ``--distillation-tau``, finite > 0); context: ``label_smoothing`` ε of the
class-head CE (DeiT: 0.1 without MixUp; with MixUp/CutMix DeiT uses soft-target CE, which is
this term with ε = 0 on the mixed targets). Terms logged: ``ce`` (class head) and ``dist``
(τ²·KL of the distillation head).
"""
from __future__ import annotations

from torch import Tensor, nn

from kdlib.losses._common import check_positive, check_smoothing, check_unit_interval, require_teacher
from kdlib.losses.ce import ce_loss
from kdlib.losses.kd import soft_kl
from kdlib.losses.base import Method
from kdlib.losses.registry import MULTICLASS, LossOutput, StudentOutput, TeacherOutput, register_method


def require_dist_logits(method: str, student: StudentOutput) -> Tensor:
    if student.dist_logits is None:
        raise ValueError(
            f"the {method!r} method needs StudentOutput.dist_logits, the distillation token's head "
            "(a distilled student, e.g. timm's deit_*_distilled_*), got None"
        )
    return student.dist_logits


def deit_soft_loss(
    cls_logits: Tensor,
    dist_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    alpha: float = 0.5,
    temperature: float = 1.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``(1-α)·CE_ε(z_cls, y) + α·τ²·KL(softmax(z_t/τ) ‖ softmax(z_dist/τ))`` (batchmean KL).

    ``cls_logits`` and ``dist_logits`` are the two ``(B, C)`` heads; no gradient reaches the
    teacher, the class head only sees the labels and the distillation head only the teacher.
    """
    check_positive("temperature", temperature)
    check_unit_interval("alpha", alpha)
    hard = ce_loss(cls_logits, targets, label_smoothing)
    soft = soft_kl(dist_logits, teacher_logits, temperature)
    return (1.0 - alpha) * hard + alpha * soft


@register_method("deit_soft")
class DeiTSoftLoss(Method):
    """Module form of :func:`deit_soft_loss`; returns the total and its two terms for logging."""

    needs_teacher = True
    needs_features = False
    uses_distillation_token = True
    tasks = (MULTICLASS,)
    soft_targets = "mixed"
    uses_progress = False
    uses_positions = False
    uses_layers = False

    def __init__(self, alpha: float = 0.5, temperature: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        self.alpha = check_unit_interval("alpha", alpha)
        self.temperature = check_positive("temperature", temperature)
        self.label_smoothing = check_smoothing(label_smoothing)

    def forward(
        self, student: StudentOutput, targets: Tensor, teacher: TeacherOutput | None = None
    ) -> LossOutput:
        teacher = require_teacher("deit_soft", teacher)
        dist_logits = require_dist_logits("deit_soft", student)
        hard = ce_loss(student.logits, targets, self.label_smoothing)
        soft = soft_kl(dist_logits, teacher.logits, self.temperature)
        total = (1.0 - self.alpha) * hard + self.alpha * soft
        return LossOutput(total, {"ce": hard.detach(), "dist": soft.detach()})
