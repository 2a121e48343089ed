"""Feature regression (``l2``): the student's pooled feature regresses the teacher's.

Wang, Ge, Wu, "Distilling Knowledge by Mimicking Features", TPAMI 2021, arXiv:2011.01424
(LSHFM: its ``l2`` option and the L2 half of its default ``lshl2``).

.. math::

    \\mathcal L_2 = \\frac{1}{BD}\\,\\lVert f_s - f_t \\rVert_F^2, \\qquad
    L = \\gamma\\,\\mathcal L_{hard} + \\beta\\,\\mathcal L_2

:math:`f_s, f_t \\in \\mathbb R^{B\\times D}` are the pooled penultimate features (the student's
after its ``feat_fc`` projection to the teacher's width D), i.e. PyTorch's ``MSELoss`` with
``reduction="mean"`` as in LSHFM. :math:`\\mathcal L_{hard}` is CE_ε, or BCE with ``multilabel=True``.
No gradient flows into the teacher's features.

Knobs: ``beta`` β (default 1, ≥ 0), ``gamma`` γ (default 1, ≥ 0), ``force_feat_fc`` (default
False: give the student a ``feat_fc`` Linear even when the widths match, LSHFM's ``force_2FC``);
context: ``label_smoothing``, ``multilabel``. Terms logged: ``ce``/``bce`` and ``l2`` (unweighted).
"""
from __future__ import annotations

from torch import Tensor, nn

from kdlib.losses._common import check_bool, check_nonnegative, check_smoothing, require_features
from kdlib.losses.ce import hard_loss
from kdlib.losses.base import Method
from kdlib.losses.registry import MULTICLASS, MULTILABEL, LossOutput, StudentOutput, TeacherOutput, register_method


def l2_loss_per_sample(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """``(B,)``: ``mean_d (f_s − f_t)²`` for each sample; no gradient into ``teacher_features``."""
    return (student_features.float() - teacher_features.detach().float()).pow(2).mean(dim=1)


def l2_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """``‖f_s − f_t‖² / (B·D)`` for ``(B, D)`` features; no gradient into ``teacher_features``."""
    return l2_loss_per_sample(student_features, teacher_features).mean()


@register_method("l2")
class L2Loss(Method):
    """``γ·hard + β·L2`` (see the module docstring)."""

    needs_teacher = True
    needs_features = True
    uses_distillation_token = False
    tasks = (MULTICLASS, MULTILABEL)
    soft_targets = "mixed"
    uses_progress = False
    uses_positions = False
    uses_layers = False

    def __init__(
        self,
        beta: float = 1.0,
        gamma: float = 1.0,
        force_feat_fc: bool = False,
        label_smoothing: float = 0.0,
        multilabel: bool = False,
    ):
        super().__init__()
        self.beta = check_nonnegative("beta", beta)
        self.gamma = check_nonnegative("gamma", gamma)
        self.force_feat_fc = check_bool("force_feat_fc", force_feat_fc)
        self.multilabel = check_bool("multilabel", multilabel)
        self.label_smoothing = check_smoothing(label_smoothing, self.multilabel)

    def forward(
        self, student: StudentOutput, targets: Tensor, teacher: TeacherOutput | None = None
    ) -> LossOutput:
        f_s, f_t = require_features("l2", student, teacher)
        name, hard = hard_loss(student.logits, targets, self.label_smoothing, self.multilabel)
        feature = l2_loss(f_s, f_t)
        total = self.gamma * hard + self.beta * feature
        return LossOutput(total, {name: hard.detach(), "l2": feature.detach()})
