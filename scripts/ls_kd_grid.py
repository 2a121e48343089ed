"""Seed 001's grid, label-smoothed teacher x KD temperature, as one queued DVC experiment sweep.

    python scripts/ls_kd_grid.py REPO [--ls 0 0.1] [--temperatures 1 2 3 64] [--alpha 1.0] [--set key=value ...]

Queues ``dvc exp run --queue -S teacher_ls=0,0.1 -S distill.kd.temperature=1,2,3,64
-S distill.kd.alpha=1.0`` in REPO (a teacher per smoothing value, reused by DVC's run cache across
temperatures), runs the queue, and prints one row per experiment from ``dvc exp show --json``:
teacher top-1, KD student top-1 and its gain over the baseline student (which does not depend on
either knob). Writes ``reports/bench/ls_kd_grid.json``. Seed 001's question: does a teacher trained
with label smoothing distil worse, and does that depend on T?
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rescnn_sweep import dvc, experiments, run_queue


def rows_from_exp_show(data: list) -> list[dict]:
    rows = []
    for name, params, metrics in experiments(data):
        evaluation = metrics.get("reports/evaluate/metrics.json")
        if not evaluation or params.get("teacher_ls") is None:  # the workspace's commit is not a grid cell
            continue
        score = "top1" if "kd_gain_top1" in evaluation else "mAP"
        rows.append({"exp": name, "teacher_ls": params["teacher_ls"],
                     "temperature": params["distill"]["kd"]["temperature"],
                     "alpha": params["distill"]["kd"]["alpha"], "score": score,
                     "teacher": evaluation["teacher"]["best"][score], "baseline": evaluation["baseline"]["best"][score],
                     "distill": evaluation["distill"]["best"][score], "kd_gain": evaluation[f"kd_gain_{score}"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("repo", type=Path)
    ap.add_argument("--ls", nargs="+", default=["0", "0.1"], help="teacher label smoothing values")
    ap.add_argument("--temperatures", nargs="+", default=["1", "2", "3", "64"])
    ap.add_argument("--alpha", default="1.0", help="KD weight (seed 001: 1.0, pure distillation)")
    ap.add_argument("--set", action="append", default=[], help="extra -S key=value for every experiment")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "reports" / "bench")
    args = ap.parse_args()
    start = time.perf_counter()
    status = run_queue(args.repo, ["-S", "distill.method=kd", "-S", "teacher_ls=" + ",".join(args.ls),
                                   "-S", "distill.kd.temperature=" + ",".join(args.temperatures),
                                   "-S", f"distill.kd.alpha={args.alpha}",
                                   *[x for kv in args.set for x in ("-S", kv)]])
    rows = sorted(rows_from_exp_show(json.loads(dvc(args.repo, "exp", "show", "--json"))),
                  key=lambda r: (r["teacher_ls"], r["temperature"]))
    print("| teacher LS | T | teacher | baseline student | KD student | KD gain |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['teacher_ls']} | {r['temperature']:g} | {r['teacher']:.2f} | {r['baseline']:.2f} | "
              f"{r['distill']:.2f} | {r['kd_gain']:+.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ls_kd_grid.json").write_text(json.dumps(
        {"ls": args.ls, "temperatures": args.temperatures, "alpha": args.alpha, "set": args.set,
         "queue_status": status, "wall_seconds": round(time.perf_counter() - start, 1), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
