"""fp32: the reference every other precision is compared with (PyTorch eager)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from kdlib.quantize.base import PRECISIONS, OutputToFloat, Prepared, QuantContext, tensor_dtypes, torch_save


@PRECISIONS.register("fp32")
def prepare(model: nn.Module, ctx: QuantContext) -> Prepared:
    model = copy.deepcopy(model).float().eval().to(ctx.device)
    return Prepared(OutputToFloat(model, torch.float32, ctx.device), "pytorch eager",
                    lambda stem: torch_save(model.state_dict(), stem),
                    lambda: tensor_dtypes(model.state_dict()), ctx.device)
