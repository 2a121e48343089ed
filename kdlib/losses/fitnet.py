"""FitNets hints (``fitnet``).

Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015,
arXiv:1412.6550. A regressor r (owned by the method, trained with the student) maps the student's
guided layer to the teacher's hint layer, and the student learns to make them equal:

.. math::

    L = w_{ce}\\,\\mathrm{CE}_\\epsilon(z_s, y) + w_{feat}\\,\\frac{1}{B C H W}
        \\big\\lVert r(F^s) - F^t \\big\\rVert_2^2

r is mdistiller's ``ConvReg``: a 3×3 stride-2 convolution when the student's map is twice the teacher's
height, a 4×4 stride-2 transposed convolution when it is half, else a ``(1 + H_s − H_t)``-sized
convolution (a student map smaller than the teacher's, other than half, is refused before any work),
then BatchNorm and ReLU.

Two ways to train it. mdistiller's (the default, ``hint_stage: false``): one stage, the hint jointly with
CE. The paper's (``hint_stage: true``, §2.3): first a hint stage of its own — the pipeline's ``align``
stage trains the student up to the guided layer and the regressor on the hint term alone
(``align.epochs``, ``align.lr``, ``align.beta`` as its weight; CE is left out, so the layers after the
guided one and the classifier get no gradient and stay as initialized) — then ``distill`` trains the
whole student from those weights with

.. math::

    L_2 = w_{ce}\,\mathrm{CE}_\epsilon + w_{kd}\,\tau^2\,\mathrm{KL}(\sigma(z_t/\tau)\,\Vert\,\sigma(z_s/\tau))
        + w_{feat}\,L_{hint}

(the paper's second stage is KD: ``feat_weight: 0``, ``kd_weight`` > 0; its linear annealing of the KD
weight is not reproduced). The regressor of the second stage starts afresh. Knobs (mdistiller's
``FITNET`` defaults): ``ce_weight`` 1, ``feat_weight`` 100, ``kd_weight`` 0, ``temperature`` 4 (used when
``kd_weight`` > 0), ``hint_stage`` false, ``student_layers`` / ``teacher_layers`` null = stage 2 of each
(mdistiller's ``HINT_LAYER: 2``; the last stage of a net with fewer). Terms logged: ``ce``, ``hint``
(unweighted), ``kd`` when ``kd_weight`` > 0. The regressor's parameters are the distilled student's extra
parameters. Tested against mdistiller's ``FitNet`` with the same regressor weights.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.losses._common import check_bool, check_nonnegative, check_positive
from kdlib.losses._layers import LayerMethod, spatial_maps
from kdlib.losses.kd import soft_kl
from kdlib.losses.registry import MULTICLASS, StudentOutput, TeacherOutput, register_method
from kdlib.taps import Layer, LayerPlan


class ConvRegressor(nn.Module):
    """mdistiller's ``ConvReg`` from a student map ``(C_s, H_s, W_s)`` to a teacher map ``(C_t, H_t, W_t)``."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], use_relu: bool = True) -> None:
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = student_shape, teacher_shape
        self.conv: nn.Module
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif s_h * 2 == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(regressor_problem(student_shape, teacher_shape) or "no regressor")
        self.bn = nn.BatchNorm2d(t_c)
        self.use_relu = use_relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.use_relu else x


def regressor_problem(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> str | None:
    """Why no ``ConvReg`` maps a student map of ``student_shape`` to ``teacher_shape``, or ``None``."""
    (_, s_h, s_w), (_, t_h, t_w) = student_shape, teacher_shape
    if s_h == 2 * t_h or s_h * 2 == t_h or (s_h >= t_h and s_w >= t_w):
        return None
    return (f"the student's hint map {tuple(student_shape)} is smaller than the teacher's {tuple(teacher_shape)} "
            "and not half its size: FitNet's regressor (mdistiller's ConvReg) cannot map it; choose other layers "
            "with student_layers / teacher_layers")


@register_method("fitnet")
class FitNetLoss(LayerMethod):
    """``w_ce·CE + w_feat·MSE(r(F_s), F_t)`` with a trained regressor r (see the module docstring)."""

    needs_teacher = True
    needs_features = False
    uses_distillation_token = False
    uses_layers = True
    tasks = (MULTICLASS,)
    soft_targets = "mixed"
    uses_progress = False
    uses_positions = False
    method_name, feat_term = "fitnet", "hint"

    def __init__(self, ce_weight: float = 1.0, feat_weight: float = 100.0, kd_weight: float = 0.0,
                 temperature: float = 4.0, hint_stage: bool = False, student_layers=None, teacher_layers=None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(ce_weight, feat_weight, student_layers, teacher_layers, label_smoothing)
        self.kd_weight = check_nonnegative("kd_weight", kd_weight)
        self.temperature = check_positive("temperature", temperature)
        self.hint_stage = check_bool("hint_stage", hint_stage)
        self.regressors = nn.ModuleList()

    @classmethod
    def alignment_knobs(cls, beta: float, knobs: Mapping[str, Any] = {}) -> dict[str, Any] | None:
        """With ``hint_stage``, the paper's stage 1: the hint term alone, weighted ``beta``."""
        return {"ce_weight": 0.0, "kd_weight": 0.0, "feat_weight": beta} if knobs.get("hint_stage") else None

    def extra_terms(self, student: StudentOutput, targets: Tensor, teacher: TeacherOutput, total: Tensor,
                    terms: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        if not self.kd_weight:
            return total, terms
        kd = soft_kl(student.logits, teacher.logits, self.temperature)
        return total + self.kd_weight * kd, {**terms, "kd": kd.detach()}

    def default_layers(self, student_stages: int, teacher_stages: int) -> tuple[list[Layer], list[Layer]]:
        return [min(2, student_stages - 1)], [min(2, teacher_stages - 1)]

    def layer_problem(self, plan: LayerPlan) -> str | None:
        problem = spatial_maps("fitnet", plan)
        if problem is None:
            for s, t in zip(plan.student_shapes, plan.teacher_shapes):
                problem = problem or regressor_problem(s, t)
        return problem

    def build_adapters(self, plan: LayerPlan) -> None:
        self.regressors = nn.ModuleList(ConvRegressor(s, t) for s, t in zip(plan.student_shapes, plan.teacher_shapes))

    def pair_loss(self, index: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        return F.mse_loss(self.regressors[index](f_s), f_t)
