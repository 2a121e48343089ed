"""Variational information distillation (``vid``).

Ahn, Hu, Damianou, Lawrence, Dai, "Variational Information Distillation for Knowledge Transfer", CVPR 2019,
arXiv:1904.05835. The student maximizes a variational lower bound on its mutual information with the
teacher: a Gaussian with a mean regressed from the student's map (three 1×1 convolutions with ReLUs, owned
by the method) and a learned per-channel variance models the teacher's map:

.. math::

    L = w_{ce}\\,\\mathrm{CE}_\\epsilon(z_s, y) + w_{feat} \\sum_l \\operatorname{mean}_{b,c,h,w}
        \\frac{1}{2}\\Big[\\frac{(\\mu_l(F^s)_{bchw} - F^t_{bchw})^2}{\\sigma^2_{l,c}} + \\log \\sigma^2_{l,c}\\Big],
        \\qquad \\sigma^2_{l,c} = \\log(1 + e^{\\alpha_{l,c}}) + \\varepsilon

with :math:`\\alpha` initialized so that :math:`\\sigma^2 = ` ``init_pred_var``; of a pair with different
sizes the larger map is average-pooled to the smaller. Knobs (mdistiller's ``VID`` defaults): ``ce_weight`` 1,
``feat_weight`` 1, ``init_pred_var`` 5, ``eps`` 1e-5, ``student_layers`` / ``teacher_layers`` null = every
stage after the stem, paired from the deepest. Terms logged: ``ce``, ``vid`` (unweighted). The regressors
and the variances α are the method's own parameters (extra parameters). mdistiller keeps α in a Python list,
so its optimizer never sees them and its variance stays at the initial value; here they train, as in the
authors' code. Tested against mdistiller's ``vid_loss``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.losses._common import check_positive
from kdlib.losses._layers import LayerMethod, spatial_maps
from kdlib.losses.at import pool_to_smaller
from kdlib.losses.registry import MULTICLASS, register_method
from kdlib.taps import LayerPlan


def vid_regressor(student_channels: int, teacher_channels: int) -> nn.Sequential:
    """mdistiller's mean regressor: 1×1 conv (no bias) → ReLU → 1×1 → ReLU → 1×1."""
    def conv(i: int, o: int) -> nn.Conv2d:
        return nn.Conv2d(i, o, kernel_size=1, padding=0, bias=False)
    return nn.Sequential(conv(student_channels, teacher_channels), nn.ReLU(), conv(teacher_channels, teacher_channels),
                         nn.ReLU(), conv(teacher_channels, teacher_channels))


def vid_loss(regressor: nn.Module, log_scale: Tensor, f_s: Tensor, f_t: Tensor, eps: float = 1e-5) -> Tensor:
    """The Gaussian negative log-likelihood (constant dropped) of ``f_t`` under the student's prediction."""
    f_s, f_t = pool_to_smaller(f_s, f_t)
    mean = regressor(f_s)
    variance = (F.softplus(log_scale) + eps).view(1, -1, 1, 1).to(mean)
    return (0.5 * ((mean - f_t) ** 2 / variance + variance.log())).mean()


@register_method("vid")
class VIDLoss(LayerMethod):
    """``w_ce·CE + w_feat·Σ_l NLL_l`` with trained regressors and variances (see the module docstring)."""

    needs_teacher = True
    needs_features = False
    uses_distillation_token = False
    uses_layers = True
    tasks = (MULTICLASS,)
    soft_targets = "mixed"
    uses_progress = False
    uses_positions = False
    method_name, feat_term = "vid", "vid"

    def __init__(self, init_pred_var: float = 5.0, eps: float = 1e-5, ce_weight: float = 1.0, feat_weight: float = 1.0,
                 student_layers=None, teacher_layers=None, label_smoothing: float = 0.0) -> None:
        super().__init__(ce_weight, feat_weight, student_layers, teacher_layers, label_smoothing)
        self.eps = check_positive("eps", eps)
        self.init_pred_var = check_positive("init_pred_var", init_pred_var)
        if self.init_pred_var <= self.eps:
            raise ValueError(f"init_pred_var must be > eps ({self.eps!r}), got {init_pred_var!r}")
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()

    def layer_problem(self, plan: LayerPlan) -> str | None:
        return spatial_maps("vid", plan)

    def build_adapters(self, plan: LayerPlan) -> None:
        start = math.log(math.expm1(self.init_pred_var - self.eps))  # softplus⁻¹(init_pred_var − eps)
        self.regressors = nn.ModuleList(vid_regressor(s[0], t[0]) for s, t in zip(plan.student_shapes, plan.teacher_shapes))
        self.log_scales = nn.ParameterList(nn.Parameter(torch.full((t[0],), start)) for t in plan.teacher_shapes)

    def pair_loss(self, index: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        return vid_loss(self.regressors[index], self.log_scales[index], f_s, f_t, self.eps)
