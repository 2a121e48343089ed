"""int8_static: PT2E static quantization with torchao's X86InductorQuantizer.

The supported path in this torch (``torch.ao.quantization.quantize_pt2e`` is gone; it lives in
``torchao.quantization.pt2e``): ``torch.export`` → ``prepare_pt2e`` (observers) → calibration on
training images → ``convert_pt2e`` (int8 weights, quantize/dequantize around activations) →
lowered to oneDNN int8 kernels. With a C++ compiler the lowering is ``torch.compile`` (Inductor,
freezing on), the fast path; without one, torchao's ``lower_pt2e_quantized_to_x86`` (no codegen).

Both lowerings specialize on the batch size (Inductor's dynamic-shape qconv fails its stride
check in this torch), so :class:`StaticBatches` compiles a few batch sizes and pads others.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from kdlib.quantize.base import PRECISIONS, Prepared, QuantContext, Skipped, tensor_dtypes


class StaticBatches(nn.Module):
    """Runs a batch-size-specialized model: a batch is padded up to the next size in ``sizes``
    (larger ones are split); the padding rows are dropped from the output. In eval mode every
    image is computed independently, so padding does not change any logit."""

    def __init__(self, build: Callable[[Tensor], Callable[[Tensor], Tensor]], sizes: Sequence[int]) -> None:
        super().__init__()
        self.train(False)
        self.build, self.sizes = build, sorted(sizes)
        self.compiled: dict[int, Callable[[Tensor], Tensor]] = {}

    def _run(self, x: Tensor) -> Tensor:
        size = next(s for s in self.sizes if s >= x.shape[0])
        if size > x.shape[0]:
            x = torch.cat([x, x[-1:].expand(size - x.shape[0], *x.shape[1:])])
        if size not in self.compiled:
            self.compiled[size] = self.build(x)
        return self.compiled[size](x)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float().contiguous()
        top = self.sizes[-1]
        outs = [self._run(x[i:i + top])[: min(top, x.shape[0] - i)] for i in range(0, x.shape[0], top)]
        return torch.cat(outs).float()


def quantize_pt2e(model: nn.Module, example: Tensor, calibration: Sequence[Tensor]) -> torch.fx.GraphModule:
    """Export, observe the calibration batches, convert: a reference int8 graph (int8 weights)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    batch = torch.export.Dim.AUTO
    exported = torch.export.export(copy.deepcopy(model).float().eval(), (example[:2],),
                                   dynamic_shapes=({0: batch},)).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for x in calibration:
            prepared(x)
    return drop_unused_tensors(convert_pt2e(prepared))


def drop_unused_tensors(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """convert_pt2e folds each weight into an int8 constant but leaves the fp32 original registered;
    dropping what no node reads keeps the saved model (and its size) int8."""
    used = {str(n.target) for n in graph.graph.nodes if n.op == "get_attr"}
    for name, _ in [*graph.named_parameters(), *graph.named_buffers()]:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(graph.get_submodule(owner) if owner else graph, attr)
    return graph


def has_cxx_compiler() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@PRECISIONS.register("int8_static")
def prepare(model: nn.Module, ctx: QuantContext) -> Prepared:
    try:
        import torchao  # noqa: F401
    except ImportError as err:
        raise Skipped(f"torchao is not installed ({err})") from None
    if not ctx.calibration:
        raise Skipped("static int8 needs calibration batches")
    if "x86" not in torch.backends.quantized.supported_engines:
        raise Skipped("this torch build has no x86 (oneDNN/fbgemm) quantized engine")
    converted = quantize_pt2e(model, ctx.example, ctx.calibration)
    if has_cxx_compiler():
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # constant-folds int8 weights into prepacked oneDNN kernels
        inductor_config.compile_threads = 1  # no compile-worker pool inside an evaluation process
        backend = "torchao PT2E + X86InductorQuantizer, torch.compile (Inductor, oneDNN int8)"

        def build(x: Tensor) -> Callable[[Tensor], Tensor]:
            fn = torch.compile(converted, dynamic=False)
            return lambda t: _no_grad(fn, t)
    else:
        from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86

        backend = "torchao PT2E + X86InductorQuantizer, lower_pt2e_quantized_to_x86 (no C++ compiler)"

        def build(x: Tensor) -> Callable[[Tensor], Tensor]:
            fn = lower_pt2e_quantized_to_x86(converted, (x,))
            return lambda t: _no_grad(fn, t)

    def save(stem: Path) -> Path:
        path = Path(stem).with_suffix(".pt2")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(torch.export.export(converted, (ctx.example[:2],),
                                              dynamic_shapes=({0: torch.export.Dim.AUTO},)), path)
        return path

    return Prepared(StaticBatches(build, ctx.static_batch_sizes), backend, save,
                    lambda: stored_dtypes(converted),
                    notes=f"calibrated on {sum(len(c) for c in ctx.calibration)} training images")


def stored_dtypes(graph: torch.fx.GraphModule) -> dict[str, int]:
    """Dtypes of the constants the converted graph holds (weights folded to int8 by convert_pt2e)."""
    tensors = dict(graph.state_dict())
    for node in graph.graph.nodes:
        if node.op == "get_attr":
            value = graph
            for part in str(node.target).split("."):
                value = getattr(value, part)
            if isinstance(value, Tensor):
                tensors[str(node.target)] = value
    return tensor_dtypes(tensors)


def _no_grad(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    with torch.no_grad():
        return fn(x)
