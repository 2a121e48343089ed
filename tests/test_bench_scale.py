"""The quick runs of bench/scale.py (processes and resume) and bench/gpu.py (here on the CPU)."""
from __future__ import annotations

from pathlib import Path

import pytest

from test_bench import run_quick_benchmark


@pytest.mark.slow
def test_scale_benchmark_finds_one_and_two_processes_agree_and_resume_identical(tmp_path: Path) -> None:
    result = run_quick_benchmark("scale", tmp_path)
    deit = next(c for c in result["one_against_two"] if c["preset"] == "deit")
    assert max(deit["max_abs_difference"][k] for k in ("train/loss", "val/loss", "val/top1")) < 1e-5
    assert result["resume_identical"] is True


@pytest.mark.slow
def test_gpu_benchmark_runs_its_stages_on_the_cpu(tmp_path: Path) -> None:
    result = run_quick_benchmark("gpu", tmp_path)
    assert result["cuda"] is False and result["device"] == "cpu"
    assert [row["stage"] for row in result["stages"]] == ["prepare", "train teacher", "teacher_cache", "train distill"]
    assert all(row["train_images_per_second"] for row in result["stages"] if row["stage"].startswith("train"))
