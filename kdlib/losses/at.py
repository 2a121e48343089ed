"""Attention transfer (``at``).

Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of Convolutional
Neural Networks via Attention Transfer", ICLR 2017, arXiv:1612.03928. The student matches the teacher's
spatial attention maps, each the channel mean of a feature map's p-th power, flattened and L2-normalized:

.. math::

    L = w_{ce}\\,\\mathrm{CE}_\\epsilon(z_s, y) + w_{feat} \\sum_{l}
        \\frac{1}{B\\,H_l W_l} \\sum_{i} \\Big\\lVert \\frac{Q^s_{l,i}}{\\lVert Q^s_{l,i}\\rVert_2}
        - \\frac{Q^t_{l,i}}{\\lVert Q^t_{l,i}\\rVert_2} \\Big\\rVert_2^2, \\qquad
        Q_{l,i} = \\mathrm{vec}\\Big(\\frac{1}{C_l}\\sum_c F_{l,i,c}^{\\,p}\\Big)

over pairs of layers l; of a pair with different sizes the larger map is average-pooled to the smaller
(mdistiller). Knobs (mdistiller's ``AT`` defaults): ``p`` 2, ``ce_weight`` 1, ``feat_weight`` 1000,
``student_layers`` / ``teacher_layers`` null = every stage after the stem, paired from the deepest
(mdistiller's ``feats[1:]``; :mod:`kdlib.losses._layers`). Terms logged: ``ce``, ``at`` (unweighted).
Tested against mdistiller's ``at_loss``.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

from kdlib.losses._common import check_positive
from kdlib.losses._layers import LayerMethod, spatial_maps
from kdlib.losses.registry import MULTICLASS, register_method
from kdlib.taps import Layer, LayerPlan


def pool_to_smaller(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """The larger of two feature maps average-pooled to the smaller's height (square, as mdistiller)."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


def attention_map(feature: Tensor, p: float) -> Tensor:
    """``(B, H·W)``: the L2-normalized channel mean of ``feature ** p``."""
    return F.normalize(feature.pow(p).mean(1).reshape(feature.size(0), -1))


def at_loss(f_s: Tensor, f_t: Tensor, p: float = 2.0) -> Tensor:
    """The mean squared difference of one pair's attention maps."""
    f_s, f_t = pool_to_smaller(f_s, f_t)
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


@register_method("at")
class ATLoss(LayerMethod):
    """``w_ce·CE + w_feat·Σ_l AT_l`` (see the module docstring)."""

    needs_teacher = True
    needs_features = False
    uses_distillation_token = False
    uses_layers = True
    tasks = (MULTICLASS,)
    soft_targets = "mixed"  # the attention terms use no labels
    uses_progress = False
    uses_positions = False
    method_name, feat_term = "at", "at"

    def __init__(self, p: float = 2.0, ce_weight: float = 1.0, feat_weight: float = 1000.0,
                 student_layers: Sequence[Layer] | None = None, teacher_layers: Sequence[Layer] | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(ce_weight, feat_weight, student_layers, teacher_layers, label_smoothing)
        self.p = check_positive("p", p)

    def layer_problem(self, plan: LayerPlan) -> str | None:
        return spatial_maps("at", plan)

    def pair_loss(self, index: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        return at_loss(f_s, f_t, self.p)
