"""Knowledge review (``reviewkd``).

Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021, arXiv:2104.09044. The
student's stage maps :math:`F^s_1 … F^s_n` (shallow to deep, the last one the pooled feature as a
``(C, 1, 1)`` map) are fused from the deepest down by attention-based fusion modules (ABF, owned by the
method): each maps its stage to ``m`` channels (1×1 conv + BN), mixes it with the fused map from the stage
below it (resized to its size) through two sigmoid attention maps, and outputs the fused map resized to the
teacher's size through a 3×3 conv + BN to the teacher's channels; each output is compared with the
teacher's map of the same depth by the hierarchical context loss (HCL):

.. math::

    R_n = A_n(F^s_n), \\qquad
    (R_i, P_i) = A_i(F^s_i, P_{i+1}), \\qquad
    P_i = a_i \\odot c_i(F^s_i) + b_i \\odot \\mathrm{up}(P_{i+1}), \\quad
    (a_i, b_i) = \\sigma\\big(W_i [c_i(F^s_i); \\mathrm{up}(P_{i+1})]\\big)

    L = w_{ce}\\,\\mathrm{CE}_\\epsilon(z_s, y) + w_{feat}\\,\\min\\!\\Big(\\frac{e}{W}, 1\\Big)
        \\sum_{i=1}^{n} \\mathrm{HCL}(R_i, F^t_i), \\qquad
    \\mathrm{HCL}(R, T) = \\frac{\\mathrm{MSE}(R, T) + \\sum_{k} 2^{-k}\\,
        \\mathrm{MSE}(\\mathrm{pool}_{l_k}(R), \\mathrm{pool}_{l_k}(T))}{1 + \\sum_k 2^{-k}}

where :math:`R_i = \\mathrm{BN}(\\mathrm{conv}_{3×3}(\\mathrm{resize}(P_i)))`, ``c_i`` is ABF i's 1×1 conv +
BN, ``pool_l`` the adaptive average pool to l×l and :math:`l_1, l_2, … ` the sizes of 4, 2, 1 below the map's
height H (k counts them from 1), MSE the mean over every element, ``e`` the 1-based epoch: the review term
ramps up over the first W epochs. ``m = min(max_mid_channels, channels of the deepest student map)``.

Layers (``layer_request``, from :meth:`ReviewKDLoss.default_layers`): every stage after the stem of each net,
paired from the deepest (a student with fewer stages meets the teacher's last ones), then ``"pre_logits"`` of both — mdistiller's
``feats[1:] + [pooled_feat]``. ``student_layers`` / ``teacher_layers`` override them (shallow to deep; a
``pre_logits`` vector becomes a ``(C, 1, 1)`` map, every other layer must give a ``(C, H, W)`` map). A model
whose stages are not maps (a ViT's tokens, the ``mlp``'s vectors) or that lists no stages is refused before
any work, naming the model and the layer.

Knobs (mdistiller's ``CFG.REVIEWKD`` defaults, which are the authors' ``train.py`` defaults): ``ce_weight`` 1,
``feat_weight`` 1 (``REVIEWKD_WEIGHT``; its CIFAR-100 recipes use 5, the authors' 0.6 to 8 per pair),
``warmup`` W = 20 epochs (0: none; ``WARMUP_EPOCHS``, for 240 CIFAR epochs; ImageNet: 1 of 100),
``max_mid_channels`` 512, ``student_layers`` / ``teacher_layers`` null (the above); context: the student
preset's ``label_smoothing`` on the CE term. Terms logged: ``ce``, ``hcl`` (the unweighted sum of HCLs) and
``warmup`` (the ramp factor). The ABFs' parameters are the distilled student's extra parameters, built in
``setup`` from the plan's shapes (mdistiller's hand-written ``IN_CHANNELS``/``OUT_CHANNELS``/``SHAPES``/
``OUT_SHAPES`` per pair of models are these shapes).

Differences from mdistiller's ``ReviewKD`` (``mdistiller/distillers/ReviewKD.py``, tested on its code with
the same ABF weights):

* None in which maps are read: as the original, the teacher's stages are its *pre-ReLU* outputs
  (``preact_feats[1:]``; ``"pre_relu:<i>"`` in :mod:`kdlib.taps`, which :mod:`kdlib.models.pre_relu` knows for
  resnet, mobilenetv2/v3, cnn_small and rescnn: another teacher is refused before any work), and the student's
  its post-activation outputs, or its pre-ReLU ones with ``student_preact: true`` (mdistiller's
  ``STU_PREACT``, true in its ImageNet recipes).
* ``max_mid_channels`` is applied: mdistiller reads ``MAX_MID_CHANNEL`` but hard-codes 512 (its ImageNet
  r50→mv1 recipe's 256 has no effect there); with the default 512 the modules are the same.
* Maps may be non-square: the attention and the resizes use (H, W), where mdistiller's square ``shape``
  numbers would fail; HCL's pyramid is chosen by the height, as there.
* A batch of one image (the last batch of an epoch) runs the ABFs' BatchNorm on their running statistics:
  in training mode BatchNorm has one value per channel on the pooled 1×1 map and raises (mdistiller would).
* The warm-up counts epochs from 1, as mdistiller does (the authors' CIFAR ``train.py`` counts from 0, so its
  first epoch has no review term).
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.losses._common import check_bool, require_teacher
from kdlib.losses._layers import LayerMethod, last_stages
from kdlib.losses.ce import ce_loss
from kdlib.losses.registry import MULTICLASS, LossOutput, Progress, StudentOutput, TeacherOutput, register_method
from kdlib.taps import PRE_LOGITS, Layer, LayerPlan, pre_relu

HCL_LEVELS = (4, 2, 1)  # the pyramid's pooled sizes (the authors' ``hcl``)


class ABF(nn.Module):
    """Attention-based fusion (mdistiller's ``ABF``, same submodule names so its weights load): 1×1 conv + BN
    to ``mid_channels``; with ``fuse``, a sigmoid-attention mix with the resized residual from the deeper
    stage; then a 3×3 conv + BN to ``out_channels`` at the teacher's size."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, kernel_size=3, stride=1, padding=1,
                                             bias=False), nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(mid_channels * 2, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """``(output at out_size with the teacher's channels, fused map for the next shallower stage)``."""
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("a fusing ABF needs the fused map of the deeper stage")
            residual = F.interpolate(residual, x.shape[-2:], mode="nearest")
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, 0:1] + residual * attention[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), x


