"""Overhaul of feature distillation (``ofd``).

Heo, Kim, Yun, Park, Kwak, Choi, "A Comprehensive Overhaul of Feature Distillation", ICCV 2019,
arXiv:1904.01866. The student's **pre-ReLU** stage outputs go through a connector r_l (1×1 convolution and
BatchNorm, owned by the method) and meet the teacher's pre-ReLU outputs under a partial L2 distance that
ignores what the teacher's ReLU would discard anyway:

.. math::

    L = w_{ce}\\,\\mathrm{CE}_\\epsilon(z_s, y) + w_{feat} \\sum_{l=1}^{n} 2^{-(n-l)}\\,
        \\frac{1}{B}\\sum_{b,c,h,w} d_p\\big(r_l(F^s_l),\\ \\max(P(F^t_l), m_{l,c})\\big), \\qquad
    d_p(s, t) = \\begin{cases} 0 & s \\le t \\le 0 \\\\ (s - t)^2 & \\text{otherwise} \\end{cases}

P is adaptive average pooling of the teacher's map to the student's size. The margin ``m_c`` is the
expected value of the teacher's negative responses in channel c, taking the channel as ``N(β_c, γ_c²)``
from the affine parameters of the BatchNorm before the ReLU (the paper's eq. 3, the authors'
``get_margin_from_BN``): ``m = β − |γ|·φ(β/|γ|)/Φ(−β/|γ|)``, or ``−3|γ|`` where ``Φ(−β/|γ|) ≤ 0.001``. The
teacher's margins are computed in ``setup`` from the trained teacher (:class:`SetupContext.teacher`). Where each
model's pre-ReLU stage outputs are and which BatchNorm precedes them is :mod:`kdlib.models.pre_relu`'s
(timm's resnet*, mobilenetv2_* / mobilenetv3_*, cnn_small, rescnn); any other model (mlp, deit, convnext …) is
refused before any work, naming the models that have them. The layers are read by forward hooks
(:func:`kdlib.taps.pre_relu`); no model's ``forward`` changes.

Knobs (mdistiller's ``OFD`` defaults): ``ce_weight`` 1, ``feat_weight`` 1e-3 (mdistiller's, as the authors'
CIFAR-100 ``loss_distill.sum() / batch_size / 1000``; their ImageNet script divides by 10000 instead),
``kernel_size`` 1 (the connector's, mdistiller's ``CONNECTOR.KERNEL_SIZE``; odd, so the map keeps its size),
``student_layers`` / ``teacher_layers``: stage indices whose pre-ReLU outputs pair up, null = every stage
after the stem, paired from the deepest (mdistiller's ``_align_list(preact_feats[1:])``). The per-stage
weight ``2^{-(n-l)}`` halves from the deepest pair down, as in both originals. Terms logged: ``ce``, ``ofd``
(the unweighted distance sum). The connectors are the method's own parameters (extra parameters),
initialized as the authors' (conv weights ~ N(0, 2/(k²·C_t)), BN γ = 1, β = 0).

Differences from the original code, all tested against it (``tests/test_losses_ofd.py``):

* the distance is the authors' ``distillation_loss`` (``target = max(target, margin)``, masked MSE) over the
  batch size, which equals mdistiller's three-mask ``feat_loss`` (``.mean(dim=0).sum()``) for any margin ≤ 0,
  and every margin is ≤ 0;
* the teacher's map is pooled to the student's size as mdistiller does (the authors' code needs equal sizes);
* the margin is computed in float64 with torch's ``ndtr`` in place of scipy's ``norm.cdf`` on Python floats,
  and a channel with ``γ = 0`` gets its limit (``min(β, 0)``) where the original divides by zero;
* the connector's BatchNorm always normalizes with the batch's statistics: the method computes a loss only
  in training, as in mdistiller.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.losses._layers import LayerMethod, spatial_maps
from kdlib.losses.base import SetupContext
from kdlib.losses.registry import MULTICLASS, register_method
from kdlib.models.pre_relu import PRE_RELU_MODELS, pre_relu_bn
from kdlib.taps import Layer, LayerPlan, pre_relu


def ofd_margin(weight: Tensor, bias: Tensor) -> Tensor:
    """Per channel, ``E[x | x < 0]`` for ``x ~ N(bias, weight²)`` (a BatchNorm's affine output), or
    ``−3|weight|`` where ``P(x < 0) ≤ 0.001``: OFD's margin, ``(C,)`` float32."""
    std, mean = weight.detach().double().abs(), bias.detach().double()
    below = torch.special.ndtr(-mean / std)  # P(x < 0); NaN only where std = mean = 0, then the else branch: 0
    expected = mean - std * torch.exp(-((mean / std) ** 2) / 2) / math.sqrt(2 * math.pi) / below
    return torch.where(below > 0.001, expected, -3 * std).float()


def ofd_distance(source: Tensor, target: Tensor, margin: Tensor) -> Tensor:
    """The partial L2 distance summed over channels and positions, averaged over the batch: no penalty where
    the teacher's response (raised to the channel's ``margin``, ``(C,)``) is negative and the student's is
    already below it."""
    target = torch.max(target, margin.view(1, -1, 1, 1).to(target))
    mask = ((source > target) | (target > 0)).to(source.dtype)
    return ((source - target) ** 2 * mask).sum() / source.shape[0]


def ofd_connector(student_channels: int, teacher_channels: int, kernel_size: int = 1) -> nn.Sequential:
    """The authors' connector: conv k×k (no bias, same size) → BatchNorm, initialized as theirs."""
    conv = nn.Conv2d(student_channels, teacher_channels, kernel_size, stride=1, padding=(kernel_size - 1) // 2,
                     bias=False)
    bn = nn.BatchNorm2d(teacher_channels)
    conv.weight.data.normal_(0, math.sqrt(2.0 / (kernel_size * kernel_size * teacher_channels)))
    bn.weight.data.fill_(1)
    bn.bias.data.zero_()
    return nn.Sequential(conv, bn)


def _check_stages(name: str, value: Sequence[Layer] | None) -> None:
    if value is not None and not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{name} must be null or a list of stage indices (OFD reads each stage's pre-ReLU output), "
                         f"e.g. [2, 3]; got {value!r}")


@register_method("ofd")
class OFDLoss(LayerMethod):
    """``w_ce·CE + w_feat·Σ_l 2^{-(n-l)}·d_p(r_l(F_s), max(F_t, m_l))`` on pre-ReLU stage outputs (see the module
    docstring)."""

    needs_teacher = True
    needs_features = False
    uses_distillation_token = False
    uses_layers = True
    tasks = (MULTICLASS,)
    soft_targets = "mixed"
    uses_progress = False
    uses_positions = False
    method_name, feat_term = "ofd", "ofd"

    def __init__(self, ce_weight: float = 1.0, feat_weight: float = 1e-3, kernel_size: int = 1,
                 student_layers: Sequence[int] | None = None, teacher_layers: Sequence[int] | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(ce_weight, feat_weight, student_layers, teacher_layers, label_smoothing)
        _check_stages("student_layers", student_layers)
        _check_stages("teacher_layers", teacher_layers)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer (the connector keeps the map's size), "
                             f"got {kernel_size!r}")
        self.kernel_size = kernel_size
        self.connectors = nn.ModuleList()

    def layer_request(self, student_stages: int, teacher_stages: int) -> tuple[Sequence[Layer], Sequence[Layer]]:
        # the stage indices (the knobs, or every stage after the stem: LayerMethod's default) → their pre-ReLU outputs
        stages_s, stages_t = super().layer_request(student_stages, teacher_stages)
        return [pre_relu(int(i)) for i in stages_s], [pre_relu(int(i)) for i in stages_t]

    def layer_problem(self, plan: LayerPlan) -> str | None:
        return spatial_maps("ofd", plan)

    def setup(self, context: SetupContext) -> None:
        super().setup(context)
        assert self.plan is not None  # set by LayerMethod.setup
        modules = dict(context.teacher.named_modules())
        for i, (path, shape) in enumerate(zip(self.plan.teacher, self.plan.teacher_shapes)):
            bn_path = pre_relu_bn(context.teacher, path)
            bn = modules.get(bn_path) if bn_path is not None else None
            if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != shape[0]:
                raise ValueError(f"distill.ofd: the teacher ({type(context.teacher).__name__}) names no BatchNorm of "
                                 f"{shape[0]} channels before its layer {path!r}: OFD's margin needs one; the models "
                                 f"that have them: {PRE_RELU_MODELS}")
            # derived from the teacher at every setup, so not part of the method's saved state
            self.register_buffer(f"margin{i}", ofd_margin(bn.weight, bn.bias), persistent=False)

    @property
    def margins(self) -> tuple[Tensor, ...]:
        """The teacher's per-channel margin of each pair (buffers: they follow the method to its device)."""
        return tuple(getattr(self, f"margin{i}") for i in range(len(self.connectors)))

    def build_adapters(self, plan: LayerPlan) -> None:
        self.connectors = nn.ModuleList(ofd_connector(s[0], t[0], self.kernel_size)
                                        for s, t in zip(plan.student_shapes, plan.teacher_shapes))

    def pair_loss(self, index: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        source = self.connectors[index](f_s)
        target = F.adaptive_avg_pool2d(f_t, source.shape[-2:])
        return ofd_distance(source, target, self.margins[index]) / 2 ** (len(self.connectors) - index - 1)
