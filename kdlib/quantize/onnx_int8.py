"""onnx_int8: ONNX Runtime static int8 in QDQ format (QuantizeLinear/DequantizeLinear pairs that
ORT fuses into int8 kernels): per-channel int8 weights, uint8 activations (U8S8, ORT's
recommendation for x86), MinMax calibration on training images.

:func:`quantize_qdq_int8` is the quantization itself, from an fp32 ONNX file; the ``export``
stage (:mod:`kdlib.export`) calls it too, so the deployed int8 file is the one measured here."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import Tensor, nn

from kdlib.quantize.base import PRECISIONS, Prepared, QuantContext, Skipped
from kdlib.quantize.onnx_common import OrtModule, copy_to, export_onnx, initializer_dtypes, require_onnx


def quantize_qdq_int8(fp32: Path, calibration: Sequence[Tensor], out: Path, workdir: Path) -> Path:
    """Write the static QDQ int8 version of the fp32 ONNX model ``fp32`` (input named ``input``)
    to ``out``, calibrated on ``calibration`` (normalized fp32 NCHW batches).

    MinMax calibration keeps the minimum and maximum of every activation over all batches
    (ORT's default, no moving average), so how the images are split into batches does not
    change the scales. ``workdir`` holds the pre-processed model."""
    require_onnx()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise Skipped("static int8 needs calibration batches")
    pre = Path(workdir) / f"{Path(out).stem}_pre.onnx"
    pre.parent.mkdir(parents=True, exist_ok=True)
    quant_pre_process(str(fp32), str(pre))  # shape inference + graph cleanup ORT's quantizer expects
    batches = [np.ascontiguousarray(b.float().numpy()) for b in calibration]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(batches)

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self.items, None)
            return None if batch is None else {"input": batch}

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return Path(out)


@PRECISIONS.register("onnx_int8")
def prepare(model: nn.Module, ctx: QuantContext) -> Prepared:
    _, ort = require_onnx()
    if not ctx.calibration:
        raise Skipped("static int8 needs calibration batches")
    fp32 = export_onnx(model, ctx, ctx.workdir / "model_fp32.onnx")
    path = quantize_qdq_int8(fp32, ctx.calibration, ctx.workdir / "model_int8.onnx", ctx.workdir)
    return Prepared(OrtModule(path, ctx.threads), f"onnxruntime {ort.__version__} CPU, QDQ static int8",
                    lambda stem: copy_to(path, stem), lambda: initializer_dtypes(path),
                    notes=f"calibrated on {sum(len(b) for b in ctx.calibration)} training images")
