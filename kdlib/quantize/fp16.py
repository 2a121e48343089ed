"""fp16: weights and activations in IEEE half precision (AVX512-FP16/AMX-FP16 on recent x86, GPUs)."""
from __future__ import annotations

import torch
from torch import nn

from kdlib.quantize.base import PRECISIONS, Prepared, QuantContext
from kdlib.quantize.half import prepare_half


@PRECISIONS.register("fp16")
def prepare(model: nn.Module, ctx: QuantContext) -> Prepared:
    return prepare_half(model, ctx, torch.float16)
