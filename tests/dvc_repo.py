"""A scratch copy of this repository as a git + DVC workspace, for the tests that run real `dvc`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from bench.common import copy_workspace  # noqa: F401 (the tests' copies of a reproduced repository)

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True,
        timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def dvc_env() -> dict[str, str]:
    """This environment, with this venv's ``python`` and ``dvc`` first on PATH and a git identity."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }


def scratch_repository(work: Path, edit: Callable[[Path], None]) -> dict[str, str]:
    """Copy the repository's tracked and unignored files (not dvc.lock) to ``work``, let ``edit``
    change them (e.g. shrink params.yaml), commit them, and return the environment to run `dvc` in."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, work / rel)
    (work / "dvc.lock").unlink(missing_ok=True)
    edit(work)
    env = dvc_env()
    run(["git", "init", "-q"], work, env)
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "fixture"], work, env)
    return env


def built_once(tmp_path_factory, name: str, build: Callable[[Path], dict]) -> tuple[Path, dict]:
    """``build(folder)`` run once for the whole test session, pytest-xdist workers included: the
    first worker to ask builds it under a file lock while the others wait, then all read the JSON
    record it returned. Callers must treat the folder as read-only (copy it to change it)."""
    import fcntl
    import json

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    folder, record = root / name, root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed half-way
            folder.mkdir()
            record.write_text(json.dumps(build(folder)))
    return folder, json.loads(record.read_text())
