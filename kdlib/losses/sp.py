"""Similarity-preserving distillation (``sp``).

Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019, arXiv:1907.09682. Images that
the teacher represents alike should be represented alike by the student: the row-normalized Gram
matrices of a layer's flattened activations over the batch are matched:

.. math::

    L = w_{ce}\\,\\mathrm{CE}_\\epsilon(z_s, y) + w_{feat} \\sum_{l} \\frac{1}{B^2}
        \\big\\lVert \\tilde G^t_l - \\tilde G^s_l \\big\\rVert_F^2, \\qquad
        G_l = A_l A_l^\\top,\\ A_l \\in \\mathbb R^{B \\times C H W}

with :math:`\\tilde G` each row of G divided by its L2 norm. The layers may differ in every size (only
B×B matrices are compared). Knobs (mdistiller's ``SP`` defaults): ``ce_weight`` 1, ``feat_weight`` 3000,
``student_layers`` / ``teacher_layers`` null = the last stage of each (mdistiller's ``feats[-1]``). Terms
logged: ``ce``, ``sp`` (unweighted). Tested against mdistiller's ``sp_loss``. Under several processes the
Gram matrix is over each process's shard.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdlib.losses._layers import LayerMethod
from kdlib.losses.registry import MULTICLASS, register_method
from kdlib.taps import Layer


def sp_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """``‖G̃_t − G̃_s‖_F² / B²`` of one pair of layers."""
    b = f_s.shape[0]
    g_s = F.normalize(f_s.reshape(b, -1) @ f_s.reshape(b, -1).t())
    g_t = F.normalize(f_t.reshape(b, -1) @ f_t.reshape(b, -1).t())
    return (g_t - g_s).pow(2).sum() / (b * b)


@register_method("sp")
class SPLoss(LayerMethod):
    """``w_ce·CE + w_feat·Σ_l SP_l`` (see the module docstring)."""

    needs_teacher = True
    needs_features = False
    uses_distillation_token = False
    uses_layers = True
    tasks = (MULTICLASS,)
    soft_targets = "mixed"
    uses_progress = False
    uses_positions = False
    method_name, feat_term = "sp", "sp"

    def __init__(self, ce_weight: float = 1.0, feat_weight: float = 3000.0, student_layers=None, teacher_layers=None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(ce_weight, feat_weight, student_layers, teacher_layers, label_smoothing)

    def default_layers(self, student_stages: int, teacher_stages: int) -> tuple[list[Layer], list[Layer]]:
        return [-1], [-1]

    def pair_loss(self, index: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        return sp_loss(f_s, f_t)
