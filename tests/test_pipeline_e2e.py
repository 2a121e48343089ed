"""End to end: the real `dvc repro` on a copy of this repository with tiny parameters.

Checks every declared output and metric exists, that a second `dvc repro` does nothing, that
a forced re-run reproduces every cached output bit for bit, and that `dvc exp run -S
student=deit`, `dvc metrics diff` and `dvc plots diff` work.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dvc_repo import built_once, copy_workspace, dvc_env, run, scratch_repository

pytestmark = pytest.mark.slow
# two work units for pytest-xdist (--dist loadgroup): the fresh run and its forced re-run; the experiments
FRESH = pytest.mark.xdist_group("pipeline_e2e_fresh")
EXPERIMENTS = pytest.mark.xdist_group("pipeline_e2e_experiments")


def shrink(params: dict) -> dict:
    params["datasets"]["mnist"]["options"].update(train_per_class=4, val_per_class=2, test_per_class=3)
    # two precisions without compilation keep the quantize stage short; kdlib/quantize has its own tests
    params["eval"].update(precisions=["fp32", "fp8"], warmup_runs=1, timed_runs=3, throughput_runs=1,
                          calibration_images=8)
    for preset in params["models"].values():
        preset["epochs"] = 1
        preset["warmup_epochs"] = 0
    return params


def build_trained(work: Path) -> dict:
    """Copy the repository into ``work`` with tiny parameters, run `dvc repro` from scratch, then
    `dvc repro` again; the record keeps both outputs for the first test's checks."""
    def small(repo: Path) -> None:
        params = shrink(yaml.safe_load((repo / "params.yaml").read_text()))
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = scratch_repository(work, small)
    first = run(["dvc", "repro"], work, env)
    second = run(["dvc", "repro"], work, env)
    return {"first_stdout": first.stdout, "second_stdout": second.stdout}


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The pipeline reproduced once from scratch, shared by this file's two groups of tests (which
    pytest-xdist may run on different workers): read-only, each group changes a copy of it."""
    return built_once(tmp_path_factory, "pipeline-trained", build_trained)


@pytest.fixture(scope="module")
def experiments_workdir(trained, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A copy of the reproduced pipeline for the `dvc exp run` tests, which run in order on it."""
    return copy_workspace(trained[0], tmp_path_factory.mktemp("experiments") / "repo"), dvc_env()


ROLES = ("teacher", "baseline", "distill")


def declared_outputs(work: Path) -> list[Path]:
    pipeline = yaml.safe_load((work / "dvc.yaml").read_text())
    paths = []
    for stage in pipeline["stages"].values():
        variants = [(item, stage["do"]) for item in stage["foreach"]] if "foreach" in stage else [(None, stage)]
        for item, body in variants:
            for entry in body.get("outs", []) + body.get("metrics", []) + body.get("plots", []):
                path = entry if isinstance(entry, str) else next(iter(entry))
                paths.append(work / (path.replace("${item}", item) if item else path))
    return paths


MEASURED = ("timing.json", "reports/quantization.json", "reports/quantization.csv", "reports/results.md")


def measured(path: str) -> bool:
    return path.endswith(MEASURED) or path.startswith("reports/quantize/")


def lock_hashes(work: Path) -> dict[str, str]:
    """md5 of every DVC output except those holding wall-clock measurements (training time, latency),
    which differ by design; results.md is compared without its quantization section."""
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])
            if not measured(out["path"])}


def results_without_measurements(work: Path) -> str:
    return (work / "reports/results.md").read_text().split("## Quantized evaluation")[0]


@FRESH
def test_repro_produces_every_output_and_is_a_noop_the_second_time(trained):
    work, record = trained
    for path in declared_outputs(work):
        assert path.exists(), f"declared output {path.relative_to(work)} missing\n{record['first_stdout'][-3000:]}"
    for role in ROLES:
        evaluation = json.loads((work / f"reports/evaluate/{role}.json").read_text())
        for which in ("best", "last"):
            assert 0.0 <= evaluation[which]["top1"] <= 100.0
        assert evaluation["params"] > 0 and evaluation["checkpoint_bytes"] > 0
        live = json.loads((work / f"reports/{role}/metrics.json").read_text())
        assert {"train", "val", "best_val_top1", "last_val_top1"} <= set(live)
    manifest = json.loads((work / "reports/prepare/manifest.json").read_text())
    assert [manifest["splits"][s]["count"] for s in ("train", "val", "test")] == [40, 20, 30]
    assert "KD gain" in (work / "reports/results.md").read_text()
    summary = json.loads((work / "reports/summary.json").read_text())
    assert summary["kd_gain_top1"] == pytest.approx(summary["distill"]["best"] - summary["baseline"]["best"])
    quantization = json.loads((work / "reports/quantization.json").read_text())["results"]
    assert {row["status"] for role in ("teacher", "baseline", "distill") for row in quantization[role].values()} \
        == {"ok"}, quantization

    assert "Running stage" in record["first_stdout"]
    second = record["second_stdout"]
    assert "Running stage" not in second, second
    assert "up to date" in second


