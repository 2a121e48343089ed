"""KD gain on the default data: KD student minus baseline student, test top-1, over seeds.

One teacher (the pipeline's, seed 0) and, per seed, a baseline and a KD student with the
same initialization and batch order: the differences are paired. Target: mean gain >= +1.0 pt
and larger than 2 std of the paired differences.

    python bench/kd_gain.py [--quick] [--seeds 0 1 2]
"""
from __future__ import annotations

import copy
import statistics
import tempfile
from pathlib import Path

from common import bench_parser, default_params, print_table, shrink, write_result

from kdlib.checkpoint import Checkpoint
from stages.evaluate import evaluate_checkpoint
from stages.params import resolve
from stages.pipeline import prepare, train_pipeline
from stages.workspace import Workspace


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    params = default_params()
    if args.quick:
        params = shrink(params)
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp))
        run = resolve(params)
        index = prepare(run, ws)
        train_pipeline(run, ws, roles=("teacher",))
        teacher_top1 = evaluate_checkpoint(run, index, Checkpoint.read(ws.teacher_checkpoint)).top1
        rows = []
        for seed in args.seeds:
            seeded = copy.deepcopy(params)
            seeded["seed"] = seed
            run = resolve(seeded)
            train_pipeline(run, ws, roles=("baseline", "distill"))
            top1 = {role: evaluate_checkpoint(run, index, Checkpoint.read(ws.checkpoint(role))).top1
                    for role in ("baseline", "distill")}
            rows.append({"seed": seed, "baseline_top1": top1["baseline"], "kd_top1": top1["distill"],
                         "gain": top1["distill"] - top1["baseline"]})
            print(f"seed {seed}: baseline {top1['baseline']:.2f}  KD {top1['distill']:.2f}  "
                  f"gain {rows[-1]['gain']:+.2f}", flush=True)

    def mean_std(key: str) -> tuple[float, float]:
        values = [r[key] for r in rows]
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    (b_mean, b_std), (k_mean, k_std), (g_mean, g_std) = (mean_std(k) for k in ("baseline_top1", "kd_top1", "gain"))
    method = params["distill"]["method"]
    print(f"\nteacher {params['teacher']} test top-1 {teacher_top1:.2f}; student {params['student']}; "
          f"{method} {params['distill'][method]}; teacher cache {params['teacher_cache']['enabled']}")
    print_table(["seed", "baseline top-1", "KD top-1", "gain (pt)"],
                [[r["seed"], r["baseline_top1"], r["kd_top1"], r["gain"]] for r in rows]
                + [["mean", b_mean, k_mean, g_mean], ["std", b_std, k_std, g_std]])
    met = g_mean >= 1.0 and g_mean > 2 * g_std
    print(f"gain {g_mean:+.2f} ± {g_std:.2f} pt; target (>= +1.0 and > 2 std): {'met' if met else 'NOT met'}")
    write_result("kd_gain", {
        "quick": args.quick, "teacher": params["teacher"], "student": params["student"], "distill": {"method": method, **params["distill"][method]},
        "data": {**params["data"], **params["datasets"][params["dataset"]].get("options", {})},
        "teacher_top1": teacher_top1, "seeds": rows,
        "baseline_top1_mean": b_mean, "baseline_top1_std": b_std, "kd_top1_mean": k_mean, "kd_top1_std": k_std,
        "gain_mean": g_mean, "gain_std": g_std, "target_met": met,
    }, args.out)


if __name__ == "__main__":
    main()
