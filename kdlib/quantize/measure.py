"""Measuring one model in one precision: accuracy, latency, throughput, peak memory, size, MACs.

Each (model, precision) runs in a fresh process (:func:`run_isolated`) so that its peak resident
memory (Linux ``VmHWM``) is its own and one backend's caches or compiled code cannot leak into
another's timing. Processes come from a ``forkserver`` that has imported torch and this package
once, so a job starts in well under a second and never inherits a used OpenMP pool.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import random
import resource
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from kdlib.process import child_initializer
from kdlib.quantize.base import PRECISIONS, QuantContext, Skipped


class TensorImages(Dataset):
    """Decoded, transformed ``uint8`` images in one tensor, yielding ``(image, target, index)``
    like :class:`kdlib.data.IndexedImageDataset`; one tensor crosses a process boundary cheaply."""

    def __init__(self, images: Tensor, targets: Tensor) -> None:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.images[i], self.targets[i], i


def materialize(dataset: Dataset, indices: list[int] | None = None) -> TensorImages:
    """Decode (and transform) ``dataset`` — or the given ``indices`` of it — into a :class:`TensorImages`."""
    indices = list(range(len(dataset))) if indices is None else indices  # type: ignore[arg-type]
    items = [dataset[i] for i in indices]
    images = torch.stack([im for im, _, _ in items])
    targets = torch.stack([torch.as_tensor(t) for _, t, _ in items])
    return TensorImages(images, targets)


def calibration_sample(train: Dataset, seed: int, count: int) -> Tensor:
    """The ``uint8`` training images static int8 calibrates on: ``count`` of them (all when there
    are fewer) drawn with ``random.Random(seed)``, in index order. The quantize stage measures
    and the export stage deploys int8 models calibrated on exactly these."""
    picks = random.Random(seed).sample(range(len(train)), min(count, len(train)))  # type: ignore[arg-type]
    return materialize(train, sorted(picks)).images


def latency_ms(fn: Callable[[Tensor], Tensor], x: Tensor, warmup: int, runs: int) -> tuple[float, float]:
    """Median and 95th-percentile wall time of ``fn(x)`` in ms over ``runs`` calls after ``warmup``."""
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        for _ in range(runs):
            start = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
    return statistics.median(times), p95


def throughput(fn: Callable[[Tensor], Tensor], x: Tensor, warmup: int, runs: int) -> float:
    """Images/s of ``fn`` on batch ``x``: total images over total time of ``runs`` calls."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        start = time.perf_counter()
        for _ in range(runs):
            fn(x)
    return runs * len(x) / (time.perf_counter() - start)


def count_macs(model: nn.Module, x: Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``x`` (torch.utils.flop_counter counts 2 FLOPs per MAC)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() // 2


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Set this process's peak RSS (``VmHWM``) back to its current RSS (Linux >= 4.0,
    ``/proc/self/clear_refs`` "5"), so a later :func:`peak_rss_bytes` covers only what follows.
    False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


@dataclass
class EvalJob:
    """One model in one precision. Images are ``uint8`` as the loader yields them; the checkpoint's
    mean/std normalize them."""

    model: str  # a label: teacher, baseline, distill, ...
    checkpoint: Path
    precision: str
    test_set: Dataset
    calibration: Tensor  # uint8 training images
    threads: int = 2
    batch_size: int = 256  # accuracy pass
    throughput_batch: int = 64
    warmup: int = 10
    timed_runs: int = 100
    throughput_runs: int = 10
    device: str = "cpu"
    ignore: Tensor | None = None
    ap_mode: str = "voc"


