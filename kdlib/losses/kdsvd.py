"""Knowledge distillation by singular value decomposition (``kdsvd``).

Lee, Kim & Song, "Self-supervised Knowledge Distillation Using Singular Value Decomposition", ECCV 2018,
arXiv:1807.06819. Each paired layer's map, flattened per image to ``X ∈ R^{(H·W)×C}`` (rows: positions,
columns: channels, the TensorFlow original's NHWC layout), is decomposed ``X = U Σ Vᵀ``. The teacher keeps its
first ``k`` right singular vectors, the student its first ``k + 3``; for each teacher vector the student's most
(absolutely) cosine-similar one is taken, with the cosine's sign. Both are scaled by the teacher's first ``k``
singular values, L2-normalized over those ``k``:

.. math::

    \\tilde V^{t}_l = V^{t}_{l,:k}\\,\\mathrm{diag}(\\hat\\sigma^t_l), \\qquad
    \\tilde V^{s}_l = V^{s}_{l,:k+3}\\,M_l\\,\\mathrm{diag}(\\hat\\sigma^t_l), \\qquad
    M_{l,ij} = \\mathrm{sign}(\\cos_{ij})\\,[\\,|\\cos_{ij}| = \\max_{i'} |\\cos_{i'j}|\\,]

and the relation of two consecutive layers is a Gaussian RBF of every pair of entries of a vector,
``R_l[a, b, j] = exp(−(Ṽ_{l}[a, j] − Ṽ_{l−1}[b, j])² / 8)``. The loss matches the student's relations to the
teacher's:

.. math::

    L = w_{ce}\\,\\mathrm{CE}_\\epsilon(z_s, y) + w_{feat}\\,\\frac{1}{B}\\sum_{l \\ge 1}
        \\sum_{i, a, b, j} \\big(R^s_{l,i}[a, b, j] - R^t_{l,i}[a, b, j]\\big)^2

(non-finite squared differences count as 0). Knobs (mdistiller's ``KDSVD`` defaults): ``k`` 1, ``ce_weight``
1, ``feat_weight`` 1 (weights do not depend on the schedule length, so nothing is scaled), ``student_layers``
/ ``teacher_layers`` null = every stage after the stem, paired from the deepest (mdistiller's ``feats[1:]``;
:func:`kdlib.losses._layers.last_stages`). Terms logged: ``ce``, ``svd`` (unweighted).

Sources: the arithmetic is the author's ``KD_SVD`` (github.com/sseung0703/KD_methods_with_TF,
``nets/Shared.py`` and ``nets/SVP.py``, MIT), which mdistiller ports to PyTorch
(``mdistiller/distillers/KDSVD.py``). The author's two other versions differ from it and are not followed,
except where said below: the ECCV code (SSKD_SVD ``nets/Distillation.py``) flips the teacher's vectors to the
student's and weights ``tf.nn.l2_loss`` by ``√k``; the TensorFlow 2 code projects the student's (connected) map
on the teacher's left singular vectors instead of decomposing it, and clips the distillation gradient to the
norm of the CE one. Differences from KD_methods_with_TF / mdistiller, and why:

* **Layout.** mdistiller's ``svd`` does ``feat.view(B, C·H, W)`` on PyTorch's NCHW maps — the TensorFlow
  ``reshape(X, [B, H·W, C])`` transcribed without moving the channels last — so it decomposes a
  ``(C·H) × W`` matrix: its "right singular vectors" run over the map's *width*, not its channels, and the
  relations compare columns of pixels. This method permutes to NHWC first, as the original's layout is
  (the golden test feeds mdistiller's functions NHWC maps to compare the arithmetic, and shows the raw
  view gives another value).
* **Batch mean.** mdistiller divides the summed squared differences by the batch size (kept, with its
  weights); the author's TensorFlow code sums over the batch without dividing, so its weight 1 is ``B``
  times this one.
* **Gradient of the SVD.** Only the student's SVD is differentiated (the teacher's maps are detached, as the
  original's teacher is frozen and its relation is under ``stop_gradient``). The gradient is the analytic
  derivative of ``(σ, V)`` (Townsend 2016), which is what ``torch.svd`` gives mdistiller and the form of the
  ECCV code's ``Svd_grad`` (github.com/sseung0703/SSKD_SVD, ``nets/Distillation.py``, which also restricts it to
  the first five singular triplets), with the author's guard (KD_methods_with_TF ``nets/SVP.py``): the
  coupling ``1 / (σ_j² − σ_i²)`` of two equal singular values is 0 rather than inf (``removenan(KT)``), and
  ``1/σ`` is ``1/(σ + 1e-8)`` (``left_grad``). PyTorch's own backward gives NaN there (0/0, e.g. on an all-zero
  map: a dead stage), which mdistiller's ``removenan`` does not catch, as it cleans only the forward (tested).
  Where the singular values are distinct the gradient is PyTorch's (tested, and against finite differences).
  The author's later code (KD_methods_with_TF, Knowledge_distillation_via_TF2.0) drops the ``/2`` of ``msym``,
  doubling the rotation part of the gradient; the ECCV code and PyTorch do not, and neither does this method.
  As in both originals the SVD runs in float32 (no float64).
* **Unequal channel counts.** The relations of a pair compare ``C``-dimensional vectors, so the original
  needs a student as wide as the teacher at every paired layer (its ResNets share their widths). When a
  pair's widths differ (cnn_small's 64 channels against resnet18's 256 and 512), the student's map first
  goes through a 1×1 convolution and BatchNorm to the teacher's width, as the author's TensorFlow 2 version
  does (``aux_layers`` in Knowledge_distillation_via_TF2.0, ``distiller/KDSVD.py``); these connectors are the
  method's own parameters and train with the student. Equal widths get no connector.

As in the original, the loss depends on the sign the SVD routine gives each teacher vector (the student's are
aligned to it, but the relation of two layers' vectors changes when one flips): the same batch may give
another value with another LAPACK / cuSOLVER build. Both originals take whatever sign the routine returns.

Refused up front: fewer than two layer pairs (the loss relates consecutive layers; one pair gives a constant
0), a layer that is not a ``(C, H, W)`` map, and a teacher layer with fewer than ``k`` singular vectors
(``min(H·W, C) < k``). Tiny maps are fine: a 1×1 map has one singular vector (its normalized feature vector)
and the guarded gradient stays finite (tested on 1×1 and 2×2 maps).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.losses._layers import LayerMethod, spatial_maps
from kdlib.losses.registry import MULTICLASS, register_method
from kdlib.taps import Layer, LayerPlan

RBF_SCALE = 8.0  # the original's exp(-d² / 8)
STUDENT_EXTRA = 3  # the student keeps k + 3 singular vectors to choose its matches from (the original's K + 3)


class _GuardedSVD(torch.autograd.Function):
    """``(σ, V)`` of the reduced SVD of a batch ``(B, M, N)``; backward: Townsend's derivative with the
    author's guard against equal (or zero) singular values."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh.mT
        ctx.save_for_backward(u, s, v)
        return s, v

    @staticmethod
    def backward(ctx: Any, grad_s: Tensor | None, grad_v: Tensor | None) -> Tensor:  # type: ignore[override]
        u, s, v = ctx.saved_tensors
        inner = torch.zeros(s.shape + s.shape[-1:], dtype=s.dtype, device=s.device)
        if grad_s is not None:
            inner = inner + torch.diag_embed(grad_s)
        grad_x = u @ inner @ v.mT
        if grad_v is not None:
            s2 = s * s
            coupling = 1.0 / (s2.unsqueeze(-2) - s2.unsqueeze(-1))  # [i, j] = 1 / (σ_j² − σ_i²)
            # equal singular values (inf, and the diagonal): no coupling, as the author's removenan(KT)
            coupling = torch.where(torch.isfinite(coupling), coupling, torch.zeros_like(coupling))
            coupling.diagonal(dim1=-2, dim2=-1).zero_()
            vt_gv = v.mT @ grad_v
            grad_x = grad_x + u @ (s.unsqueeze(-1) * (coupling * (vt_gv - vt_gv.mT))) @ v.mT
            if v.shape[-2] > v.shape[-1]:  # more columns than singular values: the part outside span(V)
                outside = grad_v.mT - (grad_v.mT @ v) @ v.mT
                grad_x = grad_x + (u / (s + 1e-8).unsqueeze(-2)) @ outside
        return grad_x


