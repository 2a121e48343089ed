"""The grid of the LS–KD compatibility study (Chandrasegaran et al., ICML 2022), label-smoothed
teacher x KD temperature, as one queued DVC experiment sweep.

    python scripts/ls_kd_grid.py REPO [--ls 0 0.1] [--temperatures 1 2 3 64] [--alpha 1.0] [--set key=value ...]

Queues ``dvc exp run --queue -S teacher_ls=0,0.1 -S distill.kd.temperature=1,2,3,64
-S distill.kd.alpha=1.0`` in REPO, runs the queue, and prints one row per experiment from
``dvc exp show --json`` (each experiment's ``reports/summary.json``): teacher top-1, KD student
top-1 and its gain over the baseline student (which does not depend on either knob). DVC's run
cache trains a teacher once per smoothing value and the baseline once; ``evaluate`` and
``quantize`` run once per model (``evaluate@teacher``, ``quantize@distill``, ...), so a cell that
changes only the temperature re-runs only the KD student's stages (distill, evaluate@distill,
quantize@distill) and the report: no ``eval`` setting is needed to spare the teacher's and the
baseline's measurements. Writes ``reports/bench/ls_kd_grid.json`` (``--out``). The LS–KD study's
question: does a teacher trained with label smoothing distil worse, and does that depend on T?
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rescnn_sweep import dry_run, dvc, experiments, run_queue


SUMMARY = "reports/summary.json"  # {teacher: {best, last}, baseline: ..., distill: ..., kd_gain_<score>}


def rows_from_exp_show(data: list) -> list[dict]:
    rows = []
    for name, params, metrics in experiments(data):
        summary = metrics.get(SUMMARY)
        if not summary or params.get("teacher_ls") is None:  # the workspace's commit is not a grid cell
            continue
        score = "top1" if "kd_gain_top1" in summary else "mAP"
        rows.append({"exp": name, "teacher_ls": params["teacher_ls"],
                     "temperature": params["distill"]["kd"]["temperature"],
                     "alpha": params["distill"]["kd"]["alpha"], "score": score,
                     "teacher": summary["teacher"]["best"], "baseline": summary["baseline"]["best"],
                     "distill": summary["distill"]["best"], "kd_gain": summary[f"kd_gain_{score}"]})
    return rows


def queue_args(ls: list[str], temperatures: list[str], alpha: str, extra: list[str]) -> list[str]:
    """The ``-S`` arguments of the grid's ``dvc exp run --queue`` (each comma list is one axis)."""
    return ["-S", "distill.method=kd", "-S", "teacher_ls=" + ",".join(ls),
            "-S", "distill.kd.temperature=" + ",".join(temperatures), "-S", f"distill.kd.alpha={alpha}",
            *[x for kv in extra for x in ("-S", kv)]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("repo", type=Path)
    ap.add_argument("--ls", nargs="+", default=["0", "0.1"], help="teacher label smoothing values")
    ap.add_argument("--temperatures", nargs="+", default=["1", "2", "3", "64"])
    ap.add_argument("--alpha", default="1.0", help="KD weight (the LS–KD study: 1.0, pure distillation)")
    ap.add_argument("--set", action="append", default=[], help="extra -S key=value for every experiment")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "reports" / "bench")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the queue command and each experiment, checked against REPO's params.yaml; "
                         "queue nothing")
    args = ap.parse_args()
    set_args = queue_args(args.ls, args.temperatures, args.alpha, args.set)
    if args.dry_run:
        raise SystemExit(1 if dry_run(args.repo, set_args) else 0)
    start = time.perf_counter()
    status = run_queue(args.repo, set_args)
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
