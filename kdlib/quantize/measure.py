"""Measuring one model in one precision: accuracy, latency, throughput, peak memory, size, MACs.

Each (model, precision) runs in a fresh process (:func:`run_isolated`) so that its peak resident
memory (Linux ``VmHWM``) is its own and one backend's caches or compiled code cannot leak into
another's timing. Processes come from a ``forkserver`` that has imported torch and this package
once, so a job starts in well under a second and never inherits a used OpenMP pool.

Two things a row must not present as plain fact:

* **A converted model that loses accuracy.** Every row scoring more than
  :data:`ACCURACY_LOSS_MARGIN_PT` points below the same model's fp32 row is flagged
  (``accuracy_loss_flagged``, with ``accuracy_loss_margin_pt``; :func:`add_deltas`), and every row
  records the CPU's int8 capability (:func:`cpu_int8_support`): x86 int8 kernels without VNNI
  sum u8·s8 products in saturating 16-bit lanes (``vpmaddubsw``), so ONNX Runtime's static int8
  lost 13 pt of top-1 on one AVX2-only CPU and 0.02 on an AVX512-VNNI one. The export stage
  (:mod:`kdlib.export`) flags its files with the same margin and wording (:func:`accuracy_loss`).
* **A latency measured on a busy machine.** Batch-1 latency is timed :data:`LATENCY_ATTEMPTS`
  times at most (:func:`measure_latency`): until the spread of the calls (90th percentile over the
  median) is at most :data:`LATENCY_SPREAD_BOUND`; a row whose calmest attempt is still more
  spread is ``latency_b1_noisy`` (the same fp32 model once timed 1.0 ms and 162 ms in two runs
  of a loaded 2-core machine).
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import random
import math
import resource
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

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


# A converted model (any precision but fp32, and the export's ONNX files) scoring more than this many
# points (test top-1 or mAP, %) below its fp32 reference is flagged. Seeds move a student's top-1 by
# about 0.3 pt and a sound int8 conversion by less than 0.5 (README, "Quantized evaluation"); a
# loss above 1 pt is a broken conversion or a CPU whose int8 kernels saturate, not noise.
ACCURACY_LOSS_MARGIN_PT = 1.0
# Batch-1 latency is re-timed while the 90th percentile of its calls exceeds the median by more than
# this factor, i.e. while over a tenth of the calls took more than twice the typical one: the model's
# work per call is the same every time, so that much spread is other processes taking the cores. On
# this 2-core machine shared with 4 busy processes (load average 4.7) p90/median was 4-40 for ResNet-18
# and a 56 k-parameter CNN, and their medians moved 2x between back-to-back timings.
LATENCY_SPREAD_BOUND = 2.0
LATENCY_ATTEMPTS = 3  # timings of one row at most (the first included) before it is flagged noisy
LATENCY_PAUSE_S = 0.5  # between attempts: a burst of other work may pass
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # /proc/cpuinfo flags of x86 int8 dot products


def _percentile(sorted_times: list[float], q: float) -> float:
    """The ``q`` quantile of ascending ``sorted_times`` (nearest rank, as the p95 always was)."""
    return sorted_times[min(len(sorted_times) - 1, int(round(q * (len(sorted_times) - 1))))]


def latency_ms(fn: Callable[[Tensor], Tensor], x: Tensor, warmup: int, runs: int) -> tuple[float, float]:
    """Median and 95th-percentile wall time of ``fn(x)`` in ms over ``runs`` calls after ``warmup``."""
    times = _timed_calls(fn, x, warmup, runs)
    return statistics.median(times), _percentile(times, 0.95)


def _timed_calls(fn: Callable[[Tensor], Tensor], x: Tensor, warmup: int, runs: int) -> list[float]:
    """Wall time of each of ``runs`` calls ``fn(x)`` after ``warmup`` untimed ones, ms, ascending."""
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        for _ in range(runs):
            start = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)


@dataclass(frozen=True)
class LatencyStats:
    """Batch-1 latency of one model: the attempt with the smallest spread (p90 / median) of those
    made, how many were made, and whether even that one is more spread than the bound."""

    median_ms: float
    p90_ms: float
    p95_ms: float
    spread: float  # p90 / median of the reported attempt
    attempts: int
    spreads: tuple[float | None, ...]  # of every attempt, in order (None: a median of 0)
    noisy: bool

    def row(self) -> dict[str, Any]:
        """The quantize row's ``latency_b1_*`` fields."""
        return {"latency_b1_median_ms": round(self.median_ms, 4), "latency_b1_p90_ms": round(self.p90_ms, 4),
                "latency_b1_p95_ms": round(self.p95_ms, 4), "latency_b1_spread": round(self.spread, 3) if math.isfinite(self.spread) else None,
                "latency_b1_attempts": self.attempts, "latency_b1_noisy": self.noisy,
                "latency_b1_spread_bound": LATENCY_SPREAD_BOUND}


