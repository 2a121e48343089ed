"""Shared by bf16 and fp16: weights and activations cast to a 16-bit float dtype."""
from __future__ import annotations

import copy

import torch
from torch import nn

from kdlib.runtime import has_native_kernels
from kdlib.quantize.base import OutputToFloat, Prepared, QuantContext, Skipped, tensor_dtypes, torch_save


def prepare_half(model: nn.Module, ctx: QuantContext, dtype: torch.dtype) -> Prepared:
    """The whole model in ``dtype`` (BatchNorm statistics included), on the GPU when there is one.

    On a CPU without native kernels for ``dtype`` it is a :class:`Skipped` row (emulated 16-bit
    floats are a slow path, not a precision anyone deploys). A forward pass on the example batch checks that every op has a kernel for ``dtype`` on this
    device; a missing one is a :class:`Skipped` row, never an fp32 fallback.
    """
    if not has_native_kernels(dtype, ctx.device):
        raise Skipped(f"{dtype} has no native kernels on this CPU ({torch.backends.cpu.get_cpu_capability()}, no "
                      "AVX512-BF16/FP16 or AMX): torch emulates it, many times slower than fp32, so it is no "
                      "deployment path here")
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
