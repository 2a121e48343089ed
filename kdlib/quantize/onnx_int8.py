"""onnx_int8: ONNX Runtime static int8 in QDQ format (QuantizeLinear/DequantizeLinear pairs that
ORT fuses into int8 kernels): per-channel int8 weights, uint8 activations (U8S8, ORT's
recommendation for x86), MinMax calibration on training images."""
from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from kdlib.quantize.base import PRECISIONS, Prepared, QuantContext, Skipped
from kdlib.quantize.onnx_common import OrtModule, copy_to, export_onnx, initializer_dtypes, require_onnx


@PRECISIONS.register("onnx_int8")
def prepare(model: nn.Module, ctx: QuantContext) -> Prepared:
    _, ort = require_onnx()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not ctx.calibration:
        raise Skipped("static int8 needs calibration batches")
    fp32 = export_onnx(model, ctx, ctx.workdir / "model_fp32.onnx")
    pre = ctx.workdir / "model_pre.onnx"
    quant_pre_process(str(fp32), str(pre))  # shape inference + graph cleanup ORT's quantizer expects
    batches = [np.ascontiguousarray(b.float().numpy()) for b in ctx.calibration]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(batches)

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self.items, None)
            return None if batch is None else {"input": batch}

    path = ctx.workdir / "model_int8.onnx"
    quantize_static(str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return Prepared(OrtModule(path, ctx.threads), f"onnxruntime {ort.__version__} CPU, QDQ static int8",
                    lambda stem: copy_to(path, stem), lambda: initializer_dtypes(path),
                    notes=f"calibrated on {sum(len(b) for b in batches)} training images")
