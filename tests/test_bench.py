"""Each benchmark's --quick run: it finishes, prints its table and writes its JSON; the sweep
scripts build their experiment lists (--dry-run) and read ``dvc exp show`` rows."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

EXPECTED_KEYS = {
    "kd_gain": {"seeds", "gain_mean", "gain_std", "teacher_top1", "target_met"},
    "throughput": {"stages", "target_met"},
    "pipeline": {"stage_seconds", "group_seconds", "total_seconds", "noop_repro_seconds", "teacher_top1",
                 "method_experiment_seconds", "method_experiment_stage_seconds", "target_met"},
    "loader": {"images_per_second", "decode_share", "cache_speedup_2_workers"},
    "kd_cache": {"epoch_s_baseline", "epoch_s_online", "epoch_s_cached", "top1_cached", "top1_online",
                 "cached_minus_online_top1"},
    "methods": {"methods", "teacher_top1", "seeds"},
    "scale": {"one_against_two", "kill_and_resume", "resume_identical"},  # tests/test_bench_scale.py
    "gpu": {"cuda", "device", "stages"},  # tests/test_bench_scale.py; on a CPU: --device cpu
}
EXTRA_ARGS = {
    "kd_gain": ["--seeds", "0", "1"],
    "kd_cache": ["--seeds", "0"],
    "methods": ["--seeds", "0", "--groups", "cnn", "--methods", "kd", "lshl2"],
    "gpu": ["--device", "cpu"],
}
ROLES = ("teacher", "baseline", "distill")


@pytest.mark.slow
# pipeline: test_bench_pipeline.py; scale and gpu: test_bench_scale.py (files balance the two test workers)
@pytest.mark.parametrize("name", sorted(set(EXPECTED_KEYS) - {"pipeline", "scale", "gpu"}))
def test_quick_benchmark_writes_its_result(name: str, tmp_path: Path) -> None:
    run_quick_benchmark(name, tmp_path)


def run_quick_benchmark(name: str, tmp_path: Path) -> dict:
    args = [sys.executable, str(REPO / "bench" / f"{name}.py"), "--quick", "--out", str(tmp_path),
            *EXTRA_ARGS.get(name, [])]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert EXPECTED_KEYS[name] <= set(result), set(result)
    assert result["quick"] is True and result["machine"]["cores"]
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


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize(("script", "args", "count"), [
    ("ls_kd_grid.py", [], 8),
    ("ls_kd_grid.py", ["--ls", "0", "--temperatures", "2", "4", "--set", "eval.precisions=[fp32,int8_dynamic]"], 2),
    ("rescnn_sweep.py", ["--blocks", "4", "6"], 2),
])
def test_sweep_dry_run_lists_valid_experiments(script: str, args: list[str], count: int) -> None:
    """The dry run reads this repository's params.yaml and runs no DVC."""
    proc = run_script(script, str(REPO), "--dry-run", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f": {count} experiments" in proc.stdout
    assert proc.stdout.count("\n  ok ") == count, proc.stdout


def test_sweep_dry_run_refuses_a_removed_key() -> None:
    """``eval.roles`` is gone (evaluate and quantize run once per role): an old command line fails
    before anything is queued, naming the key."""
    proc = run_script("ls_kd_grid.py", str(REPO), "--dry-run", "--ls", "0", "--temperatures", "4",
                      "--set", "eval.roles=[distill]")
    assert proc.returncode == 1 and "INVALID" in proc.stdout and "eval.roles" in proc.stdout, proc.stdout


def test_sweep_rows_from_exp_show() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from ls_kd_grid import rows_from_exp_show as grid_rows
        from rescnn_sweep import rows_from_exp_show as sweep_rows
        from rescnn_sweep import split_choices
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert split_choices("1,2,[a,b],{x: 1, y: 2}") == ["1", "2", "[a,b]", "{x: 1, y: 2}"]

    def exp(name: str, params: dict, metrics: dict) -> dict:
        return {"name": name, "data": {"rev": name, "params": {"params.yaml": {"data": params}},
                                       "metrics": {k: {"data": v} for k, v in metrics.items()}}}

    summary = {"teacher": {"best": 98.0, "last": 97.5}, "baseline": {"best": 90.0, "last": 89.0},
               "distill": {"best": 92.5, "last": 92.0}, "kd_gain_top1": 2.5}
    row = {"model": "distill", "precision": "fp32", "status": "ok", "top1": 92.5}
    grid = [{**exp("workspace", {"teacher_ls": None}, {}), "experiments": [{"revs": [
        exp("cell", {"teacher_ls": 0.1, "distill": {"kd": {"temperature": 4.0, "alpha": 1.0}}},
            {"reports/summary.json": summary})]}]}]
    assert grid_rows(grid) == [{"exp": "cell", "teacher_ls": 0.1, "temperature": 4.0, "alpha": 1.0, "score": "top1",
                                "teacher": 98.0, "baseline": 90.0, "distill": 92.5, "kd_gain": 2.5}]
    sweep = [exp("b4", {"student": "rescnn", "models": {"rescnn": {"kwargs": {"blocks": 4}}}},
                 {"reports/quantization.json": {"results": {"distill": {"fp32": row}}},
                  "reports/distill/timing.json": {"train_seconds": 12.0}})]
    assert sweep_rows(sweep) == [{"exp": "b4", "blocks": 4, "role": "distill", "precision": "fp32",
                                  "train_seconds": 12.0, **row}]
