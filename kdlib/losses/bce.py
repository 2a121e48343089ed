"""Binary cross-entropy on multi-hot targets (``bce``): the multi-label teacher's and baseline
student's objective (seed S4's "BCE" baseline, ``BCEWithLogits`` from ImageNet weights).

.. math::

    L = \\frac{1}{BC}\\sum_{b=1}^{B}\\sum_{c=1}^{C}
        -\\big[y_{bc}\\log\\sigma(z_{bc}) + (1-y_{bc})\\log(1-\\sigma(z_{bc}))\\big]

one independent sigmoid per class, averaged over the batch **and** the classes (PyTorch's
``BCEWithLogitsLoss`` default ``reduction="mean"``). Targets are multi-hot ``(B, C)``; VOC
"difficult" labels are positives in training (S4), and ignored only in the AP metric.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.losses.registry import LossOutput, register_method


def bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over batch and classes of BCE-with-logits; ``logits`` and ``targets`` are ``(B, C)``."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


@register_method("bce")
class BinaryCrossEntropy(nn.Module):
    """Module form of :func:`bce_loss`."""

    needs_teacher = False
    multilabel = True  # multi-hot targets

    def forward(
        self, student_logits: Tensor, targets: Tensor, teacher_logits: Tensor | None = None
    ) -> LossOutput:
        loss = bce_loss(student_logits, targets)
        return LossOutput(loss, {"bce": loss.detach()})
