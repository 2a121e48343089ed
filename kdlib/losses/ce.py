"""Plain cross-entropy with optional label smoothing (``ce``): the teacher's and the baseline
student's objective, the control every distillation method is compared against, and the hard
term :math:`\\mathrm{CE}_\\epsilon` of every multiclass distillation method.

.. math::

    \\mathrm{CE}_\\epsilon(z, y) = (1-\\epsilon)\\,(-\\log p_y) + \\frac{\\epsilon}{K}\\sum_{k=1}^{K} (-\\log p_k),
    \\qquad p = \\mathrm{softmax}(z)

averaged over the batch. Label smoothing: Szegedy et al., "Rethinking the Inception
Architecture for Computer Vision", CVPR 2016. The LS–KD compatibility study (Chandrasegaran et al.,
ICML 2022) calls the strength α and trains its *teachers* with it: their α is this
``label_smoothing`` (ε); α = 0 is plain CE.
DeiT's base criterion is this with ε = 0.1 (``--smoothing``).

Targets are integer labels ``(B,)`` or soft targets ``(B, K)`` (MixUp/CutMix mixtures; the
smoothing then applies to the mixture, as ``F.cross_entropy`` does).

Knobs: ``label_smoothing`` (ε, default 0, in [0, 1]).
"""
from __future__ import annotations

from torch import Tensor, nn
import torch.nn.functional as F

from kdlib.losses._common import check_smoothing
from kdlib.losses.bce import bce_loss
from kdlib.losses.base import Method
from kdlib.losses.registry import MULTICLASS, LossOutput, StudentOutput, TeacherOutput, register_method


def ce_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """:math:`\\mathrm{CE}_\\epsilon` averaged over the batch; integer ``(B,)`` or soft ``(B, K)`` targets."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def hard_loss(
    logits: Tensor, targets: Tensor, label_smoothing: float = 0.0, multilabel: bool = False
) -> tuple[str, Tensor]:
    """The label term of a method that fits both tasks, with its logging name:
    ``("bce", BCE(z, y))`` for multi-hot targets, else ``("ce", CE_ε(z, y))``."""
    if multilabel:
        return "bce", bce_loss(logits, targets)
    return "ce", ce_loss(logits, targets, label_smoothing)


@register_method("ce")
class CrossEntropy(Method):
    """Module form of :func:`ce_loss` (the teacher argument is ignored). Term logged: ``ce``."""

    needs_teacher = False
    needs_features = False
    uses_distillation_token = False
    tasks = (MULTICLASS,)
    soft_targets = "mixed"
    uses_progress = False
    uses_positions = False
    uses_layers = False

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = check_smoothing(label_smoothing)

    def forward(
        self, student: StudentOutput, targets: Tensor, teacher: TeacherOutput | None = None
    ) -> LossOutput:
        loss = ce_loss(student.logits, targets, self.label_smoothing)
        return LossOutput(loss, {"ce": loss.detach()})
