"""End to end, on a copy of the pipeline reproduced once (pipeline_run.trained): `dvc exp run -S
student=deit`, `dvc metrics diff` and `dvc plots diff` work; feature-distillation experiments
re-run only the stages they change.
"""
from __future__ import annotations

import json

import pytest

from dvc_repo import run
from pipeline_run import ROLES, experiments_workdir, trained  # noqa: F401 (the fixtures)

pytestmark = pytest.mark.slow


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


def test_a_student_seed_leaves_the_teachers_stages_unchanged(experiments_workdir):
    """The teacher trains, evaluates and is measured under ``teacher_seed``: a study over student seeds
    re-runs the students' stages, never the teacher's (``dvc status`` after ``seed`` changes)."""
    import yaml

    work, env = experiments_workdir
    params_file = work / "params.yaml"
    before = params_file.read_text()
    try:
        params = yaml.safe_load(before)
        params["seed"] = int(params["seed"]) + 1
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        changed = set(json.loads(run(["dvc", "status", "--json"], work, env).stdout))
    finally:
        params_file.write_text(before)
    assert {"baseline", "distill", "evaluate@baseline", "evaluate@distill", "quantize@baseline",
            "quantize@distill"} <= changed, changed
    assert not {"teacher", "evaluate@teacher", "quantize@teacher"} & changed, changed
