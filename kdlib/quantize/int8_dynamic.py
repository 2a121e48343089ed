"""int8_dynamic: Linear weights stored in int8 (per-channel), activations quantized per token at
run time (torchao ``Int8DynamicActivationInt8WeightConfig``, the supported successor of the
deprecated ``torch.ao.quantization.quantize_dynamic``).

No calibration is needed, which suits attention models (DeiT-style students) whose activation
ranges vary per input; convolutions stay fp32, so a CNN gains little.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from kdlib.quantize.base import PRECISIONS, OutputToFloat, Prepared, QuantContext, Skipped, tensor_dtypes, torch_save


@PRECISIONS.register("int8_dynamic")
def prepare(model: nn.Module, ctx: QuantContext) -> Prepared:
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as err:
        raise Skipped(f"torchao is not installed ({err})") from None
    model = copy.deepcopy(model).float().eval()
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise Skipped("the model has no nn.Linear layer to quantize")
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    return Prepared(OutputToFloat(model, torch.float32, torch.device("cpu")), "torchao quantize_ (eager, CPU)",
                    lambda stem: torch_save(model.state_dict(), stem),
                    lambda: tensor_dtypes(model.state_dict()),
                    notes=f"{n_linear} Linear layers int8; other layers fp32")
