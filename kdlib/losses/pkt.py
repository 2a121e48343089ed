"""Probabilistic knowledge transfer (``pkt``).

Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018,
arXiv:1803.10837. The student matches the teacher's conditional distribution of neighbours in feature
space: cosine similarities over the batch, mapped to [0, 1] and normalized per row, compared by KL:

.. math::

    L = w_{ce}\\,\\mathrm{CE}_\\epsilon(z_s, y) + w_{feat}\\,\\frac{1}{B^2}\\sum_{i,j}
        p^t_{j|i} \\log\\frac{p^t_{j|i} + \\varepsilon}{p^s_{j|i} + \\varepsilon}, \\qquad
        p_{j|i} = \\frac{(1 + \\cos(f_i, f_j))/2}{\\sum_k (1 + \\cos(f_i, f_k))/2}

on the pooled pre-logits features of both nets (any widths), :math:`\\varepsilon = 10^{-7}`. Knobs
(mdistiller's ``PKT`` defaults): ``ce_weight`` 1, ``feat_weight`` 30000, ``student_layers`` /
``teacher_layers`` null = ``[pre_logits]`` (another layer is flattened). Terms logged: ``ce``, ``pkt``
(unweighted). Tested against mdistiller's ``pkt_loss``; unlike it, an all-zero feature row (a dead
ReLU layer) gets a zero gradient, not NaN.
"""
from __future__ import annotations

from torch import Tensor

from kdlib.losses._layers import LayerMethod
from kdlib.losses.registry import MULTICLASS, register_method
from kdlib.taps import PRE_LOGITS, Layer

EPS = 1e-7  # the authors' (and mdistiller's) eps


def _unit_rows(f: Tensor) -> Tensor:
    f = f.reshape(f.shape[0], -1)
    # torch's norm has a zero gradient at a zero row; mdistiller's sqrt(sum(f²)) sends NaN into the student
    # (a dead ReLU feature vector), which would stop training here
    f = f / (f.norm(dim=1, keepdim=True) + EPS)
    return f.nan_to_num(nan=0.0)  # mdistiller zeroes NaNs (f[f != f] = 0)


def _neighbour_probabilities(f: Tensor) -> Tensor:
    similarity = (_unit_rows(f) @ _unit_rows(f).t() + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """Mean over the B×B entries of ``p_t · log((p_t + ε) / (p_s + ε))``."""
    p_s, p_t = _neighbour_probabilities(f_s), _neighbour_probabilities(f_t)
    return (p_t * ((p_t + EPS) / (p_s + EPS)).log()).mean()


@register_method("pkt")
class PKTLoss(LayerMethod):
    """``w_ce·CE + w_feat·Σ_pairs PKT`` (see the module docstring)."""

    needs_teacher = True
    needs_features = False
    uses_distillation_token = False
    uses_layers = True
    tasks = (MULTICLASS,)
    soft_targets = "mixed"
    uses_progress = False
    uses_positions = False
    method_name, feat_term = "pkt", "pkt"

    def __init__(self, ce_weight: float = 1.0, feat_weight: float = 30000.0, student_layers=None,
                 teacher_layers=None, label_smoothing: float = 0.0) -> None:
        super().__init__(ce_weight, feat_weight, student_layers, teacher_layers, label_smoothing)

    def default_layers(self, student_stages: int, teacher_stages: int) -> tuple[list[Layer], list[Layer]]:
        return [PRE_LOGITS], [PRE_LOGITS]

    def pair_loss(self, index: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        return pkt_loss(f_s, f_t)