def evaluate_job(job: EvalJob) -> dict[str, Any]:
    """Everything measured for one job, in this process; a :class:`Skipped` precision gives a
    ``skipped`` row with its reason."""
    from kdlib.checkpoint import model_from_checkpoint
    from kdlib.data import BatchNormalizer
    from kdlib.metrics import evaluate
    from kdlib.models import count_parameters

    torch.set_num_threads(job.threads)
    row: dict[str, Any] = {"model": job.model, "precision": job.precision, "threads": job.threads}
    peak_was_reset = reset_peak_rss()
    rss_start = current_rss_bytes()
    model, meta = model_from_checkpoint(job.checkpoint)
    model.eval()  # a checkpoint loader or wrapper may hand back training mode; measure inference
    normalize = BatchNormalizer(meta["mean"], meta["std"])
    row.update(params=count_parameters(model), arch=meta.get("arch"))
    timing_batch = torch.stack([job.test_set[i][0] for i in range(min(job.throughput_batch, len(job.test_set)))])
    example = normalize(timing_batch)
    if len(example) < 2:
        raise ValueError("the test split needs at least 2 images to time and export a model")
    row["macs"] = count_macs(model, example[:1])
    calibration = [normalize(b) for b in job.calibration.split(job.throughput_batch)]
    device = torch.device(job.device)
    with tempfile.TemporaryDirectory(prefix="kdlib-quant-") as tmp:
        ctx = QuantContext(example, calibration, device, job.threads, Path(tmp),
                           static_batch_sizes=(1, job.throughput_batch))
        start = time.perf_counter()
        try:
            prepared = PRECISIONS.get(job.precision)(model, ctx)
        except Skipped as why:
            return {**row, "status": "skipped", "reason": str(why)}
        row["prepare_s"] = round(time.perf_counter() - start, 3)
        prepared.module.eval()  # a fresh wrapper module is in training mode: BatchNorm would use batch stats
        median, p95 = latency_ms(prepared.module, example[:1], job.warmup, job.timed_runs)
        images_s = throughput(prepared.module, example, max(1, job.warmup // 5), job.throughput_runs)
        if peak_was_reset:  # the model's own cost: load, convert, run; the accuracy pass's batches are not
            row["inference_mib"] = round((peak_rss_bytes() - rss_start) / 2**20, 1)
        loader = DataLoader(job.test_set, batch_size=job.batch_size, shuffle=False, num_workers=0)
        start = time.perf_counter()
        result = evaluate(prepared.module, loader, normalize, torch.device("cpu"), None, job.ignore, job.ap_mode)
        row["eval_s"] = round(time.perf_counter() - start, 3)
        artifact = prepared.save(Path(tmp) / "artifact" / f"{job.model}_{job.precision}")
        row.update(
            status="ok", backend=prepared.backend, device=prepared.device.type,
            **{k: round(v, 4) for k, v in result.metrics.items()}, loss=round(result.loss, 6),
            latency_b1_median_ms=round(median, 4), latency_b1_p95_ms=round(p95, 4),
            throughput_img_s=round(images_s, 1), throughput_batch=len(example),
            size_bytes=artifact.stat().st_size, artifact=artifact.suffix,
            stored_dtypes=prepared.stored_dtypes(), notes=prepared.notes,
        )
    row["peak_rss_mib"] = round(peak_rss_bytes() / 2**20, 1)
    row["rss_start_mib"] = round(rss_start / 2**20, 1)
    return row


def _guarded(job: EvalJob) -> dict[str, Any]:
    try:
        return evaluate_job(job)
    except Exception as err:  # noqa: BLE001 - one failing backend must not hide the others' rows
        tail = traceback.format_exc().strip().splitlines()[-1]
        return {"model": job.model, "precision": job.precision, "status": "failed",
                "reason": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else tail}"}


_CONTEXT: multiprocessing.context.BaseContext | None = None


def _context() -> multiprocessing.context.BaseContext:
    global _CONTEXT
    if _CONTEXT is None:
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        _CONTEXT = multiprocessing.get_context(method)
        if method == "forkserver":
            _CONTEXT.set_forkserver_preload(["kdlib.quantize", "kdlib.quantize.measure", "kdlib.checkpoint",
                                             "kdlib.process"])
    return _CONTEXT


def run_isolated(job: EvalJob) -> dict[str, Any]:
    """:func:`evaluate_job` in a fresh process; a crash of that process becomes a ``failed`` row."""
    # the measuring process dies with this one (a cancelled stage leaves no orphan running)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=_context(), initializer=child_initializer) as pool:
        try:
            return pool.submit(_guarded, job).result()
        except concurrent.futures.process.BrokenProcessPool as err:
            return {"model": job.model, "precision": job.precision, "status": "failed",
                    "reason": f"evaluation process died: {err}"}


def add_deltas(rows: list[dict[str, Any]], score: str) -> list[dict[str, Any]]:
    """``delta_<score>`` (pt) and ``size_ratio`` / ``speedup_b1`` against the same model's fp32 row."""
    fp32 = {r["model"]: r for r in rows if r["precision"] == "fp32" and r.get("status") == "ok"}
    for r in rows:
        ref = fp32.get(r["model"])
        if r.get("status") != "ok" or ref is None:
            continue
        r[f"delta_{score}"] = round(r[score] - ref[score], 4)
        r["size_ratio"] = round(ref["size_bytes"] / r["size_bytes"], 3)
        r["speedup_b1"] = round(ref["latency_b1_median_ms"] / r["latency_b1_median_ms"], 3)
        r["speedup_throughput"] = round(r["throughput_img_s"] / ref["throughput_img_s"], 3)
    return rows


def measure_precisions(model: str, checkpoint: Path, test_set: Dataset, calibration: Tensor, settings: Any,
                       device: str, ignore: Tensor | None = None, ap_mode: str = "voc",
                       report: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """One row per precision of ``settings.precisions`` (a :class:`kdlib.quantize.EvalSettings`),
    each measured in a fresh process (:func:`run_isolated`), with deltas against fp32 when it is
    among them; ``report`` is called with each row as it is done."""
    rows = []
    for precision in settings.precisions:
        job = EvalJob(model, checkpoint, precision, test_set, calibration, settings.threads, settings.batch_size,
                      settings.throughput_batch, settings.warmup_runs, settings.timed_runs, settings.throughput_runs,
                      device, ignore, ap_mode)
        rows.append(run_isolated(job))
        if report is not None:
            report(rows[-1])
    return rows
