"""bf16: weights and activations in bfloat16 (fp32 range, 8-bit mantissa; AMX/AVX512-BF16 on x86)."""
from __future__ import annotations

import torch
from torch import nn

from kdlib.quantize.base import PRECISIONS, Prepared, QuantContext
from kdlib.quantize.half import prepare_half


@PRECISIONS.register("bf16")
def prepare(model: nn.Module, ctx: QuantContext) -> Prepared:
    return prepare_half(model, ctx, torch.bfloat16)
