"""Quantized / reduced-precision evaluation: one file per precision or backend, registered in
:data:`PRECISIONS`, plus measurement (:mod:`kdlib.quantize.measure`) and figures
(:mod:`kdlib.quantize.figures`)."""
from kdlib.quantize import bf16, fp8, fp16, fp32, fp32_channels_last, int8_dynamic, int8_static, onnx_fp32, onnx_int8  # noqa: F401
from kdlib.quantize.base import PRECISIONS, Prepared, QuantContext, Skipped, tensor_dtypes

__all__ = ["PRECISIONS", "Prepared", "QuantContext", "Skipped", "tensor_dtypes"]
