"""The teacher-output cache: what distillation costs per epoch with and without the teacher.

On the default data, one teacher (the pipeline's), and per seed, side by side in one process:
the baseline student (labels only), KD with the teacher run online every step, and KD reading
the teacher cache (built once per seed over the same views, so online and cached KD train on
identical views and should reach the same accuracy). Reports the median per-epoch wall time of
each variant, the cache's build time and size, and test top-1 per variant.
Targets: cached KD epoch <= 1.15 x baseline epoch; cached top-1 within 0.3 pt of online top-1.

    python bench/kd_cache.py [--quick] [--seeds 0 1 2]
"""
from __future__ import annotations

import copy
import statistics
import tempfile
from pathlib import Path
from typing import Any

from common import bench_parser, default_params, print_table, shrink, write_result

from kdlib.checkpoint import Checkpoint
from kdlib.data.index import DatasetIndex
from stages.evaluate import evaluate_checkpoint
from stages.params import resolve
from stages.pipeline import prepare, train_pipeline
from stages.teacher_cache import build_cache
from stages.train import train_role
from stages.workspace import Workspace


def run_variant(params: dict[str, Any], index: DatasetIndex, ws: Workspace, variant: str) -> dict[str, Any]:
    role = "baseline" if variant == "baseline" else "distill"
    build = {"build_seconds": 0.0}
    if role == "distill":
        params["teacher_cache"]["enabled"] = variant == "cached"
    run = resolve(params)
    if role == "distill":
        build = build_cache(run, ws, progress=False)
    result, _ = train_role(run, role, ws, progress=False)
    return {"epoch_seconds": result.epoch_seconds, "build_seconds": build["build_seconds"],
            "cache_bytes": build.get("bytes", 0),
            "top1": evaluate_checkpoint(run, index, Checkpoint.read(ws.checkpoint(role))).top1}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    params = default_params()
    params["distill"]["method"] = "kd"
    if args.quick:
        params = shrink(params, per_class=10, epochs=2)
    variants = ("baseline", "online", "cached")
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp))
        run = resolve(params)
        index = prepare(run, ws)
        train_pipeline(run, ws, roles=("teacher",))
        for seed in args.seeds:
            for variant in variants:  # interleaved, so machine noise hits all three alike
                seeded = copy.deepcopy(params)
                seeded["seed"] = seed
                runs[variant].append(run_variant(seeded, index, ws, variant))
            print(f"seed {seed}: " + "  ".join(f"{v} {runs[v][-1]['top1']:.2f}" for v in variants), flush=True)

    epoch_s = {v: statistics.median(s for r in runs[v] for s in r["epoch_seconds"]) for v in variants}
    top1 = {v: [r["top1"] for r in runs[v]] for v in variants}
    gaps = [c - o for c, o in zip(top1["cached"], top1["online"])]

    def mean_std(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    rows = []
    for v in variants:
        m, s = mean_std(top1[v])
        rows.append([v, epoch_s[v], f"{epoch_s[v] / epoch_s['baseline']:.2f}x", m, s])
    student = params["models"][params["student"]]
    print(f"\n{params['teacher']} -> {params['student']}, {len(index.split('train'))} training images, "
          f"{student['epochs']} epochs, batch {student['batch_size']}, seeds {args.seeds}")
    print_table(["variant", "epoch s (median)", "vs baseline", "test top-1 mean", "std"], rows)
    build_s = statistics.mean(r["build_seconds"] for r in runs["cached"])
    print(f"cache: built in {build_s:.1f} s per seed ({runs['cached'][0]['cache_bytes'] / 2**20:.2f} MiB); "
          f"cached - online top-1 per seed: {', '.join(f'{g:+.2f}' for g in gaps)}")
    ratio = epoch_s["cached"] / epoch_s["baseline"]
    speed_met, acc_met = ratio <= 1.15, all(abs(g) <= 0.3 for g in gaps)
    print(f"targets: cached epoch <= 1.15x baseline ({ratio:.2f}x): {'met' if speed_met else 'NOT met'}; "
          f"cached within 0.3 pt of online: {'met' if acc_met else 'NOT met'}")
    write_result("kd_cache", {
        "quick": args.quick, "teacher": params["teacher"], "student": params["student"], "seeds": args.seeds,
        "epoch_s_baseline": epoch_s["baseline"], "epoch_s_online": epoch_s["online"],
        "epoch_s_cached": epoch_s["cached"], "cached_vs_baseline": ratio,
        "online_vs_baseline": epoch_s["online"] / epoch_s["baseline"],
        **{f"top1_{v}": top1[v] for v in variants},
        **{f"top1_{v}_mean": mean_std(top1[v])[0] for v in variants},
        "cached_minus_online_top1": gaps, "cache_build_seconds": build_s,
        "cache_bytes": runs["cached"][0]["cache_bytes"], "speed_target_met": speed_met,
        "accuracy_target_met": acc_met,
    }, args.out)


if __name__ == "__main__":
    main()
