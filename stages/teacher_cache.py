"""teacher_cache: run the teacher once over the views the student will train on, and store its outputs.

For each training image, ``K`` augmented views (``teacher_cache.views``; by default one per
student epoch) whose seeds rebuild them exactly; the teacher's logits on each view (top-k
compressed when a single-label data set has more classes than ``teacher_cache.topk``) and, for feature methods,
its pooled features. ``distill`` replays the same views and reads these instead of running the
teacher, after checking the cache's key (teacher checkpoint, prepared data, transform, views,
seed). With ``teacher_cache.enabled: false`` it writes only ``cache.json`` saying so.
"""
from __future__ import annotations

import shutil
import time
from typing import Any

from kdlib.data.index import DatasetIndex
from kdlib.data.views import AugmentedViews
from kdlib.runtime import Runtime, seed_everything
from kdlib.teacher_cache import build_teacher_cache
from stages import distillation as D
from stages.common import Workspace, normalizer_for, prepared_index, write_json
from stages.params import load_params


def build_cache(params: dict[str, Any], index: DatasetIndex, ws: Workspace = Workspace(),
                progress: bool = True) -> dict[str, Any]:
    """Build the cache into ``ws.teacher_cache`` (or the disabled marker); returns a summary."""
    settings = params["teacher_cache"]
    shutil.rmtree(ws.teacher_cache, ignore_errors=True)
    if not settings["enabled"]:
        write_json(ws.teacher_cache / "cache.json", {"enabled": False})
        return {"enabled": False, "build_seconds": 0.0}
    D.refuse_mixing_with_cache(params)
    seed_everything(params["seed"])
    runtime = Runtime.from_env("auto")
    features = getattr(D.method_class(params), "needs_features", False)
    teacher, _ = D.load_teacher(index, runtime, features, ws)
    train_set, _ = D.train_sets(params, index)
    views = AugmentedViews(train_set, D.training_view_seeds(params, len(train_set)))
    # top-k with a uniform tail approximates a softmax; independent sigmoids need every logit
    topk = None if index.meta.task == "multilabel" else settings["topk"]
    start = time.perf_counter()
    cache = build_teacher_cache(teacher, views, normalizer_for(index), runtime.device, settings["batch_size"],
                                key=D.expected_cache_key(params, index, ws), topk=topk, progress=progress)
    cache.save(ws.teacher_cache)
    return {"enabled": True, "images": cache.num_images, "views": cache.num_views, "features": features,
            "bytes": cache.nbytes, "build_seconds": time.perf_counter() - start}


def main() -> None:
    params = load_params()
    ws = Workspace()
    summary = build_cache(params, prepared_index(), ws)
    write_json(ws.reports / "teacher_cache" / "timing.json", {"build_seconds": round(summary["build_seconds"], 2)})
    if summary["enabled"]:
        print(f"teacher_cache: {summary['images']} images x {summary['views']} views, "
              f"{summary['bytes'] / 2**20:.1f} MiB{' with features' if summary['features'] else ''}, "
              f"{summary['build_seconds']:.1f} s")
    else:
        print("teacher_cache: disabled (distill runs the teacher online)")


if __name__ == "__main__":
    main()
