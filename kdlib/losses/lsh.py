"""Locality-sensitive-hashing feature mimicking (``lsh``) and its fixed hyperplanes.

Wang, Ge, Wu, "Distilling Knowledge by Mimicking Features", TPAMI 2021, arXiv:2011.01424
(LSHFM, ``DoctorKey/LSHFM.*``). The student mimics the teacher's pooled penultimate feature
:math:`f_t \\in \\mathbb R^D` (its own, after a ``feat_fc`` projection to width D, is
:math:`f_s`). The LSH loss matches the feature's *direction* through N random hyperplanes and
leaves its magnitude free:

.. math::

    W \\in \\mathbb R^{N\\times D},\\ W_{jd} \\sim \\mathcal N(0, \\sigma^2), \\qquad
    y_{ij} = \\mathbb 1\\big[w_j^\\top f_t(x_i) + b_j > 0\\big]

    \\mathcal L_{LSH} = \\frac{1}{BN}\\sum_{i=1}^{B}\\sum_{j=1}^{N}
        \\mathrm{BCEWithLogits}\\big(w_j^\\top f_s(x_i) + b_j,\\ y_{ij}\\big)

and the method ``lsh`` is :math:`L = \\gamma\\,\\mathcal L_{hard} + \\beta\\,\\mathcal L_{LSH}` with
:math:`\\mathcal L_{hard}` = CE_ε (multiclass) or BCE (``multilabel=True``).

``W`` and ``b`` are fixed (buffers, never trained), fitted once on the teacher's features of the
training set by :func:`fit_lsh_hyperplanes`: σ defaults to the standard deviation of the
teacher's classifier weight (as in LSHFM; its ImageNet script uses 0.06 for an R34 teacher), N to 32·D
(LSHFM's scripts use 2048 for VOC R34→R18 and COCO, 8192 for R101 students), and the bias to
``median``: :math:`b_j = -\\mathrm{median}_i\\, w_j^\\top f_t(x_i)`, which makes every hash bit
balanced on the fitting set. ``mean`` (:math:`-\\mathrm{mean}_i`) and ``zero`` are LSHFM's
alternatives (its ImageNet run effectively uses 0). For an even number of samples we take the
midpoint of the two middle values (numpy's median): LSHFM uses ``torch.median``'s lower middle value,
which leaves that sample's projection at exactly 0, a tie that float rounding breaks either way;
the midpoint splits distinct projections exactly M/2 : M/2.

Knobs (stored as attributes of the same names; the setup ones are read by the stage):
``beta`` β (default 1, ≥ 0), ``gamma`` γ (default 1, ≥ 0; 0 for LSHFM's stage 1, which trains only
``feat_fc``), ``num_hyperplanes`` (None = 32·D, else an int ≥ 1), ``sigma`` (None = the teacher
classifier's weight std, else > 0), ``bias`` (``"median"`` | ``"mean"`` | ``"zero"``),
``force_feat_fc`` (default False: project the student feature through a Linear even when the
widths match, LSHFM's ``force_2FC``). Context: ``label_smoothing``, ``multilabel``, and ``lsh`` (the
:class:`LSHHyperplanes`, may be None at construction and set afterwards). Terms logged:
``ce``/``bce`` and ``lsh`` (unweighted).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.losses._common import (
    check_bool,
    check_choice,
    check_nonnegative,
    check_optional_int,
    check_optional_positive,
    check_smoothing,
    require_features,
)
from kdlib.losses.ce import hard_loss
from kdlib.losses.base import Method, SetupContext
from kdlib.losses.registry import MULTICLASS, MULTILABEL, LossOutput, StudentOutput, TeacherOutput, register_method

BIAS_MODES = ("median", "mean", "zero")
HYPERPLANES_PER_DIM = 32  # LSHFM's default N = 32·D


class LSHHyperplanes(nn.Module):
    """N fixed hyperplanes ``w_j·f + b_j`` in the teacher's feature space (buffers, no gradient).

    ``weight`` is ``(N, D)``, ``bias`` ``(N,)``; both are stored as float32 and saved in the
    ``state_dict`` (rebuild with :meth:`from_state_dict`). Projections are computed in float32
    with autocast off, so the teacher's bits do not depend on the training precision.
    """

    weight: Tensor
    bias: Tensor

    def __init__(self, weight: Tensor, bias: Tensor):
        super().__init__()
        if weight.ndim != 2 or bias.ndim != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(
                "LSH hyperplanes need weight (N, D) and bias (N,), "
                f"got {tuple(weight.shape)} and {tuple(bias.shape)}"
            )
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", bias.detach().float().clone())

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> "LSHHyperplanes":
        return cls(state["weight"], state["bias"])

    @property
    def num_hyperplanes(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def extra_repr(self) -> str:
        return f"num_hyperplanes={self.num_hyperplanes}, dim={self.dim}"

    def project(self, features: Tensor) -> Tensor:
        """``features @ weight.T + bias``: ``(B, D)`` → ``(B, N)`` logits of the hash bits."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"LSH hyperplanes of dimension {self.dim} got features of shape {tuple(features.shape)}"
            )
        weight = self.weight.to(features.device)
        bias = self.bias.to(features.device)
        with torch.autocast(features.device.type, enabled=False):
            return features.float() @ weight.T + bias

    def bits(self, teacher_features: Tensor) -> Tensor:
        """The teacher's hash code ``(project(f_t) > 0)`` as float 0/1, ``(B, N)``, no gradient."""
        with torch.no_grad():
            return (self.project(teacher_features.detach()) > 0).float()


