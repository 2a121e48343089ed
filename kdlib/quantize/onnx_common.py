"""Shared by the ONNX Runtime precisions: export, a session with a fixed thread count, a module
that runs it, and the dtypes of an ONNX file's initializers."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdlib.quantize.base import QuantContext, Skipped


def require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise Skipped(f"onnx/onnxruntime not installed ({err})") from None
    return onnx, onnxruntime


def export_onnx(model: nn.Module, ctx: QuantContext, path: Path) -> Path:
    """``torch.onnx.export(dynamo=True)`` (the exporter torch recommends) with a dynamic batch
    dimension, weights inside the one file so its size is the deployable size."""
    import copy

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        program = torch.onnx.export(copy.deepcopy(model).float().eval(), (ctx.example[:2],), dynamo=True,
                                    input_names=["input"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim.AUTO},), verbose=False)
        program.save(str(path), external_data=False)
    except Exception as err:  # noqa: BLE001 - an unexportable op is a skipped row, named
        raise Skipped(f"ONNX export failed: {str(err).splitlines()[0][:200]}") from None
    return path


def session(path: Path, threads: int) -> Any:
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtModule(nn.Module):
    """Runs an ONNX Runtime session as ``forward(x) -> fp32 logits``."""

    def __init__(self, path: Path, threads: int) -> None:
        super().__init__()
        self.train(False)
        self.path = path
        self.session = session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: Tensor) -> Tensor:
        array = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0]).float()


def initializer_dtypes(path: Path) -> dict[str, int]:
    """Element count per data type of the file's initializers (weights, scales, zero points)."""
    onnx, _ = require_onnx()
    from onnx import numpy_helper

    counts: Counter[str] = Counter()
    for init in onnx.load(str(path)).graph.initializer:
        array = numpy_helper.to_array(init)
        counts[str(array.dtype)] += int(array.size)
    return dict(counts)


def copy_to(src: Path, stem: Path) -> Path:
    dst = Path(stem).with_suffix(".onnx")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def profile_nodes(path: Path, x: np.ndarray, threads: int, runs: int = 2000, skip: int = 200) -> dict[str, Any]:
    """Where a batch's time goes in ONNX Runtime: the median of each node's kernel time (µs) after
    ``skip`` warm-up runs, in execution order, the median whole-run time, and the nodes of the graph
    ORT actually executes (after its fusions and layout changes). The difference between the run
    and the sum of its kernels is the per-call overhead that no kernel speedup removes.
    Profiling itself adds a few µs per node, so compare runs profiled the same way."""
    _, ort = require_onnx()
    import json
    import tempfile

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="kdlib-ortprof-") as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        for _ in range(runs):
            sess.run(None, {name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    kernels: dict[str, tuple[str, list[int]]] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node = event["name"].removesuffix("_kernel_time")
            kernels.setdefault(node, (event["args"]["op_name"], []))[1].append(event["dur"])
    whole = [e["dur"] for e in events if e.get("name") == "model_run"][skip:]
    nodes = [{"node": node, "op": op, "median_us": float(np.median(times[skip:]))}
             for node, (op, times) in kernels.items()]
    return {"run_median_us": float(np.median(whole)), "kernel_sum_us": sum(n["median_us"] for n in nodes),
            "nodes": nodes}
