"""Multi-label knowledge distillation with temperature-scaled sigmoids (``sigmoid_kd``).

Hinton et al.'s KD (Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network",
arXiv:1503.02531, 2015) with each class treated as an independent binary problem: the
teacher's softened target for class ``c`` is :math:`q_{bc} = \\sigma(z^t_{bc}/T)` and the
student's :math:`p_{bc} = \\sigma(z^s_{bc}/T)`.

.. math::

    L = (1-\\alpha)\\,\\mathrm{BCE}(z_s, y)
        + \\alpha\\,T^2\\,\\frac{1}{BC}\\sum_{b,c}\\mathrm{KL}_{bin}(q_{bc}\\,\\|\\,p_{bc})

    \\mathrm{KL}_{bin}(q\\|p) = q\\log\\frac{q}{p} + (1-q)\\log\\frac{1-q}{1-p}
        = \\mathrm{BCE}(p; q) - H_{bin}(q)

where :math:`\\mathrm{BCE}(p; q) = -q\\log p-(1-q)\\log(1-p)` is computed with
``binary_cross_entropy_with_logits(z_s/T, σ(z_t/T))`` and
:math:`H_{bin}(q) = -q\\log q-(1-q)\\log(1-q)` is the teacher's binary entropy.

**Convention: the reported soft term is the KL form.** The soft BCE against the teacher equals
the binary KL plus the teacher's entropy, a constant with respect to the student, so its minimum
(student = teacher) is not 0. We subtract that entropy (computed the same way,
``binary_cross_entropy_with_logits(z_t/T, σ(z_t/T))``): equal logits give a soft term of
exactly 0, the logged ``kd`` value is comparable across temperatures and teachers, and the
gradient with respect to the student is *identical* to the plain soft-BCE form. To compare with
code that logs the BCE form, add :math:`\\alpha T^2\\,\\mathrm{mean}_{b,c} H_{bin}(q)`.

Both terms average over the batch **and** the classes (as PyTorch's BCE ``mean``), so the soft
term is on the scale of the hard one. The :math:`T^2` factor plays the same role as in softmax
KD: :math:`\\partial\\,T^2\\mathrm{KL}_{bin}/\\partial z^s = T\\,(p - q)`, which for large ``T``
tends to :math:`(z^s - z^t)/4`, independent of ``T``. Unlike ``kd`` (softmax over classes,
also the ``kd`` option of LSHFM, Wang et al., TPAMI 2021), this does not assume the classes
are mutually exclusive.

Knobs: ``temperature`` T (default 4, finite > 0), ``alpha`` α (default 0.9, in [0, 1]).
Multi-label only (multi-hot ``(B, C)`` targets). Terms logged: ``bce`` and ``kd`` (T²·mean KL_bin).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.losses._common import check_positive, check_unit_interval, require_teacher
from kdlib.losses.bce import bce_loss
from kdlib.losses.kd import check_kd_hyperparameters
from kdlib.losses.base import Method
from kdlib.losses.registry import MULTILABEL, LossOutput, StudentOutput, TeacherOutput, register_method


def sigmoid_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T² · mean_{b,c} KL_bin(σ(z_t/T) ‖ σ(z_s/T))``: soft BCE minus the teacher's entropy.

    ``0`` when the logits are equal; no gradient flows into ``teacher_logits``.
    """
    check_positive("temperature", temperature)
    student = student_logits.float() / temperature
    teacher = teacher_logits.detach().float() / temperature
    q = torch.sigmoid(teacher)
    soft_bce = F.binary_cross_entropy_with_logits(student, q, reduction="none")
    teacher_entropy = F.binary_cross_entropy_with_logits(teacher, q, reduction="none")
    return (soft_bce - teacher_entropy).mean() * temperature**2


def sigmoid_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float,
    alpha: float,
) -> Tensor:
    """``(1-α)·BCE(z_s, y) + α·T²·mean_{b,c} KL_bin(σ(z_t/T) ‖ σ(z_s/T))``.

    Args:
        student_logits: ``(B, C)`` student logits.
        teacher_logits: ``(B, C)`` teacher logits (no gradient flows into them).
        targets: ``(B, C)`` multi-hot 0/1 targets.
        temperature: sigmoid temperature ``T > 0``.
        alpha: weight of the distillation term in ``[0, 1]``; ``alpha=0`` is plain BCE.
    """
    check_kd_hyperparameters(temperature, alpha)
    hard = bce_loss(student_logits, targets)
    soft = sigmoid_kl(student_logits, teacher_logits, temperature)
    return (1.0 - alpha) * hard + alpha * soft


@register_method("sigmoid_kd")
class SigmoidKDLoss(Method):
    """Module form of :func:`sigmoid_kd_loss`; returns the total and its two terms for logging."""

    needs_teacher = True
    needs_features = False
    uses_distillation_token = False
    tasks = (MULTILABEL,)  # multi-hot targets
    soft_targets = "mixed"
    uses_progress = False
    uses_positions = False
    uses_layers = False

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9):
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.alpha = check_unit_interval("alpha", alpha)

    def forward(
        self, student: StudentOutput, targets: Tensor, teacher: TeacherOutput | None = None
    ) -> LossOutput:
        teacher = require_teacher("sigmoid_kd", teacher)
        hard = bce_loss(student.logits, targets)
        soft = sigmoid_kl(student.logits, teacher.logits, self.temperature)
        total = (1.0 - self.alpha) * hard + self.alpha * soft
        return LossOutput(total, {"bce": hard.detach(), "kd": soft.detach()})
