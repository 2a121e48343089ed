"""Hinton knowledge distillation (``kd``).

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS DL Workshop 2015,
arXiv:1503.02531.

.. math::

    L = (1-\\alpha)\\,\\mathrm{CE}_{\\epsilon}(z_s, y)
        + \\alpha\\,T^2\\,\\mathrm{KL}\\big(\\mathrm{softmax}(z_t/T)\\,\\|\\,\\mathrm{softmax}(z_s/T)\\big)

with the KL divergence summed over classes and averaged over the batch (``batchmean``), and
:math:`\\mathrm{CE}_\\epsilon` cross-entropy with label smoothing :math:`\\epsilon` (0 by default;
integer or soft MixUp/CutMix targets). The :math:`T^2` factor keeps the gradient of the soft term
on the scale of the hard term when ``T`` changes (Hinton et al., §2).

Knobs: ``temperature`` T (default 4, finite > 0), ``alpha`` α (default 0.9, in [0, 1]);
context: ``label_smoothing`` ε. Terms logged: ``ce`` (unweighted CE_ε) and ``kd`` (T²·KL).

How the source projects' conventions map onto this one (α here always weights the *teacher* term):

* the LS–KD compatibility study (Chandrasegaran et al., ICML 2022) trains students with pure KD:
  ``alpha=1``.
* the teacher-architecture study (Lightning) writes ``a·CE + (1-a)·T²·KL`` with a=0.5:
  ``alpha = 1 - a`` = 0.5.
* the residual-CNN precision study (Intel scenes) writes ``0.5·CE + 0.5·T²·KL``, T=4:
  ``alpha=0.5, temperature=4``.
* the ``kd`` term of LSHFM (Wang et al., TPAMI 2021) is ``T²·KL_sum/B`` = batchmean, T=4.
* DeiT's *soft* loss divides a summed KL by ``B·C`` (numel) instead of ``B``; it equals this
  convention's KL term divided by the number of classes C. DeiT-style token distillation is
  the separate methods ``deit_soft`` / ``deit_hard``.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.losses._common import check_positive, check_smoothing, check_unit_interval, require_teacher
from kdlib.losses.ce import ce_loss
from kdlib.losses.base import Method
from kdlib.losses.registry import MULTICLASS, LossOutput, StudentOutput, TeacherOutput, register_method


def check_kd_hyperparameters(temperature: float, alpha: float) -> None:
    check_positive("temperature", temperature)
    check_unit_interval("alpha", alpha)


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``, summed over classes, mean over the batch.

    No gradient flows into ``teacher_logits``."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``(1-α)·CE_ε(z_s, y) + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`` (batchmean KL).

    Args:
        student_logits: ``(B, C)`` student logits.
        teacher_logits: ``(B, C)`` teacher logits (no gradient flows into them).
        targets: ``(B,)`` integer class labels or ``(B, C)`` soft targets.
        temperature: softmax temperature ``T > 0``.
        alpha: weight of the distillation term in ``[0, 1]``; ``alpha=1`` is pure KD.
        label_smoothing: label smoothing ε of the hard term.
    """
    check_kd_hyperparameters(temperature, alpha)
    hard = ce_loss(student_logits, targets, label_smoothing)
    soft = soft_kl(student_logits, teacher_logits, temperature)
    return (1.0 - alpha) * hard + alpha * soft


@register_method("kd")
class KDLoss(Method):
    """Module form of :func:`kd_loss`; returns the total and its two terms for logging."""

    needs_teacher = True
    needs_features = False
    uses_distillation_token = False
    tasks = (MULTICLASS,)
    soft_targets = "mixed"
    uses_progress = False
    uses_positions = False
    uses_layers = False

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, label_smoothing: float = 0.0):
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.alpha = check_unit_interval("alpha", alpha)
        self.label_smoothing = check_smoothing(label_smoothing)

    def forward(
        self, student: StudentOutput, targets: Tensor, teacher: TeacherOutput | None = None
    ) -> LossOutput:
        teacher = require_teacher("kd", teacher)
        hard = ce_loss(student.logits, targets, self.label_smoothing)
        soft = soft_kl(student.logits, teacher.logits, self.temperature)
        total = (1.0 - self.alpha) * hard + self.alpha * soft
        return LossOutput(total, {"ce": hard.detach(), "kd": soft.detach()})
