"""Cancelled and concurrent DVC runs, for real: `dvc` killed during training (SIGKILL, SIGTERM),
then `dvc repro` / `dvc exp run`; two `dvc exp run` started at once; two queued experiments.

What must hold: the training process dies with `dvc`; nothing appears at the stage's outputs
and nothing enters DVC's run cache until a run completes; the next run trains from scratch and
leaves the best and last checkpoint of one run with a manifest that agrees; a stage whose
params.yaml is rewritten under it fails loudly and writes nothing."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from cancel_scenario import checkpoint_epochs, scenario, shrink, wait_for_checkpoint  # noqa: E402
from dvc_repo import run, scratch_repository  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    work = tmp_path_factory.mktemp("interrupts") / "repo"
    return work, scratch_repository(work, lambda repo: shrink(repo, "cnn_small", 30))


def assert_clean_rerun(report: dict, epochs: int) -> None:
    assert report["stage_pids"], "the training process was not found before the kill"
    # it notices within 0.5 s; unwinding takes longer on a loaded machine (over 3 s has been seen
    # with the whole suite beside it), while an orphan trains on and writes the outputs checked below
    assert report["stage_exit_s"] is not None and report["stage_exit_s"] < 30, \
        f"the training process outlived dvc by {report['stage_exit_s']} s (None: still running after 60 s)"
    assert report["final_after_kill"] == [] and report["final_after_orphan"] == []
    assert [f for f in report["staging_after_kill"] if not f.startswith("dvc-runs/")] == []
    rerun = report["rerun"]
    assert rerun["rc"] == 0 and rerun["trained"] and not rerun["restored_from_run_cache"]
    assert rerun["run_cache"] == report["run_cache_after_kill"] + 1  # only the complete run entered it
    assert rerun["files"] == ["best.pt", "last.pt", "manifest.json"] and rerun["manifest_ok"] is True
    assert rerun["checkpoint_epochs"]["last.pt"] == epochs


def test_sigkill_of_dvc_during_training_then_dvc_repro(workdir: tuple[Path, dict[str, str]]) -> None:
    work, env = workdir
    report = scenario(work, signal.SIGKILL, 30, env=env)
    assert_clean_rerun(report, 30)


def test_sigterm_of_dvc_during_training_then_dvc_exp_run(workdir: tuple[Path, dict[str, str]]) -> None:
    work, env = workdir
    report = scenario(work, signal.SIGTERM, 31, env=env, rerun=["dvc", "exp", "run", "teacher"])
    assert_clean_rerun(report, 31)


def test_second_dvc_exp_run_fails_the_first_loudly(workdir: tuple[Path, dict[str, str]]) -> None:
    """The second `dvc exp run` rewrites params.yaml, then meets DVC's lock (or, if the first has
    already stopped, runs: its target here is only `check`). The first stops within a second of the
    rewrite, saying why, and leaves nothing of its 40-epoch teacher."""
    work, env = workdir
    run(["git", "checkout", "--", "params.yaml"], work, env)
    since = time.time()
    first = subprocess.Popen(["dvc", "exp", "run", "-S", "models.cnn_small.epochs=400", "teacher"], cwd=work, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_checkpoint(work, first, since, 300)
    started = time.monotonic()
    second = run(["dvc", "exp", "run", "-S", "distill.kd.temperature=8", "check"], work, env, check=False)
    out, _ = first.communicate(timeout=600)
    assert first.returncode != 0, out
    assert time.monotonic() - started < 60, "the first run trained on after params.yaml changed"
    assert "params.yaml changed while this stage ran; its outputs were discarded" in out, out
    assert "dvc queue start" in out
    # DVC may put back what the workspace held before; nothing of the refused 400-epoch run is there
    assert checkpoint_epochs(work / "models" / "teacher").get("last.pt") != 400, second.stdout + second.stderr
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    assert lock["stages"].get("teacher", {}).get("params", {}).get("params.yaml", {}).get(
        "models.cnn_small", {}).get("epochs") != 400
    run(["git", "checkout", "--", "params.yaml"], work, env)


def test_two_queued_experiments_each_run_with_their_own_parameters(workdir: tuple[Path, dict[str, str]]) -> None:
    work, env = workdir
    run(["git", "checkout", "--", "params.yaml"], work, env)
    for epochs in (2, 3):
        run(["dvc", "exp", "run", "--queue", "-S", f"models.cnn_small.epochs={epochs}", "teacher"], work, env)
    run(["dvc", "exp", "run", "--run-all"], work, env)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], work, env).stdout)
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                params = data.get("params", {}).get("params.yaml", {}).get("data", {})
                metrics = data.get("metrics", {}).get("reports/teacher/metrics.json", {}).get("data", {})
                if params and metrics:
                    found[params["models"]["cnn_small"]["epochs"]] = metrics["last_epoch"]
    assert {k: found.get(k) for k in (2, 3)} == {2: 2, 3: 3}, json.dumps(shown)[:3000]
    assert yaml.safe_load((work / "params.yaml").read_text())["models"]["cnn_small"]["epochs"] == 30


def test_unknown_preset_in_dvc_exp_run_lists_the_presets(workdir: tuple[Path, dict[str, str]]) -> None:
    """DVC alone would say "Parameters 'models.nosuch' are missing"; the check stage comes first."""
    work, env = workdir
    run(["git", "checkout", "--", "params.yaml"], work, env)
    proc = run(["dvc", "exp", "run", "-S", "student=nosuch"], work, env, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "student = 'nosuch': expected one of the models presets: resnet18, cnn_small" in out, out
    assert "are missing from" not in out
    run(["git", "checkout", "--", "params.yaml"], work, env)
