"""Single-label L2 + LSH feature mimicking on the teacher's correct samples (``lshl2_s``).

Wang, Ge, Wu, "Distilling Knowledge by Mimicking Features", TPAMI 2021, arXiv:2011.01424
(LSHFM's single-label code, ``LSH_S``). Only the samples the teacher classifies correctly
are mimicked:

.. math::

    \\ell_i = \\frac1D\\sum_d (f_{s,id} - f_{t,id})^2
             + \\frac1N\\sum_j \\mathrm{BCEWithLogits}(w_j^\\top f_{s,i} + b_j,\\ y_{ij}), \\qquad
    m_i = \\mathbb 1\\big[\\arg\\max_c z_{t,ic} = y_i\\big]

    L = \\gamma\\,\\mathrm{CE}_\\epsilon(z_s, y) + \\beta\\,\\frac{\\sum_i m_i\\,\\ell_i}{\\max(1, \\sum_i m_i)}

With soft (MixUp/CutMix) targets :math:`y_i` is the target's argmax. When the teacher gets no
sample of the batch right the feature term is 0 (a tensor still connected to the graph; LSHFM
divides by zero there and gets NaN). LSHFM's CIFAR-100 recipe: CE + 6·this (β = 6, γ = 1).

Knobs and context: as ``lsh`` (``beta`` 1, ``gamma`` 1, ``num_hyperplanes`` None = 32·D,
``sigma`` None = teacher classifier std, ``bias`` "median", ``force_feat_fc`` False;
``label_smoothing``, ``lsh``), multiclass only (no ``multilabel``). Terms logged: ``ce``, and
``l2`` and ``lsh``, the two halves of the masked mean (their sum is the feature term).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kdlib.losses._common import require_features, require_teacher
from kdlib.losses.ce import ce_loss
from kdlib.losses.l2 import l2_loss_per_sample
from kdlib.losses.lsh import LSHHyperplanes, LSHMethodBase, lsh_loss_per_sample
from kdlib.losses.registry import MULTICLASS, LossOutput, StudentOutput, TeacherOutput, register_method


def teacher_correct_mask(teacher_logits: Tensor, targets: Tensor) -> Tensor:
    """``(B,)`` bool: the teacher's argmax equals the label (the argmax of soft ``(B, C)`` targets)."""
    labels = targets.argmax(dim=-1) if targets.ndim == 2 else targets
    return teacher_logits.detach().argmax(dim=-1) == labels


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values[mask]``; 0 (connected to the graph) when the mask is empty."""
    selected = torch.where(mask, values, torch.zeros_like(values))
    return selected.sum() / mask.sum().clamp(min=1)


def lshl2_s_terms(
    student_features: Tensor,
    teacher_features: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    hyperplanes: LSHHyperplanes,
) -> tuple[Tensor, Tensor]:
    """The L2 and LSH halves of the masked feature term, each averaged over the correct samples."""
    mask = teacher_correct_mask(teacher_logits, targets)
    l2 = masked_mean(l2_loss_per_sample(student_features, teacher_features), mask)
    lsh = masked_mean(lsh_loss_per_sample(student_features, teacher_features, hyperplanes), mask)
    return l2, lsh


def lshl2_s_loss(
    student_features: Tensor,
    teacher_features: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    hyperplanes: LSHHyperplanes,
) -> Tensor:
    """``Σ_i m_i (mean_d (f_s−f_t)² + mean_j BCE_ij) / max(1, Σ_i m_i)`` with ``m_i`` = teacher correct."""
    l2, lsh = lshl2_s_terms(student_features, teacher_features, teacher_logits, targets, hyperplanes)
    return l2 + lsh


@register_method("lshl2_s")
class LSHL2SLoss(LSHMethodBase):
    """``γ·CE_ε + β·(masked L2 + LSH)`` (see the module docstring)."""

    needs_teacher = True
    needs_features = True
    uses_distillation_token = False
    tasks = (MULTICLASS,)
    soft_targets = "argmax"  # its per-sample mask compares the teacher with the dominant class
    uses_progress = False
    uses_positions = False
    uses_layers = False

    def __init__(
        self,
        beta: float = 1.0,
        gamma: float = 1.0,
        num_hyperplanes: int | None = None,
        sigma: float | None = None,
        bias: str = "median",
        force_feat_fc: bool = False,
        label_smoothing: float = 0.0,
        lsh: LSHHyperplanes | None = None,
    ):
        super().__init__(beta, gamma, num_hyperplanes, sigma, bias, force_feat_fc, label_smoothing, False, lsh)

    def forward(
        self, student: StudentOutput, targets: Tensor, teacher: TeacherOutput | None = None
    ) -> LossOutput:
        teacher = require_teacher("lshl2_s", teacher)
        f_s, f_t = require_features("lshl2_s", student, teacher)
        hyperplanes = self.hyperplanes("lshl2_s")
        hard = ce_loss(student.logits, targets, self.label_smoothing)
        l2, lsh = lshl2_s_terms(f_s, f_t, teacher.logits, targets, hyperplanes)
        total = self.gamma * hard + self.beta * (l2 + lsh)
        return LossOutput(total, {"ce": hard.detach(), "l2": l2.detach(), "lsh": lsh.detach()})
