"""onnx_fp32: the model exported to ONNX and run by ONNX Runtime's CPU provider in fp32 — the
path most users deploy with, and often the fastest fp32 path for small models (fused kernels,
no Python per op)."""
from __future__ import annotations

from torch import nn

from kdlib.quantize.base import PRECISIONS, Prepared, QuantContext
from kdlib.quantize.onnx_common import OrtModule, copy_to, export_onnx, initializer_dtypes, require_onnx


@PRECISIONS.register("onnx_fp32")
def prepare(model: nn.Module, ctx: QuantContext) -> Prepared:
    _, ort = require_onnx()
    path = export_onnx(model, ctx, ctx.workdir / "model_fp32.onnx")
    return Prepared(OrtModule(path, ctx.threads), f"onnxruntime {ort.__version__} CPU",
                    lambda stem: copy_to(path, stem), lambda: initializer_dtypes(path))
