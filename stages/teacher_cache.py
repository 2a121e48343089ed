"""teacher_cache: run the teacher once over the views the student will train on, and store its outputs.

For each training image, ``K`` augmented views (``teacher_cache.views``; default: one per student epoch)
whose seeds rebuild them exactly; the teacher's logits on each (top-k when a single-label data set has
more classes than ``teacher_cache.topk``), pooled features for feature methods, and the layers a
feature-map method reads. ``distill`` replays the views and reads these, after checking the cache's key
(teacher checkpoint, prepared data, transform, views, seed, layers). With ``teacher_cache.enabled: false``,
or layers over ``teacher_cache.max_layer_mib`` (known from the layer plan before any teacher pass), it
writes only ``cache.json``, with the reason and its numbers; ``distill`` then runs the teacher online.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from kdlib.checkpoint import Checkpoint
from kdlib.data.transforms import BatchNormalizer
from kdlib.data.views import AugmentedViews, make_view_seeds
from kdlib.distill import load_teacher
from kdlib.io import write_json
from kdlib.resume import ResumeStore
from kdlib.runtime import Runtime, seed_everything
from kdlib.teacher_cache import build_teacher_cache, save_skipped
from stages.launch import parse_stage_args, stage_main
from stages.params import Run
from stages.workspace import Workspace


def build_cache(run: Run, ws: Workspace = Workspace(), progress: bool = True, out_dir: Path | None = None,
                runtime: Runtime | None = None) -> dict[str, Any]:
    """Build the cache into ``out_dir`` (default ``ws.teacher_cache``), or its marker; returns a summary. Under
    several processes each runs the teacher on its share of the views; each machine's local rank 0 writes it."""
    settings, out_dir = run.params.teacher_cache, ws.teacher_cache if out_dir is None else out_dir
    runtime = Runtime.from_env(run.params.runtime.device) if runtime is None else runtime
    if runtime.writes_outputs:
        shutil.rmtree(out_dir, ignore_errors=True)
    index = ws.index() if run.cache_used else None
    key = None if index is None else run.teacher_cache_key(ws.teacher_checkpoint, ws.index_files, index)
    reason = None if index is None else run.cache_skip_reason(index)
    if index is None or reason is not None:  # only a marker; distill runs the teacher online (and says why)
        if runtime.writes_outputs:
            save_skipped(out_dir, reason, key)
        return {"enabled": False, "build_seconds": 0.0, "reason": reason}
    seed_everything(run.seed)
    teacher = load_teacher(Checkpoint.read(ws.teacher_checkpoint), index.meta, runtime, run.method.cls.needs_features)
    teacher.tap(run.teacher_layers[0])  # none for a method that reads no layers
    train_set = run.train_dataset("distill").load(run.training_index(index, "distill"), "train", run.student.input_size,
                                                  True, *ws.pixel_cache_for(run))
    views = AugmentedViews(train_set, make_view_seeds(run.seed, len(train_set), run.num_views))
    # top-k with a uniform tail approximates a softmax; independent sigmoids need every logit
    topk = None if run.task == "multilabel" else settings.topk
    start = time.perf_counter()
    cache = build_teacher_cache(teacher, views, BatchNormalizer(index.meta.mean, index.meta.std), runtime.device,
                                settings.batch_size, key=key, topk=topk, progress=progress and runtime.is_main,
                                rank=runtime.rank, world=runtime.world_size)
    if runtime.writes_outputs:
        cache.save(out_dir)
    peak = torch.cuda.max_memory_allocated(runtime.device) if runtime.device.type == "cuda" else None
    return {"enabled": True, "images": cache.num_images, "views": cache.num_views, "features": teacher.features,
            "bytes": cache.nbytes, "build_seconds": time.perf_counter() - start, "peak_cuda_memory_bytes": peak}


def main() -> None:
    args, ws = parse_stage_args(__doc__), Workspace()
    timing = ws.reports / "teacher_cache" / "timing.json"

    def work(run: Run, out, runtime: Runtime, resume: ResumeStore | None) -> None:
        summary = build_cache(run, ws, out_dir=out(ws.teacher_cache), runtime=runtime)
        if runtime.writes_outputs:
            write_json(out(timing), {"build_seconds": round(summary["build_seconds"], 2),
                                     "peak_cuda_memory_bytes": summary.get("peak_cuda_memory_bytes")})
        if not runtime.is_main:
            return
        if summary["enabled"]:
            print(f"teacher_cache: {summary['images']} images x {summary['views']} views, "
                  f"{summary['bytes'] / 2**20:.1f} MiB{' with features' if summary['features'] else ''}, "
                  f"{summary['build_seconds']:.1f} s, {runtime.world_size} process(es)")
        else:
            print(f"teacher_cache: {summary.get('reason') or 'disabled (distill runs the teacher online)'}")

    stage_main("teacher_cache", args, ["teacher_cache"], (ws.teacher_cache, timing), ws.root, work,
               prepare=lambda run: run if run.cache_used else run.single_process())


if __name__ == "__main__":
    main()
