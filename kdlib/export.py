"""Deployable files of a trained classifier: ONNX fp32 and static int8, each describing itself,
and ``model.json``.

The fp32 file is :func:`kdlib.quantize.onnx_common.export_onnx`'s (the ``onnx_fp32`` precision)
and the int8 file :func:`kdlib.quantize.onnx_int8.quantize_qdq_int8` of it (the ``onnx_int8``
precision: QDQ, per-channel int8 weights, uint8 activations, MinMax calibration) on the same
seeded training images (:func:`kdlib.quantize.measure.calibration_sample`), so they are the files
the quantize stage measures. Each gets the model's classes, task and evaluation preprocessing in
its ``metadata_props`` (:class:`kdlib.deployed.ModelInfo`); ``model.json`` adds each file's sha256
and size and its test scores next to the PyTorch checkpoint's, so a user sees what int8 costs; a
file losing more than :data:`kdlib.quantize.measure.ACCURACY_LOSS_MARGIN_PT` against the PyTorch
model is flagged there (``loss_vs_pytorch``, with the likely cause: an int8 file on a CPU without
VNNI) and in the stage's printed lines (:func:`describe`).
Every byte written is a function of the checkpoint, the images and the library versions (no
time stamps, no timings), so a re-run reproduces the folder exactly.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdlib.checkpoint import Checkpoint
from kdlib.deployed import FORMAT, INPUT_SIZE_RANGE, PREFIX, ModelInfo
from kdlib.io import write_json
from kdlib.metrics import EvalResult, evaluate
from kdlib.outputs import file_sha256
from kdlib.predict import BATCH as PREDICT_BATCH
from kdlib.quantize.base import QuantContext, Skipped
from kdlib.quantize.measure import accuracy_loss, cpu_int8_support
from kdlib.quantize.onnx_common import OrtModule, export_onnx, require_onnx
from kdlib.quantize.onnx_int8 import quantize_qdq_int8

FP32_FILE = "student_fp32.onnx"
INT8_FILE = "student_int8.onnx"
MODEL_JSON = "model.json"
CALIBRATION_BATCH = 64  # MinMax calibration does not depend on the batching (quantize_qdq_int8)
PRECISIONS = {FP32_FILE: "fp32", INT8_FILE: "int8: static QDQ (per-channel int8 weights, uint8 activations, "
                                            "MinMax calibration)"}


class ExportError(RuntimeError):
    """The model cannot be exported; the message names the step and the checkpoint."""


STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"  # per node: the exporting machine's source paths


def with_metadata(src: Path, dst: Path, props: dict[str, str]) -> Path:
    """Copy the ONNX file ``src`` to ``dst`` with ``props`` in its ``metadata_props``, replacing
    earlier ``kdlib.`` entries and keeping any other, and without the Python stack trace that
    torch's exporter stores on each node: it names files by absolute path (the checkout, the
    virtual environment), which a deployed file has no use for and which would make the bytes
    depend on where the repository lies."""
    onnx, _ = require_onnx()
    model = onnx.load(str(src))
    for graph in [model.graph, *(f for f in model.functions)]:
        for node in graph.node:
            kept_props = [(p.key, p.value) for p in node.metadata_props if p.key != STACK_TRACE_KEY]
            del node.metadata_props[:]
            for key, value in kept_props:
                entry = node.metadata_props.add()
                entry.key, entry.value = key, value
    kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    for key, value in kept + sorted(props.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(dst))
    return dst


def _scores(result: EvalResult) -> dict[str, float]:
    return {k: round(v, 4) for k, v in result.metrics.items()}


def _agreement(result: EvalResult, reference: EvalResult, task: str) -> dict[str, float]:
    """How often a file decides as the PyTorch model does on the test images: the same top-1
    class (single-label), or the same decision at probability 0.5 per image and class."""
    if task == "multilabel":
        same = (result.logits > 0) == (reference.logits > 0)
        return {"same_decisions_at_0.5": round(float(same.float().mean()), 6)}
    return {"same_top1": round(float((result.predictions == reference.predictions).float().mean()), 6)}


def export_classifier(checkpoint: Checkpoint, out_dir: Path, info: ModelInfo, test_set: Dataset,
                      calibration: Tensor, threads: int = 2, ignore: Tensor | None = None, ap_mode: str = "voc",
                      source_name: str | None = None, *, multilabel_convention: str = "kdlib") -> dict[str, Any]:
    """Write ``student_fp32.onnx``, ``student_int8.onnx`` and ``model.json`` into ``out_dir`` and
    return ``model.json``'s content.

    ``test_set`` yields ``(uint8 image, target, index)`` at the checkpoint's input size, as
    evaluation loads it (``ignore``/``ap_mode``/``multilabel_convention``: multi-label scoring); ``calibration`` is the
    ``uint8`` training images static int8 calibrates on; ``threads``: ONNX Runtime intra-op threads.
    """
    record = checkpoint.record
    if info.preprocessing.input_size != record.input_size or info.preprocessing.channels != record.in_chans:
        raise ExportError(f"{checkpoint.path}: the model takes {record.in_chans}x{record.input_size}px input but "
                          f"the preprocessing makes {info.preprocessing.channels}x{info.preprocessing.input_size}px")
    low, high = INPUT_SIZE_RANGE
    if not low <= record.input_size <= high:  # kdlib.predict refuses such a file: do not write one
        raise ExportError(f"{checkpoint.path}: input_size {record.input_size}; kdlib.predict takes models of "
                          f"{low} to {high} px (kdlib.deployed.INPUT_SIZE_RANGE)")
    if len(info.classes) != record.num_classes:
        raise ExportError(f"{checkpoint.path}: {record.num_classes} outputs but {len(info.classes)} class names")
    if len(test_set) < 2:  # type: ignore[arg-type]
        raise ExportError("the test split needs at least 2 images to export and score a model")
    _, ort = require_onnx()
    torch.set_num_threads(threads)
    model = checkpoint.model()
    normalize = info.preprocessing.normalizer()
    example = normalize(torch.stack([test_set[i][0] for i in range(2)]))
    batches = [normalize(b) for b in calibration.split(CALIBRATION_BATCH)]
    loader = DataLoader(test_set, batch_size=256, shuffle=False, num_workers=0)
    file_loader = DataLoader(test_set, batch_size=PREDICT_BATCH, shuffle=False, num_workers=0)  # as predict batches
    reference = evaluate(model, loader, normalize, torch.device("cpu"), None, ignore, ap_mode, multilabel_convention)
    source = {"checkpoint": source_name or str(checkpoint.path), "checkpoint_sha256": file_sha256(checkpoint.path),
              "role": record.role, "preset": record.preset, "arch": record.arch, "dataset": record.dataset,
              "seed": record.seed, "epoch": checkpoint.epoch, "val_score": round(checkpoint.val_score, 4)}
    score = "mAP" if info.task == "multilabel" else "top1"  # what headlines a model (stages.params.Run.score)
    cpu = cpu_int8_support()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kdlib-export-") as tmp:
        work = Path(tmp)
        try:
            fp32 = export_onnx(model, QuantContext(example, batches, threads=threads, workdir=work),
                               work / "fp32.onnx")
            int8 = quantize_qdq_int8(fp32, batches, work / "int8.onnx", work)
        except Skipped as why:
            raise ExportError(f"{checkpoint.path} ({record.arch}): {why}") from None
        for name, raw in ((FP32_FILE, fp32), (INT8_FILE, int8)):
            tagged = ModelInfo(info.task, info.classes, info.preprocessing,
                               {**source, "precision": PRECISIONS[name].split(":")[0]})
            path = with_metadata(raw, out_dir / name, tagged.metadata_props())
            result = evaluate(OrtModule(path, threads), file_loader, normalize, torch.device("cpu"), None, ignore,
                              ap_mode, multilabel_convention)
            files[name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size, "precision": PRECISIONS[name],
                           "backend": f"onnxruntime {ort.__version__} CPUExecutionProvider", "test": _scores(result),
                           "agreement_with_pytorch": _agreement(result, reference, info.task),
                           # a function of the scores; the likely cause (the CPU's VNNI) is added only when flagged
                           "loss_vs_pytorch": accuracy_loss(result.metrics[score] - reference.metrics[score], score,
                                                            PRECISIONS[name].split(":")[0], cpu)}
    files[INT8_FILE]["calibration_images"] = len(calibration)
    card = {
        "format": FORMAT,
        "task": info.task,
        "classes": info.classes,
        "input": {"name": "input", "dtype": "float32",
                  "shape": ["batch", record.in_chans, record.input_size, record.input_size]},
        "output": {"name": "logits", "shape": ["batch", record.num_classes], "probabilities": info.activation},
        "preprocessing": info.preprocessing.to_json(),
        "source": source,
        "test": {"images": len(reference.targets), "pytorch_fp32": _scores(reference)},
        "files": files,
    }
    write_json(out_dir / MODEL_JSON, card)
    return card


def describe(card: dict[str, Any], score: str) -> Sequence[str]:
    """One line per exported file: size, test score and the change from the PyTorch model; a file
    that loses more than the margin (``loss_vs_pytorch.flagged``) is marked ``⚠`` and followed by
    a line saying so and what likely causes it."""
    reference = card["test"]["pytorch_fp32"][score]
    lines = []
    for name, entry in card["files"].items():
        delta = entry["test"][score] - reference
        loss = entry.get("loss_vs_pytorch") or {}
        lines.append(f"{name:18s} {entry['bytes'] / 1024:8.1f} KiB  test {score} {entry['test'][score]:.2f} "
                     f"({'⚠ ' if loss.get('flagged') else ''}{delta:+.2f} vs PyTorch fp32)")
        if loss.get("flagged"):
            lines.append(f"⚠ {name} loses {-delta:.2f} pt of test {score} against the PyTorch model, more than the "
                         f"{loss['margin_pt']:g} pt margin (kdlib.quantize.measure.ACCURACY_LOSS_MARGIN_PT): "
                         f"{loss['likely_cause']}")
    return lines
