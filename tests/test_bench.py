"""Each benchmark's --quick run: it finishes, prints its table and writes its JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

EXPECTED_KEYS = {
    "throughput": {"stages", "target_met"},
    "pipeline": {"stage_seconds", "group_seconds", "total_seconds", "noop_repro_seconds", "teacher_top1",
                 "method_experiment_seconds", "method_experiment_stage_seconds", "target_met"},
    "loader": {"images_per_second", "decode_share", "cache_speedup_2_workers"},
    "kd_cache": {"epoch_s_baseline", "epoch_s_online", "epoch_s_cached", "top1_cached", "top1_online",
                 "cached_minus_online_top1"},
    "scale": {"one_against_two", "kill_and_resume", "resume_identical"},  # tests/test_bench_scale.py
    "gpu": {"cuda", "device", "stages"},  # tests/test_bench_scale.py; on a CPU: --device cpu
}
EXTRA_ARGS = {
    "kd_cache": ["--seeds", "0"],
    "gpu": ["--device", "cpu"],
}
ROLES = ("teacher", "baseline", "distill")


@pytest.mark.slow
# pipeline: test_bench_pipeline.py; scale and gpu: test_bench_scale.py (files balance the two test workers)
@pytest.mark.parametrize("name", sorted(set(EXPECTED_KEYS) - {"pipeline", "scale", "gpu"}))
def test_quick_benchmark_writes_its_result(name: str, tmp_path: Path) -> None:
    run_quick_benchmark(name, tmp_path)


def run_quick_benchmark(name: str, tmp_path: Path, *extra: str) -> dict:
    args = [sys.executable, str(REPO / "bench" / f"{name}.py"), "--quick", "--out", str(tmp_path),
            *EXTRA_ARGS.get(name, []), *extra]
    # the pipeline bench runs 16 stages from scratch, then an experiment: 10.5 min once on 2 busy cores
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=1500 if name == "pipeline" else 600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert EXPECTED_KEYS[name] <= set(result), set(result)
    assert result["quick"] is True and result["machine"]["logical_cores"] and result["machine"]["cpu"]
    assert "----" in proc.stdout  # the printed table
    if name == "pipeline":
        check_pipeline_result(result)
    return result


def check_pipeline_result(result: dict) -> None:
    """Every stage DVC runs is timed, the per-role ones included; the method experiment on top of
    the default run re-runs the student's stages only."""
    stages = result["stage_seconds"]
    for group in ("evaluate", "quantize"):
        assert {f"{group}@{role}" for role in ROLES} <= set(stages), stages
        assert result["group_seconds"][group] == pytest.approx(sum(stages[f"{group}@{r}"] for r in ROLES))
    assert result["total_seconds"] == pytest.approx(sum(stages.values()))
    ran = result["method_experiment_stage_seconds"]
    assert {"distill", "evaluate@distill", "quantize@distill", "report"} <= set(ran), ran
    assert not {"prepare", "teacher", "baseline", "evaluate@teacher", "evaluate@baseline", "quantize@teacher",
                "quantize@baseline"} & set(ran), ran
    assert {"teacher", "evaluate@teacher"} <= set(result["method_experiment"]["stages_skipped"])
    assert set(result["evaluate"]) == {*ROLES, "kd_gain_top1"}
    assert result["evaluate"]["teacher"]["best"]["top1"] == result["teacher_top1"]