def build_abfs(student_shapes: Sequence[Sequence[int]], teacher_shapes: Sequence[Sequence[int]],
               max_mid_channels: int = 512) -> nn.ModuleList:
    """The ABFs for maps of ``student_shapes`` → ``teacher_shapes`` (each ``(C, H, W)``, shallow to deep),
    **deepest first** (mdistiller's ``abfs[::-1]``); the deepest one does not fuse."""
    mid = min(max_mid_channels, int(student_shapes[-1][0]))
    n = len(student_shapes)
    abfs = [ABF(int(s[0]), mid, int(t[0]), i < n - 1) for i, (s, t) in enumerate(zip(student_shapes, teacher_shapes))]
    return nn.ModuleList(abfs[::-1])


def review_fusion(abfs: Sequence[nn.Module], student: Sequence[Tensor], out_sizes: Sequence[tuple[int, int]]
                  ) -> list[Tensor]:
    """The ABF outputs for the ``student`` maps (shallow to deep; ``abfs`` deepest first, as
    :func:`build_abfs` gives them), each at its ``out_sizes`` entry; shallow to deep."""
    results: list[Tensor] = []
    residual: Tensor | None = None
    for abf, x, size in zip(abfs, reversed(student), reversed(out_sizes)):
        out, residual = abf(x, residual, size)
        results.insert(0, out)
    return results


def hcl_pair(f_s: Tensor, f_t: Tensor) -> Tensor:
    """HCL of one pair of equal-shaped ``(B, C, H, W)`` maps: the MSE and the MSEs of their 4×4, 2×2, 1×1
    average pools below the height H, weighted ½, ¼, ⅛ in the order they apply, over the weights' sum."""
    loss, weight, total = F.mse_loss(f_s, f_t), 1.0, 1.0
    for size in HCL_LEVELS:
        if size >= f_s.shape[2]:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(f_s, size), F.adaptive_avg_pool2d(f_t, size))
        total += weight
    return loss / total


def hcl_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """Σ over the pairs of :func:`hcl_pair`."""
    return sum((hcl_pair(s, t) for s, t in zip(student, teacher)), student[0].new_zeros(()))


def as_map(t: Tensor) -> Tensor:
    """A pooled ``(B, C)`` feature as a ``(B, C, 1, 1)`` map (mdistiller's ``unsqueeze(-1).unsqueeze(-1)``)."""
    return t[:, :, None, None] if t.ndim == 2 else t


def warmup_factor(epoch: int, warmup: float) -> float:
    """``min(epoch / warmup, 1)`` for the 1-based ``epoch``; 1 without warm-up."""
    return min(epoch / warmup, 1.0) if warmup else 1.0


def map_shape(path: str, shape: Sequence[int]) -> tuple[int, int, int] | None:
    """The ``(C, H, W)`` map a layer gives: its own shape, a ``pre_logits`` vector as ``(C, 1, 1)``; else None."""
    if len(shape) == 3:
        return (int(shape[0]), int(shape[1]), int(shape[2]))
    if path == PRE_LOGITS and len(shape) == 1:
        return (int(shape[0]), 1, 1)
    return None


