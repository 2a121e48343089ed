"""Shared by bf16 and fp16: weights and activations cast to a 16-bit float dtype."""
from __future__ import annotations

import copy

import torch
from torch import nn

from kdlib.quantize.base import OutputToFloat, Prepared, QuantContext, Skipped, tensor_dtypes, torch_save


def prepare_half(model: nn.Module, ctx: QuantContext, dtype: torch.dtype) -> Prepared:
    """The whole model in ``dtype`` (BatchNorm statistics included), on the GPU when there is one.

    A forward pass on the example batch checks that every op has a kernel for ``dtype`` on this
    device; a missing one is a :class:`Skipped` row, never an fp32 fallback.
    """
    half = copy.deepcopy(model).eval().to(ctx.device, dtype)
    wrapped = OutputToFloat(half, dtype, ctx.device)
    try:
        with torch.no_grad():
            out = wrapped(ctx.example[:2])
    except (RuntimeError, NotImplementedError) as err:
        raise Skipped(f"{dtype} forward failed on {ctx.device.type}: {str(err).splitlines()[0]}") from None
    if not torch.isfinite(out).all():
        raise Skipped(f"{dtype} logits overflow (inf/nan) on the example batch")
    floats = {p.dtype for p in half.parameters() if p.is_floating_point()}
    if floats != {dtype}:  # a module that ignored .to(dtype) would silently compute in fp32
        raise Skipped(f"parameters stayed in {sorted(map(str, floats))} after casting to {dtype}")
    return Prepared(wrapped, f"pytorch eager ({ctx.device.type})",
                    lambda stem: torch_save(half.state_dict(), stem),
                    lambda: tensor_dtypes(half.state_dict()), ctx.device)