def removenan(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def nhwc_rows(feature: Tensor) -> Tensor:
    """``(B, H·W, C)``: each image's map with positions as rows and channels as columns (the original's NHWC)."""
    b, c, h, w = feature.shape
    return feature.permute(0, 2, 3, 1).reshape(b, h * w, c)


def truncated_svd(feature: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` singular values (L2-normalized together, ``(B, n')``) and right singular vectors
    (each unit-norm, ``(B, C, n')``) of a ``(B, C, H, W)`` map in NHWC layout; ``n' = min(n, H·W, C)``."""
    s, v = _GuardedSVD.apply(nhwc_rows(feature.float()))
    s, v = removenan(s), removenan(v)
    return F.normalize(s[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)


def align_rsv(v_s: Tensor, v_t: Tensor) -> Tensor:
    """For each teacher vector, the student vector of the largest absolute cosine, with the cosine's sign
    (the original's ``Align_rsv``; a tie keeps the sum of the tied ones, as the original's mask does)."""
    cosine = v_s.mT @ v_t
    best = cosine.abs().amax(dim=1, keepdim=True)
    mask = torch.where(best == cosine.abs(), torch.sign(cosine), torch.zeros_like(cosine))
    return v_s @ mask


def rbf(v: Tensor, v_before: Tensor) -> Tensor:
    """``(B, D, D_before, k)``: ``exp(−(v[a, j] − v_before[b, j])² / 8)`` for every entry pair of each column."""
    return torch.exp(-(v.unsqueeze(2) - v_before.unsqueeze(1)).pow(2) / RBF_SCALE)


def kdsvd_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], k: int = 1) -> Tensor:
    """``(1/B)·Σ_{l≥1} Σ (R^s_l − R^t_l)²`` over consecutive layers of equal-width student and teacher maps
    (teacher maps detached by the caller; see the module docstring)."""
    losses = []
    before: tuple[Tensor, Tensor] | None = None
    for f_s, f_t in zip(student, teacher):
        s_t, v_t = truncated_svd(f_t, k)
        _, v_s = truncated_svd(f_s, k + STUDENT_EXTRA)
        v_s = align_rsv(v_s, v_t)
        weight = s_t.unsqueeze(1)
        v_t, v_s = v_t * weight, v_s * weight
        if before is not None:
            v_sb, v_tb = before
            diff = (rbf(v_s, v_sb) - rbf(v_t, v_tb).detach()).pow(2)
            losses.append(removenan(diff).sum())
        before = (v_s, v_t)
    return sum(losses, student[0].new_zeros(())) / student[0].shape[0]


class Connector(nn.Module):
    """1×1 convolution + BatchNorm from the student's width to the teacher's (the author's TF2 ``aux_layers``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_in", nonlinearity="relu")  # TF's he_normal
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


@register_method("kdsvd")
class KDSVDLoss(LayerMethod):
    """``w_ce·CE + w_feat·KDSVD`` over consecutive layer pairs (see the module docstring)."""

    needs_teacher = True
    needs_features = False
    uses_distillation_token = False
    uses_layers = True
    tasks = (MULTICLASS,)
    soft_targets = "mixed"  # the SVD terms use no labels
    uses_progress = False
    uses_positions = False
    method_name, feat_term = "kdsvd", "svd"

    def __init__(self, k: int = 1, ce_weight: float = 1.0, feat_weight: float = 1.0,
                 student_layers: Sequence[Layer] | None = None, teacher_layers: Sequence[Layer] | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(ce_weight, feat_weight, student_layers, teacher_layers, label_smoothing)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k (singular vectors distilled per layer) must be an integer >= 1, got {k!r}")
        self.k = k
        self.connectors = nn.ModuleList()

    def layer_problem(self, plan: LayerPlan) -> str | None:
        problem = spatial_maps("kdsvd", plan)
        if problem is not None:
            return problem
        if len(plan.student) < 2:
            return (f"kdsvd relates consecutive layers and needs at least 2 layer pairs; got 1 "
                    f"({plan.student[0]} → {plan.teacher[0]}); list more with student_layers / teacher_layers")
        for path, (c, h, w) in zip(plan.teacher, plan.teacher_shapes):
            if min(h * w, c) < self.k:
                return (f"kdsvd keeps k={self.k} singular vectors of each teacher layer, but {path} "
                        f"({c}×{h}×{w}) has only {min(h * w, c)}; lower k or choose other teacher_layers")
        return None

    def build_adapters(self, plan: LayerPlan) -> None:
        self.connectors = nn.ModuleList(
            nn.Identity() if s[0] == t[0] else Connector(s[0], t[0])
            for s, t in zip(plan.student_shapes, plan.teacher_shapes))

    def feature_loss(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        if len(self.connectors) == len(student):
            student = [connect(f) for connect, f in zip(self.connectors, student)]
        else:  # not set up: no connectors, so the widths must already match
            for i, (f_s, f_t) in enumerate(zip(student, teacher)):
                if f_s.shape[1] != f_t.shape[1]:
                    raise ValueError(f"kdsvd pair {i}: the student's {f_s.shape[1]} channels differ from the "
                                     f"teacher's {f_t.shape[1]} and no connector is built (call setup first)")
        return kdsvd_loss(student, teacher, self.k)
