"""fp8: Linear and Conv weights stored as ``torch.float8_e4m3fn`` with one fp32 scale per output
channel, dequantized to fp32 at compute.

This is weight-only storage: it makes the weights (and the file) really 8-bit on any CPU, without
fp8 matmul kernels (those exist only on recent GPUs). Activations stay fp32, so it is about size,
not speed.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.quantize.base import PRECISIONS, OutputToFloat, Prepared, QuantContext, tensor_dtypes, torch_save

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel absmax scaling into e4m3 (``weight ≈ q.float() * scale``)."""
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    scale = (flat.abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX).view(-1, *[1] * (weight.ndim - 1))
    return (weight.detach().float() / scale).to(FP8), scale


class Fp8WeightLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, scale = quantize_weight(linear.weight)
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_fp8.float() * self.weight_scale, self.bias)


class Fp8WeightConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported")
        q, scale = quantize_weight(conv.weight)
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float())
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight_fp8.float() * self.weight_scale, self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


def _fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold eval-mode BatchNorm into the preceding conv where torch.fx can trace the model, so the
    fp8 weights carry the folded scale (as a deployed model would); otherwise leave it."""
    try:
        from torch.fx.experimental.optimization import fuse

        return fuse(model)
    except Exception:  # noqa: BLE001 - untraceable models simply keep their BatchNorm layers
        return model


def convert(model: nn.Module) -> nn.Module:
    """Replace every Linear / Conv2d (in place, recursively) by its fp8-weight counterpart."""
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            setattr(model, name, Fp8WeightLinear(child))
        elif isinstance(child, nn.Conv2d) and child.padding_mode == "zeros":
            setattr(model, name, Fp8WeightConv2d(child))
        else:
            convert(child)
    return model


@PRECISIONS.register("fp8")
def prepare(model: nn.Module, ctx: QuantContext) -> Prepared:
    model = convert(_fold_batchnorm(copy.deepcopy(model).float().eval()))
    n = sum(isinstance(m, (Fp8WeightLinear, Fp8WeightConv2d)) for m in model.modules())
    return Prepared(OutputToFloat(model, torch.float32, torch.device("cpu")), "pytorch eager, fp8 weight storage",
                    lambda stem: torch_save(model.state_dict(), stem),
                    lambda: tensor_dtypes(model.state_dict()),
                    notes=f"{n} Linear/Conv weights in float8_e4m3fn, dequantized at compute")