def measure_latency(fn: Callable[[Tensor], Tensor], x: Tensor, warmup: int, runs: int,
                    bound: float = LATENCY_SPREAD_BOUND, attempts: int = LATENCY_ATTEMPTS,
                    pause_s: float = LATENCY_PAUSE_S) -> LatencyStats:
    """Time ``fn(x)`` (``runs`` calls after ``warmup``) until the calls' p90 / median is at most
    ``bound``, ``attempts`` times at most, ``pause_s`` apart; the least spread attempt is kept.

    A median over calls half of which waited for a core says nothing about the model: the spread
    tells such a run from a quiet one (:data:`LATENCY_SPREAD_BOUND`), and the row says so rather
    than show a plain number (``noisy``)."""
    best: tuple[float, list[float]] | None = None
    spreads = []
    for attempt in range(max(1, attempts)):
        if attempt:
            time.sleep(pause_s)
        times = _timed_calls(fn, x, warmup, runs)
        median = statistics.median(times)
        spread = _percentile(times, 0.9) / median if median > 0 else float("inf")
        spreads.append(spread)
        if best is None or spread < best[0]:
            best = (spread, times)
        if spread <= bound:
            break
    spread, times = best
    return LatencyStats(statistics.median(times), _percentile(times, 0.9), _percentile(times, 0.95), spread,
                        len(spreads), tuple(round(s, 3) if math.isfinite(s) else None for s in spreads), spread > bound)