def row_median(rows: Tensor) -> Tensor:
    """Median of each row of ``(n, M)``, the midpoint of the two middle values for even M.

    ``torch.median`` gives the lower middle value; that of ``-rows`` negated is the upper one
    (both are the middle value for odd M). Two selections are ~4× faster than a sort."""
    return 0.5 * (rows.median(dim=1).values - rows.neg().median(dim=1).values)


def fit_lsh_hyperplanes(
    teacher_features: Tensor,
    classifier_weight: Tensor | None,
    num_hyperplanes: int | None = None,
    sigma: float | None = None,
    bias: str = "median",
    seed: int = 0,
    chunk_size: int | None = None,
) -> LSHHyperplanes:
    """Draw ``W ~ N(0, σ²)`` and fit the bias on the teacher's training-set features.

    Args:
        teacher_features: ``(M, D)`` pooled teacher features of the fitting set (no gradient).
        classifier_weight: the teacher classifier's weight; its std is the default σ.
        num_hyperplanes: N; ``None`` = 32·D.
        sigma: std of the Gaussian entries; ``None`` = ``classifier_weight.std()``.
        bias: ``"median"`` (b_j = −median_i w_j·f_i; balanced bits), ``"mean"`` (−mean_i) or
            ``"zero"``.
        seed: seed of the CPU ``torch.Generator`` that draws W (float32, deterministic).
        chunk_size: hyperplanes projected at a time for the median, so memory stays about
            ``M × chunk_size`` floats; ``None`` = about 2**24 / M (64 MiB of float32).

    Returns:
        :class:`LSHHyperplanes` on the CPU.
    """
    num_hyperplanes = check_optional_int("num_hyperplanes", num_hyperplanes, 1, "32·D")
    sigma = check_optional_positive("sigma", sigma, "the teacher classifier's weight std")
    check_choice("bias", bias, BIAS_MODES)
    chunk_size = check_optional_int("chunk_size", chunk_size, 1, "about 2**24 / M")
    if teacher_features.ndim != 2 or teacher_features.shape[0] < 1:
        raise ValueError(f"teacher_features must be (M, D) with M >= 1, got {tuple(teacher_features.shape)}")
    features = teacher_features.detach().float()
    m, d = features.shape
    if sigma is None:
        if classifier_weight is None:
            raise ValueError(
                "fit_lsh_hyperplanes needs sigma or the teacher's classifier_weight (its std is the default sigma)"
            )
        sigma = float(classifier_weight.detach().float().std())
        if not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma (the std of the teacher's classifier weight) must be finite and > 0, got {sigma}")
    n = HYPERPLANES_PER_DIM * d if num_hyperplanes is None else num_hyperplanes

    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    weight = torch.randn(n, d, generator=generator, dtype=torch.float32) * sigma
    if bias == "zero":
        offset = torch.zeros(n)
    elif bias == "mean":  # −mean_i w_j·f_i = −w_j·mean_i f_i, exact in float64
        mean_feature = features.cpu().double().mean(dim=0)
        offset = -(weight.double() @ mean_feature).float()
    else:
        step = chunk_size or max(1, min(n, (1 << 24) // m))
        offset = torch.empty(n)
        with torch.no_grad():
            for start in range(0, n, step):
                block = weight[start : start + step].to(features.device)
                offset[start : start + step] = -row_median(block @ features.T).cpu()  # (chunk, M)
    return LSHHyperplanes(weight, offset)


def lsh_loss_per_sample(student_features: Tensor, teacher_features: Tensor, hyperplanes: LSHHyperplanes) -> Tensor:
    """``(B,)``: ``mean_j BCEWithLogits(w_j·f_s + b_j, bit_j(f_t))`` for each sample."""
    targets = hyperplanes.bits(teacher_features)
    logits = hyperplanes.project(student_features)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)


def lsh_loss(student_features: Tensor, teacher_features: Tensor, hyperplanes: LSHHyperplanes) -> Tensor:
    """``mean over B and N of BCEWithLogits(W f_s + b, bits(f_t))``; no gradient into W, b or f_t."""
    return lsh_loss_per_sample(student_features, teacher_features, hyperplanes).mean()


class LSHMethodBase(Method):
    """Knobs and hyperplane handling shared by ``lsh``, ``lshl2`` and ``lshl2_s`` (not registered).

    :meth:`setup` fits the hyperplanes on the teacher's features of one view of every training
    image (the first, as LSHFM's one pass over its training loader), with σ from the teacher's
    classifier weight; :meth:`fitted_state` records the fit: the bias, the seed that drew ``W`` and
    ``W``'s standard deviation.
    """

    context_args = ("label_smoothing", "multilabel", "lsh")
    lsh: LSHHyperplanes | None

    def __init__(
        self,
        beta: float = 1.0,
        gamma: float = 1.0,
        num_hyperplanes: int | None = None,
        sigma: float | None = None,
        bias: str = "median",
        force_feat_fc: bool = False,
        label_smoothing: float = 0.0,
        multilabel: bool = False,
        lsh: LSHHyperplanes | None = None,
    ):
        super().__init__()
        self.beta = check_nonnegative("beta", beta)
        self.gamma = check_nonnegative("gamma", gamma)
        self.num_hyperplanes = check_optional_int("num_hyperplanes", num_hyperplanes, 1, "32·D")
        self.sigma = check_optional_positive("sigma", sigma, "the teacher classifier's weight std")
        self.bias = check_choice("bias", bias, BIAS_MODES)
        self.force_feat_fc = check_bool("force_feat_fc", force_feat_fc)
        self.multilabel = check_bool("multilabel", multilabel)
        self.label_smoothing = check_smoothing(label_smoothing, self.multilabel)
        if lsh is not None and not isinstance(lsh, LSHHyperplanes):
            raise ValueError(f"lsh must be LSHHyperplanes or None, got {type(lsh).__name__}")
        self.lsh = lsh
        self._fit_seed: int | None = None

    def setup(self, context: SetupContext) -> None:
        classifier = context.teacher.get_classifier()
        weight = (classifier[0] if isinstance(classifier, tuple) else classifier).weight.detach().cpu()
        self.fit_hyperplanes(context.first_view_features().float(), weight, context.seed)

    def fitted_state(self) -> dict[str, Any]:
        if self.lsh is None:
            return {}
        return {"bias": self.lsh.bias.cpu(), "seed": self._fit_seed, "weight_std": float(self.lsh.weight.std())}

    def fit_hyperplanes(
        self, teacher_features: Tensor, classifier_weight: Tensor | None, seed: int = 0
    ) -> LSHHyperplanes:
        """Fit :func:`fit_lsh_hyperplanes` with this method's knobs and install the result as ``lsh``."""
        self.lsh = fit_lsh_hyperplanes(
            teacher_features, classifier_weight, self.num_hyperplanes, self.sigma, self.bias, seed
        )
        self._fit_seed = int(seed)
        return self.lsh

    def hyperplanes(self, method: str) -> LSHHyperplanes:
        if not isinstance(self.lsh, LSHHyperplanes):
            raise RuntimeError(
                f"the {method!r} method has no LSH hyperplanes: call setup() (or set `lsh` to "
                "fit_lsh_hyperplanes on the teacher's training-set features) before the first forward"
            )
        return self.lsh


@register_method("lsh")
class LSHLoss(LSHMethodBase):
    """``γ·hard + β·L_LSH`` (see the module docstring)."""

    needs_teacher = True
    needs_features = True
    uses_distillation_token = False
    tasks = (MULTICLASS, MULTILABEL)
    soft_targets = "mixed"
    uses_progress = False
    uses_positions = False
    uses_layers = False

    def forward(
        self, student: StudentOutput, targets: Tensor, teacher: TeacherOutput | None = None
    ) -> LossOutput:
        f_s, f_t = require_features("lsh", student, teacher)
        hyperplanes = self.hyperplanes("lsh")
        name, hard = hard_loss(student.logits, targets, self.label_smoothing, self.multilabel)
        feature = lsh_loss(f_s, f_t, hyperplanes)
        total = self.gamma * hard + self.beta * feature
        return LossOutput(total, {name: hard.detach(), "lsh": feature.detach()})
