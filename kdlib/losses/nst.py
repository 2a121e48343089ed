"""Neuron selectivity transfer (``nst``).

Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", arXiv:1707.01219,
2017. Each channel's spatial activation is a sample of that neuron's selectivity; the student matches the
teacher's distribution of them by the squared maximum mean discrepancy with a degree-2 polynomial kernel:

.. math::

    L = w_{ce}\\,\\mathrm{CE}_\\epsilon(z_s, y) + w_{feat} \\sum_{l} \\Big[
        \\overline{k(f^t, f^t)} + \\overline{k(f^s, f^s)} - 2\\,\\overline{k(f^s, f^t)} \\Big], \\qquad
        k(a, b) = (a^\\top b)^2

where :math:`f_{l,i,c} = F_{l,i,c} / \\lVert F_{l,i,c}\\rVert_2` is channel c's flattened, normalized map
and the bars are means over the batch and every pair of channels; of a pair with different sizes the
larger map is average-pooled to the smaller. Knobs (mdistiller's ``NST`` defaults): ``ce_weight`` 1,
``feat_weight`` 50, ``student_layers`` / ``teacher_layers`` null = every stage after the stem, paired from
the deepest. Terms logged: ``ce``, ``nst`` (unweighted). Tested against mdistiller's ``nst_loss``.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdlib.losses._layers import LayerMethod, spatial_maps
from kdlib.losses.at import pool_to_smaller
from kdlib.losses.registry import MULTICLASS, register_method
from kdlib.taps import LayerPlan


def poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """Mean over the batch and all channel pairs of ``(a_c · b_d)²``, for ``(B, C, N)`` inputs."""
    return (b @ a.transpose(1, 2)).pow(2).mean()


def nst_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """The polynomial-kernel MMD² between one pair's normalized channel maps."""
    f_s, f_t = pool_to_smaller(f_s, f_t)
    f_s = F.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)
    f_t = F.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2)
    return poly_kernel_mean(f_t, f_t).detach() + poly_kernel_mean(f_s, f_s) - 2 * poly_kernel_mean(f_s, f_t)


@register_method("nst")
class NSTLoss(LayerMethod):
    """``w_ce·CE + w_feat·Σ_l MMD²_l`` (see the module docstring)."""

    needs_teacher = True
    needs_features = False
    uses_distillation_token = False
    uses_layers = True
    tasks = (MULTICLASS,)
    soft_targets = "mixed"
    uses_progress = False
    uses_positions = False
    method_name, feat_term = "nst", "nst"

    def __init__(self, ce_weight: float = 1.0, feat_weight: float = 50.0, student_layers=None, teacher_layers=None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(ce_weight, feat_weight, student_layers, teacher_layers, label_smoothing)

    def layer_problem(self, plan: LayerPlan) -> str | None:
        return spatial_maps("nst", plan)

    def pair_loss(self, index: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        return nst_loss(f_s, f_t)
