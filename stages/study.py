"""Studies: a named grid of parameter overrides × seeds (``studies/<name>.yaml``) run as DVC experiments.

    python -m stages.study list
    python -m stages.study run NAME [-S key=value]... [--seeds 0,1,2] [--only axis=v1,v2] [-j N] [--no-wait] [--dry-run]
    python -m stages.study report NAME [-S key=value]... [--seeds 0,1,2] [--only axis=v1,v2]

``run`` checks every experiment's parameters first (as the stages will), then queues the missing
ones (``dvc exp run --queue -n <name> report -S ...``; finished, queued and recorded ones are skipped, failed
ones are queued again), starts ``dvc queue start -j N`` and waits. ``report`` reads the finished
experiments of the same overrides through ``dvc.api`` (their summary.json, costs.json and
quantization.json), and those DVC no longer has from ``reports/studies/NAME/records.json`` (what an
earlier report stored: a study can be run over several machines or sessions, the report folder
committed between them), and writes ``reports/studies/NAME/`` (kdlib.study.report).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from kdlib.study.page import study_page
from kdlib.study.records import RecordsError, load_records
from kdlib.study.report import write_report
from kdlib.study.spec import Experiment, StudyError, apply_overrides, load_study, override_arg, parse_overrides, \
    study_names
from kdlib.study.table import Record
from stages import exp_queue
from stages.params import PARAMS_FILE, ParamError, read_params, resolve

STUDIES, REPORTS = Path("studies"), Path("reports") / "studies"
SUMMARY, COSTS, QUANTIZATION = "reports/summary.json", "reports/costs.json", "reports/quantization.json"
PENDING = {"Queued", "Running"}
# What an experiment reproduces: the report stage and everything it needs. Not `export` (the ONNX files
# and their int8 calibration, a minute per experiment on the default data), which no table reads.
TARGET = "report"
MAX_REQUEUES, MAX_WORKER_STARTS = 2, 10


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def worker_threads(jobs: int, environ: Mapping[str, str] = os.environ,
                   cores: int | None = None) -> dict[str, str]:
    """Thread limits for queue workers that run ``jobs`` experiments at once: each experiment's torch
    gets ``cores // jobs`` intra-op threads (at least one). By default every process takes one thread per
    core, and OpenMP threads that outnumber the cores spin while they wait: two experiments on two
    cores, with other work beside them, took 587.8 s and 599.1 s for a baseline that trains in 18.24 s
    alone. A limit the user set in the environment is kept; ``jobs`` = 1 sets none."""
    if jobs <= 1:
        return {}
    per = str(max(1, (cores or os.cpu_count() or 1) // jobs))
    return {var: per for var in THREAD_VARS if var not in environ}


def dvc(*args: str, detach: bool = False, extra_env: dict[str, str] | None = None) -> str:
    """Run ``dvc ARGS``; ``detach``: its output to a log, not a pipe (``dvc queue start`` leaves a
    worker behind that inherits the pipe, and reading it would wait for the whole queue)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", **(extra_env or {}),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if detach:
        log = Path(".dvc") / "tmp" / "study-queue.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.run(["dvc", *args], env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise SystemExit(f"error: dvc {' '.join(args)} failed (its output: {log})")
        return ""
    proc = subprocess.run(["dvc", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc.stdout


def planned(args: argparse.Namespace) -> tuple[Any, list[Experiment], dict[str, Any]]:
    """The study, its experiments, the -S overrides; every experiment's parameters checked."""
    study = load_study(STUDIES / f"{args.name}.yaml")
    overrides = parse_overrides(args.set)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    experiments = study.experiments(overrides, seeds)
    for item in args.only:
        key, _, values = item.partition("=")
        wanted = list(parse_overrides([f"{key}=[{values}]"]).values())[0]
        if key not in study.axes or not all(any(c.values.get(key) == w for c in study.cells()) for w in wanted):
            raise StudyError(f"{study.path}: --only {item}: expected an axis of the grid ({', '.join(study.axes)}) "
                             "and some of its values")
        experiments = [e for e in experiments if any(e.cell.values.get(key) == w for w in wanted)]
    base = read_params(PARAMS_FILE)
    for exp in experiments:
        try:
            resolve(apply_overrides(base, exp.overrides, f"{study.path} ({exp.cell.label}, seed {exp.seed})"))
        except ParamError as err:
            raise StudyError(f"{study.path}: experiment {exp.name} ({exp.cell.label}, seed {exp.seed}): {err}")
    return study, experiments, overrides


def recorded(study: Any, experiments: list[Experiment]) -> dict[str, Record]:
    """The experiments an earlier report stored in ``reports/studies/NAME/records.json``."""
    path = REPORTS / study.name / "records.json"
    if not path.is_file():
        return {}
    try:
        return load_records(json.loads(path.read_text()), experiments, str(path))
    except ValueError as err:  # RecordsError, or not JSON
        raise StudyError(f"{err}" if isinstance(err, RecordsError) else f"{path}: not JSON ({err})")


def set_args(exp: Experiment) -> list[str]:
    return [x for k, v in exp.overrides.items() for x in ("-S", override_arg(k, v))]


def queue(exp: Experiment, known: dict[str, tuple[str | None, str]]) -> None:
    """Queue ``exp``; a failed or orphaned entry of the same name is cleared first (it blocks the name)."""
    if known.get(exp.name, (None,))[0] == "Running":
        dvc("queue", "kill", "--force", exp.name)  # its process is gone; this marks it failed
    if exp.name in known:
        dvc("queue", "remove", exp.name)
    dvc("exp", "run", "--queue", "-n", exp.name, TARGET, *set_args(exp))


def run(args: argparse.Namespace) -> int:
    study, experiments, _ = planned(args)
    known = exp_queue.states()
    lost = set(exp_queue.orphaned(known))
    if lost:  # seen twice: a worker may have just collected them and left
        time.sleep(3)
        known = exp_queue.states()
        lost &= set(exp_queue.orphaned(known))
    stored = recorded(study, experiments)
    todo = [e for e in experiments if e.name not in stored and (
        e.name not in known or known[e.name][0] == "Failed" or e.name in lost)]
    print(f"{study.name}: {len(experiments)} experiments, {len(experiments) - len(todo)} finished or queued, "
          f"{len(todo)} to queue" + (f" ({len(lost & {e.name for e in todo})} orphaned: Running, their process and worker gone)"
                                     if lost & {e.name for e in todo} else "") +
          (f"; {len([e for e in experiments if e.name in stored])} of them recorded in "
           f"{REPORTS / study.name / 'records.json'}" if stored else ""))
    for exp in todo:
        if args.dry_run:
            # quoted for a shell: a list value ("[fp32, fp16]") pasted unquoted would split at its spaces
            print("  " + shlex.join(["dvc", "exp", "run", "--queue", "-n", exp.name, TARGET, *set_args(exp)]))
        else:
            queue(exp, known)
    if args.dry_run:
        return 0
    by_name = {e.name: e for e in experiments if e.name not in stored}
    if not by_name:
        return 0
    requeued: dict[str, int] = {}
    lost_for_good: set[str] = set()  # orphaned more than MAX_REQUEUES times: counted as failed
    starts, idle = 0, 1  # idle: polls in a row that found tasks waiting and fewer workers than --jobs
    suspects: set[str] = set()  # orphaned at the last poll
    while True:
        waiting = any(known.get(n, ("Queued",))[0] == "Queued" for n in by_name)
        idle = idle + 1 if waiting and exp_queue.workers_alive() < args.jobs else 0
        # the first start at once; later ones after two polls in a row (a worker writes its
        # process record a moment after `dvc queue start` returns)
        if idle >= 2:
            if starts == MAX_WORKER_STARTS:
                raise SystemExit(f"error: queue workers stopped {starts} times with experiments waiting "
                                 f"(their output: .dvc/tmp/study-queue.log, .dvc/tmp/exps/celery/dvc-exp-worker-*.out)")
            dvc("queue", "start", "--jobs", str(args.jobs), detach=True, extra_env=worker_threads(args.jobs))
            starts, idle = starts + 1, 0
        if args.no_wait:
            return 0
        time.sleep(args.poll)
        known = exp_queue.states()
        orphans = set(exp_queue.orphaned(known))
        lost, suspects = suspects & orphans, orphans
        for name in sorted(lost & set(by_name)):  # orphaned two polls in a row
            if requeued.get(name, 0) == MAX_REQUEUES:
                lost_for_good.add(name)
                continue
            print(f"  {name}: Running, but its process and the queue worker are gone; queued again", flush=True)
            queue(by_name[name], known)
            requeued[name] = requeued.get(name, 0) + 1
            known[name] = ("Queued", known[name][1])
        now = {n: "Failed" if n in lost_for_good else s for n, (s, _) in known.items() if n in by_name}
        pending = sum(1 for s in now.values() if s in PENDING)
        print(f"  {len(by_name) - pending}/{len(by_name)} done", flush=True)
        if not pending:
            failed = sorted(n for n, s in now.items() if s == "Failed")
            for name in failed:
                print(f"  failed: {name} (dvc queue logs {name})", file=sys.stderr)
            for name in sorted(set(by_name) - set(now)):  # e.g. removed from the queue by hand
                print(f"  not run: {name} (dvc queue status)", file=sys.stderr)
            return 1 if failed or set(by_name) - set(now) else 0


def report(args: argparse.Namespace) -> int:
    import dvc.api

    study, experiments, overrides = planned(args)
    known = exp_queue.states()
    done = [e for e in experiments if e.name in known and known[e.name][0] not in PENDING | {"Failed"}]
    def summary(rev: str) -> dict[str, Any]:
        try:
            return dvc.api.metrics_show(SUMMARY, COSTS, repo=".", rev=rev)
        except FileNotFoundError:  # made before costs.json was apart: its summary.json holds the costs
            return dvc.api.metrics_show(SUMMARY, repo=".", rev=rev)
    def source(rev: str) -> dict[str, str]:  # the experiment's commit and its parent, the commit it ran on
        shas = subprocess.run(["git", "rev-parse", rev, f"{rev}^"], capture_output=True, text=True).stdout.split()
        return {"experiment_rev": shas[0], "commit": shas[1]} if len(shas) == 2 else {"experiment_rev": rev}
    records = [Record(e, summary(known[e.name][1]), dvc.api.metrics_show(QUANTIZATION, repo=".", rev=known[e.name][1]),
                      source(known[e.name][1])) for e in done]
    stored = recorded(study, experiments)
    records += [stored[e.name] for e in experiments if e not in done and e.name in stored]
    found = {r.experiment.name for r in records}
    missing = [e for e in experiments if e.name not in found]
    out = REPORTS / study.name
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{study.name}-", dir=out.parent))
    try:
        write_report(study, records, missing, overrides, staging, study_page)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print((out / "table.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the studies in studies/")
    for name in ("run", "report"):
        p = sub.add_parser(name)
        p.add_argument("name")
        p.add_argument("-S", "--set", action="append", default=[], help="key=value for every experiment")
        p.add_argument("--seeds", help="comma-separated seeds, replacing the study's")
        p.add_argument("--only", action="append", default=[], metavar="AXIS=V1,V2",
                       help="only the cells whose AXIS is one of these values (repeatable)")
        if name == "run":
            p.add_argument("-j", "--jobs", type=int, default=1, help="experiments at once (dvc queue start -j)")
            p.add_argument("--no-wait", action="store_true", help="queue and start, then return")
            p.add_argument("--dry-run", action="store_true", help="print the queue commands; queue nothing")
            p.add_argument("--poll", type=float, default=10.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command == "list":
        for name in study_names(STUDIES):
            print(f"{name:20s} {load_study(STUDIES / f'{name}.yaml').title}")
        return 0
    try:
        return run(args) if args.command == "run" else report(args)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except exp_queue.QueueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
