"""Decoupled knowledge distillation (``dkd``).

Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022, arXiv:2203.08679.
The KD term splits into a target-class part (TCKD: the binary split p_t vs 1 − p_t) and a
non-target part (NCKD: the distribution over the other classes), weighted separately:

.. math::

    L = w_{ce}\\,\\mathrm{CE}_\\epsilon(z_s, y)
        + \\min\\!\\Big(\\frac{e}{W}, 1\\Big)\\,T^2\\,\\Big[\\alpha\\,\\mathrm{KL}(b_t \\,\\|\\, b_s)
        + \\beta\\,\\mathrm{KL}(\\hat p_t \\,\\|\\, \\hat p_s)\\Big]

with :math:`p = \\mathrm{softmax}(z/T)`, :math:`b = (p_y, 1 - p_y)`,
:math:`\\hat p = \\mathrm{softmax}(z_{\\setminus y}/T)` over the classes other than the label y, each KL
summed over its classes and averaged over the batch, and ``e`` the 1-based epoch: the distillation
terms ramp up over the first W epochs.

Knobs (mdistiller's ``CFG.DKD`` defaults): ``alpha`` 1.0, ``beta`` 8.0, ``temperature`` 4.0,
``warmup`` W = 20 epochs (0: none), ``ce_weight`` 1.0; context: the student preset's
``label_smoothing`` ε on the CE term (mdistiller's is plain CE, ε = 0). Terms logged: ``ce``
(unweighted CE_ε), ``tckd`` and ``nckd`` (each T²·KL, unweighted) and ``warmup`` (the ramp factor).

Against mdistiller's ``dkd_loss`` (``mdistiller/distillers/DKD.py``): the same values (tested on
its code), computed stably. mdistiller takes ``log`` of the summed target/non-target probabilities
(−inf, and an infinite or NaN loss, once a probability underflows) and masks the label out of NCKD by subtracting
1000 from its logit (exact only while |z/T| stays well below 1000); here the binary log-probabilities
come from ``log_softmax`` and ``logsumexp``, and NCKD drops the label's column. The warm-up is
mdistiller's: per epoch, ``min(epoch / warmup, 1)`` with epochs counted from 1.

DKD needs integer labels (the target class of each image): MixUp/CutMix's soft targets are refused
before a run starts (``soft_targets = "refused"``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlib.losses._common import check_nonnegative, check_positive, check_smoothing, require_teacher
from kdlib.losses.base import Method
from kdlib.losses.ce import ce_loss
from kdlib.losses.registry import MULTICLASS, LossOutput, Progress, StudentOutput, TeacherOutput, register_method


def _target_split(log_p: Tensor, target: Tensor) -> Tensor:
    """``(B, 2)`` log-probabilities of (the label's class, every other class together)."""
    log_target = log_p.gather(1, target[:, None])
    others = log_p.scatter(1, target[:, None], float("-inf")).logsumexp(dim=1, keepdim=True)
    return torch.cat([log_target, others], dim=1)


def _without_target(logits: Tensor, target: Tensor) -> Tensor:
    """``(B, C − 1)``: each row's logits without its label's column."""
    keep = torch.ones_like(logits, dtype=torch.bool).scatter(1, target[:, None], False)
    return logits[keep].view(logits.shape[0], logits.shape[1] - 1)


def dkd_terms(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float
              ) -> tuple[Tensor, Tensor]:
    """``(TCKD, NCKD)``, each ``T²·KL`` summed over its classes and averaged over the batch; no gradient
    flows into ``teacher_logits``. ``target``: ``(B,)`` integer labels."""
    if target.ndim != 1 or target.is_floating_point():
        raise ValueError(f"dkd needs integer class labels (B,), got a {tuple(target.shape)} {target.dtype} tensor "
                         "(MixUp/CutMix soft targets?)")
    zs, zt = student_logits.float() / temperature, teacher_logits.detach().float() / temperature
    tckd = F.kl_div(_target_split(F.log_softmax(zs, dim=1), target), _target_split(F.log_softmax(zt, dim=1), target),
                    reduction="batchmean", log_target=True)
    nckd = F.kl_div(F.log_softmax(_without_target(zs, target), dim=1), F.log_softmax(_without_target(zt, target), dim=1),
                    reduction="batchmean", log_target=True)
    return tckd * temperature**2, nckd * temperature**2


def warmup_factor(epoch: int, warmup: int) -> float:
    """mdistiller's ramp: ``min(epoch / warmup, 1)`` for the 1-based ``epoch``; 1 without warm-up."""
    return min(epoch / warmup, 1.0) if warmup else 1.0


@register_method("dkd")
class DKDLoss(Method):
    """``w_ce·CE_ε + min(e/W, 1)·(α·TCKD + β·NCKD)`` (see the module docstring)."""

    needs_teacher = True
    needs_features = False
    uses_distillation_token = False
    tasks = (MULTICLASS,)
    soft_targets = "refused"  # TCKD and NCKD split every row at its label's class
    uses_progress = True
    uses_positions = False
    uses_layers = False

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup: int = 20,
                 ce_weight: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        self.alpha = check_nonnegative("alpha", alpha)
        self.beta = check_nonnegative("beta", beta)
        self.temperature = check_positive("temperature", temperature)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be a whole number of epochs >= 0, got {warmup!r}")
        self.warmup = warmup
        self.ce_weight = check_nonnegative("ce_weight", ce_weight)
        self.label_smoothing = check_smoothing(label_smoothing)

    def forward(self, student: StudentOutput, targets: Tensor, teacher: TeacherOutput | None = None,
                progress: Progress | None = None) -> LossOutput:
        teacher = require_teacher("dkd", teacher)
        if progress is None:
            raise ValueError("dkd needs the training progress (its warm-up counts epochs): pass progress=")
        ramp = warmup_factor(progress.epoch, self.warmup)
        hard = ce_loss(student.logits, targets, self.label_smoothing)
        tckd, nckd = dkd_terms(student.logits, teacher.logits, targets, self.temperature)
        total = self.ce_weight * hard + ramp * (self.alpha * tckd + self.beta * nckd)
        return LossOutput(total, {"ce": hard.detach(), "tckd": tckd.detach(), "nckd": nckd.detach(),
                                  "warmup": torch.tensor(ramp, device=hard.device)})