def cpu_int8_support(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """What this CPU offers int8 kernels: torch's vector capability
    (``torch.backends.cpu.get_cpu_capability()``: ``AVX2``, ``AVX512``, ...; it does not name
    VNNI) and whether the CPU has an int8 dot-product instruction (``avx512_vnni``, ``avx_vnni``
    or ``amx_int8`` among ``/proc/cpuinfo``'s flags; None where that file is missing)."""
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        capability = "unknown"
    try:
        flags: set[str] = set()
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "flags":
                flags = set(value.split())
                break
        vnni: list[str] | None = [f for f in _VNNI_FLAGS if f in flags]
    except OSError:
        vnni = None
    return {"torch_capability": capability, "vnni": None if vnni is None else bool(vnni),
            "vnni_flags": vnni or []}


def int8_cpu_note(cpu: Mapping[str, Any] | None) -> str:
    """Which CPU capability likely explains a converted model's accuracy loss, in words."""
    if not cpu:
        return "the CPU it ran on is not recorded"
    capability = cpu.get("torch_capability", "unknown")
    if cpu.get("vnni") is False:
        return (f"the CPU it ran on (torch capability {capability}) has no VNNI: x86 int8 kernels (ONNX "
                "Runtime's U8S8, oneDNN) then sum u8·s8 products in saturating 16-bit lanes (vpmaddubsw), which "
                "can cost many points; measure on a CPU with AVX512-VNNI / AVX-VNNI, or quantize with "
                "reduce_range=True")
    if cpu.get("vnni"):
        flags = ", ".join(cpu.get("vnni_flags") or ["VNNI"])
        return (f"the CPU it ran on (torch capability {capability}, {flags}) has int8 dot products, so 16-bit "
                "saturation is not the cause: suspect the calibration images or the conversion")
    return f"torch capability {capability}; whether the CPU has VNNI (int8 dot products) is unknown"


def loss_cause(precision: str, cpu: Mapping[str, Any] | None) -> str:
    """The likely cause of ``precision`` losing accuracy: the CPU's int8 capability for an int8
    precision (:func:`int8_cpu_note`), the conversion itself for any other."""
    if "int8" in precision:
        return int8_cpu_note(cpu)
    if precision in ("fp32", "fp32_channels_last", "onnx_fp32"):
        return "an fp32 path should match PyTorch's fp32 model: the conversion or export is broken"
    return (f"no int8 kernel is involved: {precision} itself loses it (fp16 overflows above 65504; bf16 and fp8 "
            "round to 8 and 4 significant bits)")


def accuracy_loss(delta: float, score: str, precision: str, cpu: Mapping[str, Any] | None = None,
                  margin: float = ACCURACY_LOSS_MARGIN_PT) -> dict[str, Any]:
    """The flag of a converted model in ``precision`` scoring ``delta`` points (``score``) against
    its fp32 reference: ``flagged`` when it loses more than ``margin``, with the likely cause then
    (:func:`loss_cause`)."""
    flagged = delta < -margin
    entry: dict[str, Any] = {"score": score, "delta": round(delta, 4), "margin_pt": margin, "flagged": flagged}
    if flagged:
        entry["likely_cause"] = loss_cause(precision, cpu)
    return entry


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
    multilabel_convention: str = "kdlib"  # kdlib.multilabel, "Conventions"


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
        latency = measure_latency(prepared.module, example[:1], job.warmup, job.timed_runs)
        images_s = throughput(prepared.module, example, max(1, job.warmup // 5), job.throughput_runs)
        if peak_was_reset:  # the model's own cost: load, convert, run; the accuracy pass's batches are not
            row["inference_mib"] = round((peak_rss_bytes() - rss_start) / 2**20, 1)
        loader = DataLoader(job.test_set, batch_size=job.batch_size, shuffle=False, num_workers=0)
        start = time.perf_counter()
        result = evaluate(prepared.module, loader, normalize, torch.device("cpu"), None, job.ignore, job.ap_mode,
                          job.multilabel_convention)
        row["eval_s"] = round(time.perf_counter() - start, 3)
        artifact = prepared.save(Path(tmp) / "artifact" / f"{job.model}_{job.precision}")
        row.update(
            status="ok", backend=prepared.backend, device=prepared.device.type,
            **{k: round(v, 4) for k, v in result.metrics.items()}, loss=round(result.loss, 6),
            **latency.row(), throughput_img_s=round(images_s, 1), throughput_batch=len(example),
            size_bytes=artifact.stat().st_size, artifact=artifact.suffix,
            stored_dtypes=prepared.stored_dtypes(), notes=prepared.notes, cpu=cpu_int8_support(),
            load_average_1m=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
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
    """``delta_<score>`` (pt) and ``size_ratio`` / ``speedup_b1`` against the same model's fp32 row,
    and ``accuracy_loss_flagged`` (a loss of more than :data:`ACCURACY_LOSS_MARGIN_PT`, stored as
    ``accuracy_loss_margin_pt``; ``accuracy_loss_cause`` then says which CPU capability likely
    explains it, from the row's ``cpu``)."""
    fp32 = {r["model"]: r for r in rows if r["precision"] == "fp32" and r.get("status") == "ok"}
    for r in rows:
        ref = fp32.get(r["model"])
        if r.get("status") != "ok" or ref is None:
            continue
        r[f"delta_{score}"] = round(r[score] - ref[score], 4)
        loss = accuracy_loss(r[f"delta_{score}"], score, r["precision"], r.get("cpu"))
        r["accuracy_loss_flagged"], r["accuracy_loss_margin_pt"] = loss["flagged"], loss["margin_pt"]
        if loss["flagged"]:
            r["accuracy_loss_cause"] = loss["likely_cause"]
        r["size_ratio"] = round(ref["size_bytes"] / r["size_bytes"], 3)
        r["speedup_b1"] = round(ref["latency_b1_median_ms"] / r["latency_b1_median_ms"], 3)
        r["speedup_throughput"] = round(r["throughput_img_s"] / ref["throughput_img_s"], 3)
    return rows


def measure_precisions(model: str, checkpoint: Path, test_set: Dataset, calibration: Tensor, settings: Any,
                       device: str, ignore: Tensor | None = None, ap_mode: str = "voc",
                       report: Callable[[dict[str, Any]], None] | None = None, *,
                       multilabel_convention: str = "kdlib") -> list[dict[str, Any]]:
    """One row per precision of ``settings.precisions`` (a :class:`kdlib.quantize.EvalSettings`),
    each measured in a fresh process (:func:`run_isolated`), with deltas against fp32 when it is
    among them; ``report`` is called with each row as it is done."""
    rows = []
    for precision in settings.precisions:
        job = EvalJob(model, checkpoint, precision, test_set, calibration, settings.threads, settings.batch_size,
                      settings.throughput_batch, settings.warmup_runs, settings.timed_runs, settings.throughput_runs,
                      device, ignore, ap_mode, multilabel_convention)
        rows.append(run_isolated(job))
        if report is not None:
            report(rows[-1])
    return rows
