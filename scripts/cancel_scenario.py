"""What a cancelled `dvc repro` leaves behind, and what the next run makes of it.

    python scripts/cancel_scenario.py REPO [--signal KILL|TERM] [--epochs N]

REPO is a DVC repository of this project (a scratch copy: it is modified). The script shrinks
the data, sets the teacher's epochs, runs `dvc repro prepare`, starts `dvc repro teacher`, waits
until a first checkpoint is written, sends the signal to the `dvc` process only (as `timeout`
or `kill` do), and then reports, as JSON:

* ``stage_exit_s``: how long the training process took to end after ``dvc`` did (it notices within
  0.5 s and unwinds, discarding its staged outputs), or None if it still ran 60 s later (an orphan);
* ``final_after_kill``: the files at ``models/teacher`` then (what a later DVC command would hash);
* ``run_cache_after_kill``: the number of entries in DVC's run cache (``.dvc/cache/runs``);
* ``rerun``: the next `dvc repro teacher`: whether it trained or restored, the run cache, and
  whether the checkpoints in ``models/teacher`` are those of one complete run (the manifest
  agrees, the last checkpoint is of the last epoch).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdlib import yamlfile  # noqa: E402
from kdlib.process import command_line, process_alive  # noqa: E402


def shrink(repo: Path, teacher: str, epochs: int) -> None:
    path = repo / "params.yaml"
    params = yamlfile.load(path)
    params["datasets"]["mnist"]["options"].update(train_per_class=4, val_per_class=2, test_per_class=3)
    params["teacher"] = teacher
    params["models"][teacher].update(epochs=epochs, warmup_epochs=0, patience=0)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            children = []
        for child in map(int, children):
            found.append(child)
            frontier.append(child)
    return found


def files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def run_cache_entries(repo: Path) -> int:
    runs = repo / ".dvc" / "cache" / "runs"
    return sum(1 for p in runs.rglob("*") if p.is_file()) if runs.is_dir() else 0


def checkpoint_epochs(folder: Path) -> dict[str, int]:
    import torch
    return {p.name: int(torch.load(p, map_location="cpu", weights_only=True)["meta"]["epoch"])
            for p in sorted(folder.glob("*.pt"))}


def wait_for_checkpoint(repo: Path, proc: subprocess.Popen, since: float, timeout_s: float) -> None:
    """Until a checkpoint newer than ``since`` is written: in place (no staging) or staged."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for path in [*repo.glob("models/teacher/*.pt"), *repo.glob(".kdlib-staging/*/models/teacher/*.pt")]:
            try:
                if path.stat().st_mtime > since:
                    return
            except FileNotFoundError:
                pass
        if proc.poll() is not None:
            raise RuntimeError(f"dvc repro teacher ended (rc {proc.returncode}) before a checkpoint was written")
        time.sleep(0.01)
    raise TimeoutError("no checkpoint within the timeout")


def scenario(repo: Path, sig: signal.Signals, epochs: int, teacher: str = "cnn_small",
             env: dict[str, str] | None = None, rerun: list[str] | None = None) -> dict:
    """Run the scenario of the module docstring; ``rerun`` is the command that follows the kill
    (default `dvc repro teacher`)."""
    env = env or dict(os.environ)
    shrink(repo, teacher, epochs)
    subprocess.run(["dvc", "repro", "prepare"], cwd=repo, env=env, check=True, capture_output=True)
    since = time.time()
    dvc = subprocess.Popen(["dvc", "repro", "teacher"], cwd=repo, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    wait_for_checkpoint(repo, dvc, since, 300)
    stages = [p for p in descendants(dvc.pid) if "stages.train" in " ".join(command_line(p))]
    os.kill(dvc.pid, sig)
    dvc.wait()
    ended, exit_s = time.monotonic(), None
    while time.monotonic() - ended < 60:
        if not any(process_alive(p) for p in stages):
            exit_s = round(time.monotonic() - ended, 2)
            break
        time.sleep(0.05)
    report = {"signal": sig.name, "stage_pids": stages, "stage_exit_s": exit_s,
              "final_after_kill": files(repo / "models" / "teacher"),
              "staging_after_kill": files(repo / ".kdlib-staging"),
              "run_cache_after_kill": run_cache_entries(repo)}
    deadline = time.monotonic() + 120
    while any(process_alive(p) for p in stages) and time.monotonic() < deadline:  # an orphan: let it finish
        time.sleep(0.2)
    report["final_after_orphan"] = files(repo / "models" / "teacher")
    rerun_cmd = rerun or ["dvc", "repro", "teacher"]
    finished = subprocess.run(rerun_cmd, cwd=repo, env=env, capture_output=True, text=True)
    out = finished.stdout + finished.stderr
    folder = repo / "models" / "teacher"
    manifest_ok = None
    if (folder / "manifest.json").is_file():
        from kdlib.outputs import OutputError, check_manifest
        try:
            check_manifest(folder)
            manifest_ok = True
        except OutputError:
            manifest_ok = False
    report["rerun"] = {"command": " ".join(rerun_cmd), "rc": finished.returncode, "trained": "Running stage 'teacher'" in out,
                       "restored_from_run_cache": "skipping run, checking out outputs" in out,
                       "run_cache": run_cache_entries(repo), "files": files(folder),
                       "checkpoint_epochs": checkpoint_epochs(folder) if folder.is_dir() else {},
                       "manifest_ok": manifest_ok, "staging_left": files(repo / ".kdlib-staging")}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo", type=Path)
    parser.add_argument("--signal", default="KILL", choices=("KILL", "TERM"))
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--teacher", default="cnn_small")
    args = parser.parse_args()
    report = scenario(args.repo.resolve(), signal.Signals[f"SIG{args.signal}"], args.epochs, args.teacher)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
