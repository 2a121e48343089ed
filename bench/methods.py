"""Every distillation method on the default data against its baseline student (mdistiller's table).

For each method: test top-1 (best checkpoint) mean ± std over seeds, the paired gain over the
baseline student of the same seed (same initialization and views), the median time of one
training step, and the parameters the method adds to the student (feature methods' feat_fc;
LSH hyperplanes are fixed training-only buffers and are not counted). One teacher (the
pipeline's), the teacher cache on, alignment as the pipeline does it for feature methods.

Two groups: the CNN student (``cnn_small``) with logit and feature methods, and the DeiT student
(``deit``, with a distillation token) with logit KD and DeiT's soft/hard token distillation; the
DeiT group trains ``--deit-epochs`` epochs (the preset's 60 take ~2.5 min a run here).

    python bench/methods.py [--quick] [--seeds 0 1 2] [--groups cnn deit] [--deit-epochs 20]
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
from stages.align import align
from stages.evaluate import evaluate_checkpoint
from stages.params import resolve
from stages.pipeline import prepare, train_pipeline
from stages.teacher_cache import build_cache
from stages.train import train_role
from stages.workspace import Workspace

GROUPS = {
    "cnn": ("cnn_small", ["baseline", "kd", "l2", "lsh", "lshl2", "lshl2_s"]),
    "deit": ("deit", ["baseline", "kd", "deit_soft", "deit_hard"]),
}


def run_method(params: dict[str, Any], index: DatasetIndex, ws: Workspace, method: str) -> dict[str, Any]:
    role = "baseline" if method == "baseline" else "distill"
    align_seconds = 0.0
    if role == "distill":
        params["distill"]["method"] = method
    run = resolve(params)
    if role == "distill":
        build_cache(run, ws, progress=False)
        align_seconds = align(run, ws).get("train_seconds", 0.0)
    result, n_params = train_role(run, role, ws, progress=False)
    steps = -(-len(index.split("train")) // run.student.recipe.batch_size)
    return {"top1": evaluate_checkpoint(run, index, Checkpoint.read(ws.checkpoint(role))).top1, "params": n_params,
            "step_ms": 1000 * statistics.median(result.epoch_seconds) / steps, "align_seconds": align_seconds}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--groups", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    parser.add_argument("--deit-epochs", type=int, default=20)
    parser.add_argument("--methods", nargs="+", help="only these (the baseline is always run)")
    args = parser.parse_args()
    params = default_params()
    params["models"]["deit"]["epochs"] = args.deit_epochs
    if args.quick:
        params = shrink(params, per_class=10, epochs=2)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp))
        run = resolve(params)
        index = prepare(run, ws)
        train_pipeline(run, ws, roles=("teacher",))
        teacher_top1 = evaluate_checkpoint(run, index, Checkpoint.read(ws.teacher_checkpoint)).top1
        for group in args.groups:
            student, methods = GROUPS[group]
            methods = [m for m in methods if m == "baseline" or not args.methods or m in args.methods]
            results[group] = {m: [] for m in methods}
            for seed in args.seeds:
                for method in methods:
                    cell = copy.deepcopy(params)
                    cell.update(seed=seed, student=student)
                    results[group][method].append(run_method(cell, index, ws, method))
                    r = results[group][method][-1]
                    print(f"{group} seed {seed} {method}: top-1 {r['top1']:.2f}, {r['step_ms']:.1f} ms/step",
                          flush=True)

    def mean_std(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    rows, summary = [], []
    for group, by_method in results.items():
        base = by_method["baseline"]
        for method, runs in by_method.items():
            top1, gains = mean_std([r["top1"] for r in runs]), mean_std(
                [r["top1"] - b["top1"] for r, b in zip(runs, base)])
            step = statistics.median(r["step_ms"] for r in runs)
            extra = runs[0]["params"] - base[0]["params"]
            rows.append([GROUPS[group][0], method, f"{top1[0]:.2f} ± {top1[1]:.2f}",
                         "" if method == "baseline" else f"{gains[0]:+.2f} ± {gains[1]:.2f}",
                         step, f"{step / statistics.median(r['step_ms'] for r in base):.2f}x", f"{extra:,}"])
            summary.append({"student": GROUPS[group][0], "method": method, "top1": [r["top1"] for r in runs],
                            "top1_mean": top1[0], "top1_std": top1[1], "gain_mean": gains[0], "gain_std": gains[1],
                            "step_ms": step, "extra_params": extra,
                            "align_seconds": statistics.mean(r["align_seconds"] for r in runs)})
    print(f"\nteacher {params['teacher']} test top-1 {teacher_top1:.2f}; seeds {args.seeds}; "
          f"{len(index.split('train'))} training images; cnn_small {params['models']['cnn_small']['epochs']} epochs, "
          f"deit {params['models']['deit']['epochs']} epochs; teacher cache on")
    print_table(["student", "method", "test top-1", "gain vs baseline", "ms/step", "step vs baseline",
                 "extra params"], rows)
    write_result("methods", {"quick": args.quick, "seeds": args.seeds, "teacher": params["teacher"],
                             "teacher_top1": teacher_top1, "deit_epochs": params["models"]["deit"]["epochs"],
                             "knobs": {m: params["distill"][m] for m in params["distill"] if m != "method"},
                             "methods": summary}, args.out)


if __name__ == "__main__":
    main()
