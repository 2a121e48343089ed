"""Plain cross-entropy with optional label smoothing (``ce``): the teacher's and the baseline
student's objective, and the control every distillation method is compared against.

.. math::

    L = (1-\\epsilon)\\,(-\\log p_y) + \\frac{\\epsilon}{K}\\sum_{k=1}^{K} (-\\log p_k)

Label smoothing (Szegedy et al., CVPR 2016, "Rethinking the Inception Architecture") with
strength :math:`\\epsilon`; seed 001 calls it α and uses it for the teacher.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.losses.registry import LossOutput, register_method


@register_method("ce")
class CrossEntropy(nn.Module):
    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(
        self, student_logits: Tensor, targets: Tensor, teacher_logits: Tensor | None = None
    ) -> LossOutput:
        loss = F.cross_entropy(student_logits.float(), targets, label_smoothing=self.label_smoothing)
        return LossOutput(loss, {"ce": loss.detach()})
