"""Relational knowledge distillation (``rkd``).

Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019, arXiv:1904.05068. The student
matches the teacher's relations between images rather than their outputs: pairwise distances (each
normalized by the batch mean) and the angles formed by triplets, both by the Huber (smooth L1) loss:

.. math::

    L = w_{ce}\\,\\mathrm{CE}_\\epsilon(z_s, y) + w_{feat}\\big[w_d\\,\\ell_\\delta(\\psi_D^s, \\psi_D^t)
        + w_a\\,\\ell_\\delta(\\psi_A^s, \\psi_A^t)\\big], \\qquad
        \\psi_D(i, j) = \\frac{\\lVert f_i - f_j\\rVert}{\\mu}, \\quad
        \\psi_A(i, j, k) = \\Big\\langle \\frac{f_i - f_j}{\\lVert f_i - f_j\\rVert},
        \\frac{f_k - f_j}{\\lVert f_k - f_j\\rVert} \\Big\\rangle

with μ the mean of the nonzero distances of the batch; squared distances (clamped at ``eps``) with
``squared: true``. On the pooled pre-logits features of both nets (any widths). Knobs (mdistiller's
``RKD`` defaults, the paper's): ``distance_weight`` 25, ``angle_weight`` 50, ``eps`` 1e-12, ``squared``
false, ``ce_weight`` 1, ``feat_weight`` 1, ``student_layers`` / ``teacher_layers`` null =
``[pre_logits]``. Terms logged: ``ce``, ``rkd`` (distance and angle terms weighted, ``feat_weight`` not).
Tested against mdistiller's ``rkd_loss``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlib.losses._common import check_bool, check_nonnegative, check_positive
from kdlib.losses._layers import LayerMethod
from kdlib.losses.registry import MULTICLASS, register_method
from kdlib.taps import PRE_LOGITS, Layer


def pairwise_distances(e: Tensor, squared: bool, eps: float) -> Tensor:
    """``(B, B)`` distances between rows, the diagonal 0."""
    square = e.pow(2).sum(dim=1)
    d = (square.unsqueeze(1) + square.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def _angles(e: Tensor) -> Tensor:
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


def rkd_loss(f_s: Tensor, f_t: Tensor, squared: bool = False, eps: float = 1e-12, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> Tensor:
    """``w_d·Huber(ψ_D^s, ψ_D^t) + w_a·Huber(ψ_A^s, ψ_A^t)`` of one pair of layers."""
    s, t = f_s.reshape(f_s.shape[0], -1), f_t.reshape(f_t.shape[0], -1).detach()
    t_d = pairwise_distances(t, squared, eps)
    t_d = t_d / t_d[t_d > 0].mean()
    d = pairwise_distances(s, squared, eps)
    d = d / d[d > 0].mean()
    return distance_weight * F.smooth_l1_loss(d, t_d) + angle_weight * F.smooth_l1_loss(_angles(s), _angles(t))


@register_method("rkd")
class RKDLoss(LayerMethod):
    """``w_ce·CE + w_feat·(w_d·distance + w_a·angle)`` (see the module docstring)."""

    needs_teacher = True
    needs_features = False
    uses_distillation_token = False
    uses_layers = True
    tasks = (MULTICLASS,)
    soft_targets = "mixed"
    uses_progress = False
    uses_positions = False
    method_name, feat_term = "rkd", "rkd"

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, eps: float = 1e-12,
                 squared: bool = False, ce_weight: float = 1.0, feat_weight: float = 1.0, student_layers=None,
                 teacher_layers=None, label_smoothing: float = 0.0) -> None:
        super().__init__(ce_weight, feat_weight, student_layers, teacher_layers, label_smoothing)
        self.distance_weight = check_nonnegative("distance_weight", distance_weight)
        self.angle_weight = check_nonnegative("angle_weight", angle_weight)
        self.eps = check_positive("eps", eps)
        self.squared = check_bool("squared", squared)

    def default_layers(self, student_stages: int, teacher_stages: int) -> tuple[list[Layer], list[Layer]]:
        return [PRE_LOGITS], [PRE_LOGITS]

    def pair_loss(self, index: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        return rkd_loss(f_s, f_t, self.squared, self.eps, self.distance_weight, self.angle_weight)
