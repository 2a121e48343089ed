"""Shared by the benchmarks: parameters, tiny-run shrinking, a repository copy, JSON + table output."""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kdlib.machine import describe as describe_machine  # noqa: E402
from stages.params import read_params, resolve  # noqa: E402

BENCH_DIR = REPO / "reports" / "bench"


def default_params() -> dict[str, Any]:
    """The raw ``params.yaml`` mapping, for a benchmark to edit; ``resolve(params)`` turns an
    edited copy into the :class:`~stages.params.Run` a stage function takes."""
    return read_params(REPO / "params.yaml")


def shrink(params: dict[str, Any], per_class: int = 10, epochs: int = 2) -> dict[str, Any]:
    """A copy of ``params`` for a quick run: few images (the MNIST subset the default data set
    draws), few epochs, two precisions that compile nothing (fp32 and fp8); validated.
    tests/pipeline_run.py builds its reproduced pipeline with the same function, so a quick
    ``bench/pipeline.py`` run is a second from-scratch run of those very parameters."""
    small = copy.deepcopy(params)
    small["datasets"]["mnist"].setdefault("options", {}).update(
        train_per_class=per_class, val_per_class=max(per_class // 2, 1), test_per_class=per_class)
    for preset in small["models"].values():
        preset.update(epochs=epochs, warmup_epochs=0)
    small["align"]["epochs"] = min(small["align"]["epochs"], epochs)  # feature methods' alignment
    # uncompiled precisions: a quick run times the pipeline, bench/quantization.py the precisions
    small["eval"].update(precisions=["fp32", "fp8"], warmup_runs=1, timed_runs=3, throughput_runs=1,
                         calibration_images=8)
    resolve(small)  # raises ParamError listing every problem
    return small


def machine() -> dict[str, Any]:
    """What the figures were measured on (the GPU too where one is visible)."""
    return describe_machine("cuda" if torch.cuda.is_available() else None)


def copy_repo(dst: Path) -> Path:
    """Copy the tracked and untracked-but-not-ignored files of this repository to ``dst``,
    and make it a git repository with one commit (DVCLive and `dvc exp` need one)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    (dst / "dvc.lock").unlink(missing_ok=True)
    env = git_env()
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=dst, env=env, check=True, capture_output=True)
    return dst


def copy_workspace(src: Path, dst: Path) -> Path:
    """A copy of a repository ``src`` (git history, DVC cache and run cache, outputs) at ``dst``, to
    run on from where ``src`` stands. DVC's state database (``.dvc/tmp``) is left behind: it is
    keyed by inode, so the copy's outputs are hashed afresh."""
    shutil.copytree(src, dst, symlinks=True,
                    ignore=lambda folder, names: ["tmp"] if folder == str(src / ".dvc") else [])
    return dst


def dvc_stages(repo: Path) -> list[str]:
    """Every stage of ``repo``'s ``dvc.yaml`` as DVC names it, in the file's order (one that
    runs them in turn respects the graph): a ``foreach`` stage is one stage per item,
    ``NAME@ITEM`` (``evaluate@teacher``, ``evaluate@baseline``, ...)."""
    proc = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=repo, env=git_env(), capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"dvc stage list failed in {repo}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc.stdout.split()


def stage_group(stage: str) -> str:
    """The ``dvc.yaml`` entry a stage comes from: ``evaluate`` for ``evaluate@teacher``."""
    return stage.split("@", 1)[0]


def git_env() -> dict[str, str]:
    return {**os.environ, "DVC_NO_ANALYTICS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
            "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid"}


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text)
    return text


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny data, few epochs: a smoke run")
    parser.add_argument("--out", type=Path, default=BENCH_DIR, help="directory for NAME.json")
    return parser


def write_result(name: str, result: dict[str, Any], out_dir: Path = BENCH_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2) + "\n")
    print(f"wrote {path}")
    return path