@FRESH
def test_forced_rerun_reproduces_every_output_bit_for_bit(trained, tmp_path):
    reproduced, _ = trained
    before, results = lock_hashes(reproduced), results_without_measurements(reproduced)
    work, env = copy_workspace(reproduced, tmp_path / "repo"), dvc_env()
    run(["dvc", "repro", "--force"], work, env)
    after = lock_hashes(work)
    assert {"models/teacher", "models/teacher_cache", "models/distill", "reports/figures"} <= set(before)
    assert before == after, {k: (before[k], after.get(k)) for k in before if before[k] != after.get(k)}
    assert results == results_without_measurements(work) and "KD gain" in results


@EXPERIMENTS
def test_experiment_with_deit_student_then_metrics_and_plots_diff(experiments_workdir):
    work, env = experiments_workdir
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "baseline results"], work, env)
    # the DeiT student with DeiT's hard distillation-token KD (as in the teacher-architecture study)
    run(["dvc", "exp", "run", "-S", "student=deit", "-S", "distill.method=deit_hard"], work, env)
    live = json.loads((work / "reports/distill/metrics.json").read_text())
    assert "dist" in live["train"] and live["params"] > 0
    assert json.loads((work / "models/align/align.json").read_text())["aligned"] is False
    ckpt_meta = __import__("torch").load(work / "models/distill/best.pt", weights_only=True)["meta"]
    assert ckpt_meta["arch"].startswith("deit_") and ckpt_meta["preset"] == "deit"
    diff = run(["dvc", "metrics", "diff", "--all"], work, env).stdout
    assert "top1" in diff
    plots = run(["dvc", "plots", "diff", "HEAD", "-o", "plots_out"], work, env)
    html = (work / "plots_out" / "index.html").read_text()
    assert "Validation top-1" in html or "val/top1" in html, plots.stdout


@EXPERIMENTS
def test_feature_distillation_experiments(experiments_workdir):
    """`dvc exp run -S distill.method=...`: a feature method runs the align stage and stores its LSH
    bias with the student; a sweep of its knobs reuses the teacher cache, and evaluates and measures
    only the student it changes (evaluate and quantize run once per model)."""
    import torch

    work, env = experiments_workdir
    first = run(["dvc", "exp", "run", "-S", "student=cnn_small", "-S", "distill.method=lshl2"], work, env).stdout
    assert json.loads((work / "models/align/align.json").read_text())["aligned"] is True
    assert (work / "models/align/last.pt").is_file()
    checkpoint = torch.load(work / "models/distill/best.pt", weights_only=True)
    assert checkpoint["meta"]["feature_student"]["project"] is True  # cnn_small's 64-d feature → resnet18's 512
    assert set(checkpoint["method_state"]) == {"bias", "seed", "weight_std"}
    assert checkpoint["method_state"]["bias"].shape == (32 * 512,)
    assert json.loads((work / "models/teacher_cache/cache.json").read_text())["feature_dim"] == 512
    assert set(json.loads((work / "reports/quantization.json").read_text())["results"]) == set(ROLES)

    sweep = run(["dvc", "exp", "run", "-S", "distill.lshl2.beta=3"], work, env).stdout
    assert "Running stage 'distill'" in sweep
    assert "Running stage 'teacher_cache'" not in sweep, sweep  # the cache does not depend on beta
    for output in (first, sweep):
        assert "Running stage 'quantize@distill'" in output and "Running stage 'evaluate@distill'" in output
        for unchanged in ("quantize@teacher", "evaluate@teacher"):
            assert f"Running stage '{unchanged}'" not in output, output

