"""DeiT token distillation, hard variant (``deit_hard``).

Touvron, Cord, Douze, Massa, Sablayrolles, Jégou, "Training data-efficient image transformers &
distillation through attention", ICML 2021, arXiv:2012.12877 (the DeiT+ConvNeXt FGVC project is a
fork of its code; that project's CUB+Dogs result 92.52 % uses this variant).

.. math::

    L = (1-\\alpha)\\,\\mathrm{CE}_{\\epsilon}(z_{cls}, y)
        + \\alpha\\,\\mathrm{CE}\\big(z_{dist},\\ \\arg\\max_c z_{t,c}\\big)

:math:`z_{cls}` is the class token's head (``StudentOutput.logits``), :math:`z_{dist}` the
distillation token's head (``StudentOutput.dist_logits``). The teacher's hard decision is the
distillation head's label, with **no** label smoothing (as in DeiT; the paper notes that hard
labels can also be smoothed, the released code does not). The class head gets gradient only
from the labels, the distillation head only from the teacher; no gradient reaches the teacher.

Knobs: ``alpha`` α (default 0.5, DeiT's ``--distillation-alpha``, in [0, 1]); context:
``label_smoothing`` ε of the class-head CE only. Terms logged: ``ce`` (class head) and ``dist``
(CE of the distillation head against the teacher's argmax).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.losses._common import check_smoothing, check_unit_interval, require_teacher
from kdlib.losses.ce import ce_loss
from kdlib.losses.deit_soft import require_dist_logits
from kdlib.losses.base import Method
from kdlib.losses.registry import MULTICLASS, LossOutput, StudentOutput, TeacherOutput, register_method


def hard_teacher_ce(dist_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``CE(z_dist, argmax z_t)`` averaged over the batch, without label smoothing."""
    return F.cross_entropy(dist_logits.float(), teacher_logits.detach().argmax(dim=-1))


def deit_hard_loss(
    cls_logits: Tensor,
    dist_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    alpha: float = 0.5,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``(1-α)·CE_ε(z_cls, y) + α·CE(z_dist, argmax z_t)``."""
    check_unit_interval("alpha", alpha)
    hard = ce_loss(cls_logits, targets, label_smoothing)
    return (1.0 - alpha) * hard + alpha * hard_teacher_ce(dist_logits, teacher_logits)


@register_method("deit_hard")
class DeiTHardLoss(Method):
    """Module form of :func:`deit_hard_loss`; returns the total and its two terms for logging."""

    needs_teacher = True
    needs_features = False
    uses_distillation_token = True
    tasks = (MULTICLASS,)
    soft_targets = "mixed"
    uses_progress = False
    uses_positions = False
    uses_layers = False

    def __init__(self, alpha: float = 0.5, label_smoothing: float = 0.0):
        super().__init__()
        self.alpha = check_unit_interval("alpha", alpha)
        self.label_smoothing = check_smoothing(label_smoothing)

    def forward(
        self, student: StudentOutput, targets: Tensor, teacher: TeacherOutput | None = None
    ) -> LossOutput:
        teacher = require_teacher("deit_hard", teacher)
        dist_logits = require_dist_logits("deit_hard", student)
        hard = ce_loss(student.logits, targets, self.label_smoothing)
        dist = hard_teacher_ce(dist_logits, teacher.logits)
        total = (1.0 - self.alpha) * hard + self.alpha * dist
        return LossOutput(total, {"ce": hard.detach(), "dist": dist.detach()})
