"""fp32_channels_last: fp32 in NHWC memory layout, which oneDNN convolutions prefer on x86 — a
faster fp32 baseline than the default NCHW for CNNs, so int8 is compared with the best fp32."""
from __future__ import annotations

import copy

import torch
from torch import nn

from kdlib.quantize.base import PRECISIONS, OutputToFloat, Prepared, QuantContext, tensor_dtypes, torch_save


@PRECISIONS.register("fp32_channels_last")
def prepare(model: nn.Module, ctx: QuantContext) -> Prepared:
    model = copy.deepcopy(model).float().eval().to(ctx.device, memory_format=torch.channels_last)
    return Prepared(OutputToFloat(model, torch.float32, ctx.device, torch.channels_last),
                    "pytorch eager, channels_last", lambda stem: torch_save(model.state_dict(), stem),
                    lambda: tensor_dtypes(model.state_dict()), ctx.device)