@register_method("reviewkd")
class ReviewKDLoss(LayerMethod):
    """``w_ce·CE + w_feat·min(e/W, 1)·Σ HCL(ABF-fused student maps, teacher maps)`` (see the module docstring)."""

    needs_teacher = True
    needs_features = False
    uses_distillation_token = False
    uses_layers = True
    tasks = (MULTICLASS,)
    soft_targets = "mixed"  # they only enter the CE term
    uses_progress = True
    uses_positions = False
    method_name, feat_term = "reviewkd", "hcl"

    def __init__(self, warmup: float = 20, max_mid_channels: int = 512, ce_weight: float = 1.0,
                 feat_weight: float = 1.0, student_preact: bool = False, student_layers: Sequence[Layer] | None = None,
                 teacher_layers: Sequence[Layer] | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__(ce_weight, feat_weight, student_layers, teacher_layers, label_smoothing)
        self.student_preact = check_bool("student_preact", student_preact)
        if (not isinstance(warmup, numbers.Real) or isinstance(warmup, bool) or not math.isfinite(warmup)
                or warmup < 0):
            raise ValueError(f"warmup must be a number of epochs >= 0 (0: none), got {warmup!r}")
        self.warmup = warmup
        if isinstance(max_mid_channels, bool) or not isinstance(max_mid_channels, numbers.Integral) \
                or max_mid_channels < 1:
            raise ValueError(f"max_mid_channels must be an integer >= 1 (the ABFs' widest inner width), "
                             f"got {max_mid_channels!r}")
        self.max_mid_channels = int(max_mid_channels)
        self.abfs = nn.ModuleList()

    def default_layers(self, student_stages: int, teacher_stages: int) -> tuple[list[Layer], list[Layer]]:
        stages_s, stages_t = last_stages(student_stages, teacher_stages)
        student = [pre_relu(i) for i in stages_s] if self.student_preact else list(stages_s)
        return [*student, PRE_LOGITS], [*(pre_relu(i) for i in stages_t), PRE_LOGITS]

    def layer_problem(self, plan: LayerPlan) -> str | None:
        for role, paths, shapes in (("student", plan.student, plan.student_shapes),
                                    ("teacher", plan.teacher, plan.teacher_shapes)):
            for path, shape in zip(paths, shapes):
                if map_shape(path, shape) is None:
                    return (f"reviewkd fuses (C, H, W) stage maps; the {role}'s layer {path} gives {tuple(shape)} "
                            f"(a model whose stages are not feature maps, such as a ViT or the mlp, cannot be "
                            "reviewed); choose convolutional layers with student_layers / teacher_layers")
        return None

    def build_adapters(self, plan: LayerPlan) -> None:
        student = [map_shape(p, s) for p, s in zip(plan.student, plan.student_shapes)]
        teacher = [map_shape(p, s) for p, s in zip(plan.teacher, plan.teacher_shapes)]
        self.abfs = build_abfs(student, teacher, self.max_mid_channels)  # type: ignore[arg-type]

    def feature_loss(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        """Σ HCL between the ABF-fused ``student`` maps and the ``teacher`` maps (both shallow to deep)."""
        if not self.abfs:
            raise RuntimeError("the 'reviewkd' method was not set up: its fusion modules are not built")
        student, teacher = [as_map(t) for t in student], [as_map(t) for t in teacher]
        sizes = [tuple(t.shape[-2:]) for t in teacher]
        # BatchNorm in training mode cannot normalize a single value per channel (one image, a 1×1 map)
        single = self.training and student[0].shape[0] == 1
        if single:
            self.abfs.eval()
        try:
            fused = review_fusion(self.abfs, student, sizes)  # type: ignore[arg-type]
        finally:
            if single:
                self.abfs.train()
        return hcl_loss(fused, teacher)

    def forward(self, student: StudentOutput, targets: Tensor, teacher: TeacherOutput | None = None,
                progress: Progress | None = None) -> LossOutput:
        teacher = require_teacher(self.method_name, teacher)
        if progress is None:
            raise ValueError("reviewkd needs the training progress (its warm-up counts epochs): pass progress=")
        if student.layers is None or teacher.layers is None or len(student.layers) != len(teacher.layers):
            raise ValueError("the 'reviewkd' method needs the student's and the teacher's layer outputs in pairs "
                             "(StudentOutput.layers, TeacherOutput.layers)")
        ramp = warmup_factor(progress.epoch, self.warmup)
        hard = ce_loss(student.logits, targets, self.label_smoothing)
        review = self.feature_loss([t.float() for t in student.layers], [t.detach().float() for t in teacher.layers])
        total = self.ce_weight * hard + self.feat_weight * ramp * review
        return LossOutput(total, {"ce": hard.detach(), "hcl": review.detach(),
                                  "warmup": torch.tensor(ramp, device=hard.device)})

