"""stages/exp_queue.py: the experiment listing survives a reader that hangs or fails (each attempt is a
child process with a time limit), and the process records DVC keeps tell orphaned runs and dead
workers from live ones."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.exp_queue import QueueError, orphaned, states, worker_alive, workers_alive


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def record(path: Path, pid: int, returncode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "stdin": None, "stdout": None, "stderr": None, "returncode": returncode}))


def test_a_reader_that_hangs_is_killed_and_the_error_says_so(capsys) -> None:
    with pytest.raises(QueueError, match=r"after 2 attempts.*did not answer within 0\.5 s.*dvc queue kill NAME"):
        states(attempts=2, timeout_s=0.5, code="import time; time.sleep(60)", pause_s=0)
    # the user waiting on it hears of each failed attempt, not only of the last
    assert "attempt 1 of 2: dvc.api.exp_show did not answer within 0.5 s (an experiment" in capsys.readouterr().err


def test_a_failed_attempt_is_retried(tmp_path: Path) -> None:
    # fails the first time (as exp_show does while a queued experiment's copy appears), then answers
    marker = tmp_path / "tried"
    code = (f"import pathlib, sys\np = pathlib.Path({str(marker)!r})\n"
            "if not p.exists():\n    p.touch(); sys.exit('NotDvcRepoError')\n"
            "print('a warning first')\nprint('[[\"kd-1\", \"Success\", \"abc1234\"], [\"kd-2\", \"Queued\", \"def5678\"]]')\n")
    assert states(attempts=2, code=code, pause_s=0) == {"kd-1": ("Success", "abc1234"), "kd-2": ("Queued", "def5678")}


def test_a_running_task_without_its_process_record_stops_the_listing_with_the_fix(tmp_path: Path) -> None:
    # what exp_show raised after `dvc queue stop --kill` left a task Running: the same error each time
    calls = tmp_path / "calls"
    code = (f"import pathlib, sys\np = pathlib.Path({str(calls)!r}); p.write_text(p.read_text() + 'x' if p.exists() else 'x')\n"
            "sys.exit(\"FileNotFoundError: [Errno 2] No such file or directory: "
            "'/w/.dvc/tmp/exps/run/e3121bd4f00d/e3121bd4f00d.run'\")\n")
    with pytest.raises(QueueError, match=r"task e3121bd is Running in DVC's queue with no process record.*"
                                         r"dvc queue kill NAME"):
        states(attempts=10, code=code, pause_s=0)
    assert calls.read_text() == "xx"  # given up after two identical failures, not ten


def test_a_name_listed_twice_counts_at_its_newest_task() -> None:
    # seen in a study: the Failed task of a killed orphan stayed beside the task queued again
    rows = [["a", "Queued", "r2"], ["a", "Failed", "r1"], ["b", "Failed", "r3"], ["b", "Running", "r4"],
            ["c", None, "r5"], ["c", "Failed", "r6"], ["d", "Failed", "r7"]]
    code = f"import json; print(json.dumps({rows!r}))"
    assert states(attempts=1, code=code) == {"a": ("Queued", "r2"), "b": ("Running", "r4"), "c": (None, "r5"),
                                            "d": ("Failed", "r7")}


def test_the_real_reader_outside_a_dvc_repository_ends_with_dvcs_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(QueueError, match=r"exp_show exited 1: dvc\.scm\.CloneError: SCM error$"):
        states(attempts=1)


def test_orphaned_runs_are_those_whose_process_and_worker_are_gone(tmp_path: Path) -> None:
    runs = tmp_path / "run"
    record(runs / "aaaa111ffff" / "aaaa111ffff.json", dead_pid())           # its pid is gone
    record(runs / "bbbb222ffff" / "bbbb222ffff.json", os.getpid(), -9)      # ended (killed)
    record(runs / "cccc333ffff" / "cccc333ffff.json", os.getpid())          # running
    known = {"gone": ("Running", "aaaa111"), "ended": ("Running", "bbbb222"), "alive": ("Running", "cccc333"),
             "starting": ("Running", "dddd444"),  # no record yet
             "done": ("Success", "aaaa111"), "queued": ("Queued", "bbbb222")}
    assert orphaned(known, tmp_path) == ["ended", "gone"]
    # while a worker lives it collects a run that ended (exp_show says Running until it has)
    record(tmp_path / "celery" / "dvc-exp-worker-1.json", os.getpid())
    assert orphaned(known, tmp_path) == []


def test_worker_alive_reads_the_workers_process_records(tmp_path: Path) -> None:
    assert not worker_alive(tmp_path)
    record(tmp_path / "celery" / "dvc-exp-worker-1.json", dead_pid())  # left by a worker that was killed
    assert not worker_alive(tmp_path)
    record(tmp_path / "celery" / "dvc-exp-worker-2.json", os.getpid())
    assert worker_alive(tmp_path) and workers_alive(tmp_path) == 1  # `run -j 2` starts worker 1 again
    record(tmp_path / "celery" / "dvc-exp-worker-1.json", os.getpid())
    assert workers_alive(tmp_path) == 2
