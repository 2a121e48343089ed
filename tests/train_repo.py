"""A tiny prepared copy of this repository whose training stages tests run directly (no DVC):
80 MNIST training images, 40 for validation, small presets."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from dvc_repo import scratch_repository

TINY_DEIT = {"img_size": 28, "patch_size": 7, "depth": 1, "embed_dim": 48, "num_heads": 2}


def tiny(params: dict[str, Any]) -> dict[str, Any]:
    params["datasets"]["mnist"]["options"].update(train_per_class=8, val_per_class=4, test_per_class=2)
    for preset in params["models"].values():
        preset.update(epochs=2, warmup_epochs=0, batch_size=16)
    params["models"]["deit"].update(kwargs=dict(TINY_DEIT), drop_path=0.0)  # no batch statistics, no dropout
    return params


def prepared_repository(work: Path) -> Path:
    """A scratch repository with ``tiny`` parameters, checked and prepared."""
    def edit(repo: Path) -> None:
        (repo / "params.yaml").write_text(yaml.safe_dump(tiny(yaml.safe_load((repo / "params.yaml").read_text())),
                                                         sort_keys=False))
    env = scratch_repository(work, edit)
    for module in ("stages.check", "stages.prepare"):
        subprocess.run([sys.executable, "-m", module], cwd=work, env=env, check=True, capture_output=True)
    return work


def copy_repository(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True, ignore=shutil.ignore_patterns(".kdlib-resume", ".kdlib-staging"))
    return target


def set_params(repo: Path, change: Callable[[dict[str, Any]], None]) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    change(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stage_env(repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")}
    return {**env, "KDLIB_RESUME_DIR": str(repo / ".kdlib-resume"), "PYTHONPATH": str(repo)}


def run_stage(repo: Path, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=repo, env=stage_env(repo), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def start_stage(repo: Path, *args: str) -> subprocess.Popen:
    """The stage in its own process group (so a test can kill it and every process it started)."""
    return subprocess.Popen([sys.executable, "-m", *args], cwd=repo, env=stage_env(repo), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tsv(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def worker_pids(repo: Path) -> list[int]:
    """The torchrun workers of a training stage running in ``repo`` (``python -u -m stages.train ... --worker``;
    torchrun's own command line ends the same, but its module is torch.distributed.run)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            module = argv[argv.index(b"-m") + 1] if b"-m" in argv else b""
            if module == b"stages.train" and b"--worker" in argv and os.readlink(proc / "cwd") == str(repo):
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return sorted(found)
