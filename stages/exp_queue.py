"""What a study needs to know about DVC's experiment queue, read so that a wedged reader or a dead
worker cannot stall a study for ever.

- ``states`` lists the experiments of HEAD through ``dvc.api.exp_show`` in a child process with a time
  limit. exp_show reads git objects with pygit2's ``BlobIO``, whose reader waits on an event that its
  writer thread sets; when that thread dies ("Exception in thread ... (_write_to_queue)") the reader
  waits for ever. A study's poll hung like that for 15 minutes in CI.
- ``orphaned`` names the experiments the queue still calls Running whose process and worker are both
  gone (the machine restarted, the worker was killed): DVC never moves them on, so a study would wait
  on them for ever.
- ``workers_alive`` counts the queue worker processes that run, to start the missing ones when tasks wait.

The process records are dvc-task's ``ProcessManager`` files that DVC keeps under ``.dvc/tmp/exps``
(``run/<rev>/<rev>.json`` for an experiment, ``celery/dvc-exp-worker-N.json`` for a worker).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EXPS = Path(".dvc") / "tmp" / "exps"
STATES_TIMEOUT_S = 120.0

_READ_STATES = (
    "import json, dvc.api\n"
    "rows = [[r['Experiment'], r.get('State'), r['rev']] for r in dvc.api.exp_show('.') if r.get('Experiment')]\n"
    "print(json.dumps(rows))\n"
)


class QueueError(RuntimeError):
    """DVC's queue could not be read."""


def states(attempts: int = 10, timeout_s: float = STATES_TIMEOUT_S, code: str = _READ_STATES,
           pause_s: float = 3.0) -> dict[str, tuple[str | None, str]]:
    """{experiment name: (state, short rev)} of the experiments of HEAD. Each attempt runs ``code`` in
    a fresh interpreter, killed after ``timeout_s``; a failed attempt (a hang, or exp_show failing while
    a queued experiment's temporary copy is made or removed: NotDvcRepoError on .dvc/tmp/exps/tmp…)
    is retried ``pause_s`` later, and said on stderr (all attempts can take ``attempts × timeout_s``).
    Raises QueueError naming the last failure when every attempt fails."""
    last = ""
    for attempt in range(attempts):
        if attempt:
            print(f"  listing the experiments, attempt {attempt} of {attempts}: {last}{_hint(last)}; retrying",
                  file=sys.stderr, flush=True)
            time.sleep(pause_s)
        try:
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            last = f"dvc.api.exp_show did not answer within {timeout_s:g} s"
            continue
        lines = proc.stdout.strip().splitlines()
        if proc.returncode == 0 and lines:
            try:
                return _one_per_name(json.loads(lines[-1]))
            except (ValueError, TypeError) as err:
                last = f"unreadable answer from dvc.api.exp_show ({err}): {lines[-1][:200]}"
                continue
        error = proc.stderr.strip().splitlines()
        failure = f"dvc.api.exp_show exited {proc.returncode}: {error[-1] if error else 'no error output'}"
        if _ORPHAN_RECORD.search(failure) and failure == last:  # the same missing record twice: not transient
            raise QueueError(f"could not list the experiments: {failure}{_hint(failure)}")
        last = failure
    raise QueueError(f"could not list the experiments after {attempts} attempts; the last: {last}{_hint(last)}")


# A name can be listed twice: `dvc queue remove NAME` can leave the Failed task of an orphaned run that
# `dvc queue kill` ended, next to the task queued again under its name. The newer task is what counts.
_RANK = {"Failed": 0, "Queued": 1, "Running": 2}


def _one_per_name(rows: list[list[Any]]) -> dict[str, tuple[str | None, str]]:
    """{name: (state, rev)} from exp_show's rows, a name listed more than once taken at its most
    advanced state (finished > Running > Queued > Failed)."""
    out: dict[str, tuple[str | None, str]] = {}
    for name, state, rev in rows:
        if name not in out or _RANK.get(state, 3) > _RANK.get(out[name][0], 3):
            out[name] = (state, rev)
    return out


# exp_show reads the process record (.dvc/tmp/exps/run/<rev>/<rev>.run, .json) of every task the queue
# calls Running; after `dvc queue stop --kill` a task a worker had just taken stayed Running without one
_ORPHAN_RECORD = re.compile(r"FileNotFoundError.*exps[/\\]run[/\\]([0-9a-f]{7,40})")


def _hint(failure: str) -> str:
    # seen after `dvc queue stop --kill` and after a machine restart: a task the queue still calls Running
    # with no process behind it makes every exp_show fail on its missing record, or wait
    orphan = _ORPHAN_RECORD.search(failure)
    if orphan:
        return (f" (task {orphan.group(1)[:7]} is Running in DVC's queue with no process record: "
                "`dvc queue status` names it, `dvc queue kill NAME` marks it failed)")
    return (" (an experiment `dvc queue status` calls Running that no worker runs does this: "
            "`dvc queue kill NAME` clears it)") if "did not answer" in failure else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process holds the pid
        return True
    return True


def _running(info: Path) -> bool:
    """Whether the dvc-task process record ``info`` describes a process that is still running."""
    try:
        record = json.loads(info.read_text())
    except (OSError, ValueError):
        return True  # being written: not known to be dead
    return record.get("returncode") is None and isinstance(record.get("pid"), int) and _alive(record["pid"])


def orphaned(known: dict[str, tuple[str | None, str]], root: Path = EXPS) -> list[str]:
    """The experiments in ``known`` that are Running while no queue worker is: their run record
    (``run/<rev…>/<rev…>.json``) says the process ended or its pid is gone, and no worker is left to
    collect the result or mark it failed. (A run that ended while its worker lives is being collected.)
    One with no record yet is starting, not orphaned."""
    runs = root / "run"
    lost = []
    for name, (state, rev) in known.items():
        if state != "Running" or not rev:
            continue
        records = [d / f"{d.name}.json" for d in runs.glob(f"{rev}*") if (d / f"{d.name}.json").is_file()]
        if records and not any(_running(r) for r in records):
            lost.append(name)
    return sorted(lost) if lost and not worker_alive(root) else []


def workers_alive(root: Path = EXPS) -> int:
    """How many of DVC's queue workers (``celery/dvc-exp-worker-N.json``) are running. One can die while
    others live: two workers on kombu's filesystem broker can both take the same message file, and the
    one that reads it after the other removed it ends ("Unrecoverable error: JSONDecodeError")."""
    return sum(_running(info) for info in (root / "celery").glob("dvc-exp-worker-*.json"))


def worker_alive(root: Path = EXPS) -> bool:
    """Whether any of DVC's queue workers is running."""
    return workers_alive(root) > 0
