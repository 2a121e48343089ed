"""Hinton knowledge distillation (``kd``).

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS DL Workshop 2015,
arXiv:1503.02531.

.. math::

    L = (1-\\alpha)\\,\\mathrm{CE}_{\\epsilon}(z_s, y)
        + \\alpha\\,T^2\\,\\mathrm{KL}\\big(\\mathrm{softmax}(z_t/T)\\,\\|\\,\\mathrm{softmax}(z_s/T)\\big)

with the KL divergence summed over classes and averaged over the batch (``batchmean``), and
:math:`\\mathrm{CE}_\\epsilon` cross-entropy with label smoothing :math:`\\epsilon` (0 by default).
The :math:`T^2` factor keeps the gradient of the soft term on the scale of the hard term when
``T`` changes (Hinton et al., §2).

How the seeds' conventions map onto this one (α here always weights the *teacher* term):

* seed 001 (LS-KD compatibility) trains students with pure KD: ``alpha=1``.
* seed 002 (Lightning) writes ``a·CE + (1-a)·T²·KL`` with a=0.5: ``alpha = 1 - a`` = 0.5.
* seed 003 (Intel scenes) writes ``0.5·CE + 0.5·T²·KL``, T=4: ``alpha=0.5, temperature=4``.
* seed 004's ``kd`` term is ``T²·KL_sum/B`` = batchmean, T=4.
* DeiT's *soft* loss divides a summed KL by ``B·C`` (numel) instead of ``B``; it equals this
  convention's KL term divided by the number of classes. DeiT-style token distillation is a
  separate method.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.losses.registry import LossOutput, register_method


def check_kd_hyperparameters(temperature: float, alpha: float) -> None:
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``, summed over classes, mean over the batch."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
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
    """``(1-α)·CE(z_s, y) + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`` (batchmean KL).

    Args:
        student_logits: ``(B, C)`` student logits.
        teacher_logits: ``(B, C)`` teacher logits (no gradient flows into them).
        targets: ``(B,)`` integer class labels.
        temperature: softmax temperature ``T > 0``.
        alpha: weight of the distillation term in ``[0, 1]``; ``alpha=1`` is pure KD.
        label_smoothing: label smoothing of the hard term.
    """
    check_kd_hyperparameters(temperature, alpha)
    hard = F.cross_entropy(student_logits.float(), targets, label_smoothing=label_smoothing)
    soft = soft_kl(student_logits, teacher_logits.detach(), temperature)
    return (1.0 - alpha) * hard + alpha * soft


@register_method("kd")
class KDLoss(nn.Module):
    """Module form of :func:`kd_loss`; returns the total and its two terms for logging."""

    needs_teacher = True

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, label_smoothing: float = 0.0):
        super().__init__()
        check_kd_hyperparameters(temperature, alpha)
        self.temperature = temperature
        self.alpha = alpha
        self.label_smoothing = label_smoothing

    def forward(
        self, student_logits: Tensor, targets: Tensor, teacher_logits: Tensor | None = None
    ) -> LossOutput:
        if teacher_logits is None:
            raise ValueError("the 'kd' method needs teacher logits")
        hard = F.cross_entropy(
            student_logits.float(), targets, label_smoothing=self.label_smoothing
        )
        soft = soft_kl(student_logits, teacher_logits.detach(), self.temperature)
        total = (1.0 - self.alpha) * hard + self.alpha * soft
        return LossOutput(total, {"ce": hard.detach(), "kd": soft.detach()})
