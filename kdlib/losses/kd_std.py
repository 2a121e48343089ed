"""KD with logit standardization (``kd_std``).

Sun, Ren, Li, Wang, Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024,
arXiv:2403.01427. Both nets' logits are Z-scored per image before the tempered softmax, so the student
matches the teacher's logit *relations* rather than their range:

.. math::

    L = w_{ce}\\,\\mathrm{CE}_\\epsilon(z_s, y)
        + w_{kd}\\,T^2\\,\\mathrm{KL}\\big(\\mathrm{softmax}(\\tilde z_t/T)\\,\\|\\,\\mathrm{softmax}(\\tilde z_s/T)\\big),
    \\qquad \\tilde z = \\frac{z - \\bar z}{10^{-7} + \\sigma(z)}

with :math:`\\bar z` and :math:`\\sigma` the mean and the sample standard deviation (N − 1) over each
image's C logits, and the KL summed over classes, averaged over the batch.

Knobs (the authors' README command, ``--logit-stand --base-temp 2 --kd-weight 9``, over mdistiller's KD
with ``CE_WEIGHT`` 0.1): ``temperature`` T 2, ``kd_weight`` 9, ``ce_weight`` 0.1; context:
``label_smoothing`` ε. Terms logged: ``ce`` (unweighted) and ``kd`` (T²·KL, unweighted). Tested against
the authors' ``kd_loss`` (``mdistiller/distillers/KD.py`` of sunshangquan/logit-standardization-KD).
Their weights are not a convex pair as ``kd``'s α is, hence a method of its own rather than a ``kd`` knob.
"""
from __future__ import annotations

from torch import Tensor

from kdlib.losses._common import check_nonnegative, check_positive, check_smoothing, require_teacher
from kdlib.losses.base import Method
from kdlib.losses.ce import ce_loss
from kdlib.losses.kd import soft_kl
from kdlib.losses.registry import MULTICLASS, LossOutput, StudentOutput, TeacherOutput, register_method


def standardize(logits: Tensor) -> Tensor:
    """Each row's Z-score, ``(z − mean) / (1e-7 + std)``, with the sample (N − 1) standard deviation."""
    logits = logits.float()
    return (logits - logits.mean(dim=-1, keepdim=True)) / (1e-7 + logits.std(dim=-1, keepdim=True))


@register_method("kd_std")
class KDStandardizedLoss(Method):
    """``w_ce·CE_ε + w_kd·T²·KL`` of standardized logits (see the module docstring)."""

    needs_teacher = True
    needs_features = False
    uses_distillation_token = False
    tasks = (MULTICLASS,)
    soft_targets = "mixed"
    uses_progress = False
    uses_positions = False
    uses_layers = False

    def __init__(self, temperature: float = 2.0, kd_weight: float = 9.0, ce_weight: float = 0.1,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.kd_weight = check_nonnegative("kd_weight", kd_weight)
        self.ce_weight = check_nonnegative("ce_weight", ce_weight)
        self.label_smoothing = check_smoothing(label_smoothing)

    def forward(self, student: StudentOutput, targets: Tensor, teacher: TeacherOutput | None = None) -> LossOutput:
        teacher = require_teacher("kd_std", teacher)
        hard = ce_loss(student.logits, targets, self.label_smoothing)
        soft = soft_kl(standardize(student.logits), standardize(teacher.logits.detach()), self.temperature)
        total = self.ce_weight * hard + self.kd_weight * soft
        return LossOutput(total, {"ce": hard.detach(), "kd": soft.detach()})
