"""Binary cross-entropy on multi-hot targets (``bce``): the multi-label teacher's and baseline
student's objective (the "BCE" baseline of LSHFM, Wang et al., TPAMI 2021: ``BCEWithLogits`` from
ImageNet weights), and the hard term of the feature methods (``l2``, ``lsh``, ``lshl2``) with
``multilabel=True``.

.. math::

    L = \\frac{1}{BC}\\sum_{b=1}^{B}\\sum_{c=1}^{C}
        -\\big[y_{bc}\\log\\sigma(z_{bc}) + (1-y_{bc})\\log(1-\\sigma(z_{bc}))\\big]

one independent sigmoid per class, averaged over the batch **and** the classes (PyTorch's
``BCEWithLogitsLoss`` default ``reduction="mean"``). Targets are multi-hot ``(B, C)``; VOC
"difficult" labels are positives in training (as in LSHFM), and ignored only in the AP metric.
No knobs.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.losses.base import Method
from kdlib.losses.registry import MULTILABEL, LossOutput, StudentOutput, TeacherOutput, register_method


def bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over batch and classes of BCE-with-logits; ``logits`` and ``targets`` are ``(B, C)``."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


@register_method("bce")
class BinaryCrossEntropy(Method):
    """Module form of :func:`bce_loss` (multi-label only; the teacher argument is ignored).
    Term logged: ``bce``."""

    needs_teacher = False
    needs_features = False
    uses_distillation_token = False
    tasks = (MULTILABEL,)
    soft_targets = "mixed"
    uses_progress = False
    uses_positions = False
    uses_layers = False

    def forward(
        self, student: StudentOutput, targets: Tensor, teacher: TeacherOutput | None = None
    ) -> LossOutput:
        loss = bce_loss(student.logits, targets)
        return LossOutput(loss, {"bce": loss.detach()})
