"""The residual-CNN precision study's size sweep as one queued DVC experiment sweep, then its table.

    python scripts/rescnn_sweep.py REPO [--blocks 4 6 8 10] [--set key=value ...]

Queues ``dvc exp run --queue -S student=rescnn -S models.rescnn.kwargs.blocks=4,6,8,10`` in REPO,
runs the queue (``dvc queue start`` then waits), collects ``dvc exp show --json`` and prints one row
per experiment x student (baseline, distill) x precision from each experiment's
``reports/quantization.json`` metrics (gathered by the report stage from ``quantize@<role>``).
``evaluate`` and ``quantize`` run once per model, so the sweep changes only the student's stages:
the teacher is trained, evaluated and quantized once and DVC's run cache restores those stages
in every other experiment.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


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


def split_choices(value: str) -> list[str]:
    """``a,b`` → ``[a, b]``, as ``dvc exp run -S key=a,b`` sweeps; a comma inside ``[...]`` or
    ``{...}`` belongs to one value (a list or mapping)."""
    parts, depth, current = [], 0, ""
    for ch in value:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


def experiment_params(repo: Path, set_args: list[str]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(overrides, params.yaml values) of each experiment ``dvc exp run --queue SET_ARGS`` would
    queue in ``repo``: one per combination of the comma-separated choices."""
    pairs = [item.split("=", 1) for flag, item in zip(set_args[::2], set_args[1::2]) if flag == "-S"]
    base = yaml.safe_load((repo / "params.yaml").read_text())
    out = []
    for values in itertools.product(*[split_choices(v) for _, v in pairs]):
        overrides = {key: yaml.safe_load(v) for (key, _), v in zip(pairs, values)}
        params = copy.deepcopy(base)
        for key, value in overrides.items():
            *parents, last = key.split(".")
            node = params
            for name in parents:
                node = node.setdefault(name, {})
            node[last] = value
        out.append((overrides, params))
    return out


def dry_run(repo: Path, set_args: list[str]) -> int:
    """Print the queue command and each experiment it would queue, each checked as the stages
    will check it (:func:`stages.params.resolve`); nothing is queued. Returns the number of
    invalid experiments."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from stages.params import ParamError, resolve

    cells = experiment_params(repo, set_args)
    print(f"dvc exp run --queue {' '.join(set_args)}  # in {repo}: {len(cells)} experiments")
    invalid = 0
    for overrides, params in cells:
        shown = " ".join(f"{k}={v}" for k, v in overrides.items())
        try:
            resolve(params)
            print(f"  ok       {shown}")
        except ParamError as err:
            invalid += 1
            print(f"  INVALID  {shown}\n    " + str(err).replace("\n", "\n    "))
    return invalid


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


def queue_args(blocks: list[int], extra: list[str]) -> list[str]:
    """The ``-S`` arguments of the sweep's ``dvc exp run --queue`` (one experiment per block count)."""
    return ["-S", "student=rescnn", "-S", "models.rescnn.kwargs.blocks=" + ",".join(map(str, blocks)),
            *[x for kv in extra for x in ("-S", kv)]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("repo", type=Path)
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 6, 8, 10])
    ap.add_argument("--set", action="append", default=[], help="extra -S key=value for every experiment")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "reports" / "bench",
                    help="where rescnn_sweep.json (every row, the settings, the queue's status) goes")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the queue command and each experiment, checked against REPO's params.yaml; "
                         "queue nothing")
    args = ap.parse_args()
    set_args = queue_args(args.blocks, args.set)
    if args.dry_run:
        raise SystemExit(1 if dry_run(args.repo, set_args) else 0)
    start = time.perf_counter()
    status = run_queue(args.repo, set_args)
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
