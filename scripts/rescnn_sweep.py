"""Seed 003's residual-CNN size sweep as one queued DVC experiment sweep, then its table.

    python scripts/rescnn_sweep.py REPO [--blocks 4 6 8 10] [--set key=value ...]

Queues ``dvc exp run --queue -S student=rescnn -S models.rescnn.kwargs.blocks=4,6,8,10`` in REPO,
runs the queue (``dvc queue start`` then waits), collects ``dvc exp show --json`` and prints one row
per experiment x precision from each experiment's reports/quantization.json metrics.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed in {repo}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc.stdout


def run_queue(repo: Path, set_args: list[str]) -> str:
    """``dvc exp run --queue`` with ``set_args`` (``-S key=a,b`` expands to one experiment per value),
    run the queue one experiment at a time, wait for it; returns ``dvc queue status``."""
    dvc(repo, "exp", "run", "--queue", *set_args)
    dvc(repo, "queue", "start", "--jobs", "1")
    while "Running" in (status := dvc(repo, "queue", "status")) or "Queued" in status:
        time.sleep(10)
    if "Failed" in status:
        print(status, file=sys.stderr)
    return status


def experiments(data: list) -> list[tuple[str, dict, dict]]:
    """(name, params.yaml values, {metrics file: values}) of every row of ``dvc exp show --json``:
    each commit, then its experiments."""
    out = []
    for commit in data:
        for exp in [commit, *[e for r in commit.get("experiments") or [] for e in r.get("revs", [])]]:
            d = exp.get("data") or {}
            params = ((d.get("params") or {}).get("params.yaml") or {}).get("data") or {}
            metrics = {path: (m or {}).get("data") or {} for path, m in (d.get("metrics") or {}).items()}
            out.append((exp.get("name") or d.get("rev"), params, metrics))
    return out


def rows_from_exp_show(data: list) -> list[dict]:
    rows = []
    for name, params, metrics in experiments(data):
        quantization = metrics.get("reports/quantization.json")
        if params.get("student") != "rescnn" or not quantization:
            continue
        blocks = params["models"]["rescnn"]["kwargs"]["blocks"]
        for role in ("baseline", "distill"):
            timing = metrics.get(f"reports/{role}/timing.json") or {}
            for precision, r in quantization.get("results", {}).get(role, {}).items():
                rows.append({"exp": name, "blocks": blocks, "role": role, "precision": precision,
                             "train_seconds": timing.get("train_seconds"), **r})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("repo", type=Path)
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 6, 8, 10])
    ap.add_argument("--set", action="append", default=[], help="extra -S key=value for every experiment")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "reports" / "bench",
                    help="where rescnn_sweep.json (every row, the settings, the queue's status) goes")
    args = ap.parse_args()
    extra = [x for kv in args.set for x in ("-S", kv)]
    start = time.perf_counter()
    status = run_queue(args.repo, ["-S", "student=rescnn", "-S",
                                   "models.rescnn.kwargs.blocks=" + ",".join(map(str, args.blocks)), *extra])
    rows = rows_from_exp_show(json.loads(dvc(args.repo, "exp", "show", "--json")))
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"blocks": args.blocks, "set": args.set, "queue_status": status,
              "wall_seconds": round(time.perf_counter() - start, 1), "rows": rows}
    (args.out / "rescnn_sweep.json").write_text(json.dumps(record, indent=1, default=str))
    print("| blocks | model | params | precision | test top-1 | Δ vs fp32 | latency b1 (ms) | size (KiB) | "
          "training (s) |")
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["blocks"], r["role"], r["precision"])):
        head = f"| {r['blocks']} | {r['role']} | {r.get('params') or 0:,} | {r['precision']} |"
        if r.get("status") != "ok":
            print(f"{head} {r.get('status')}: {r.get('reason', '')} | | | | |")
            continue
        print(f"{head} {r['top1']:.2f} | {r.get('delta_top1', 0):+.2f} | {r['latency_b1_median_ms']:.3f} | "
              f"{r['size_bytes'] / 1024:.1f} | {r['train_seconds'] or 0:.0f} |")


if __name__ == "__main__":
    main()
