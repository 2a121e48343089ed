"""Bad inputs through real `dvc`, on a copy of the tiny reproduced pipeline (tests/pipeline_run.py):
the README's `-S` floats reach the stages as numbers, and a diverged training stage fails naming its
step and leaves nothing for DVC to cache (no output, no dvc.lock entry, no run-cache entry)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from dvc_repo import copy_workspace, dvc_env, run
from pipeline_run import trained  # noqa: F401 (session fixture)
from stages.params import load_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    return copy_workspace(trained[0], tmp_path_factory.mktemp("bad-dvc") / "repo")


def baseline_runs(repo: Path) -> int:
    """Run-cache entries of the baseline stage (each is a YAML file holding the stage's command)."""
    runs = repo / ".dvc" / "cache" / "runs"
    return sum("stages.train baseline" in p.read_text() for p in runs.rglob("*") if p.is_file()) if runs.is_dir() else 0


def test_small_floats_set_with_dash_s_are_numbers(workdir: Path) -> None:
    """`dvc exp run -S align.weight_decay=1e-5` (the README's LSHFM command) was refused as the string
    '1e-05': DVC writes YAML 1.2 and the stages read YAML 1.1. Three spellings, three keys."""
    proc = run(["dvc", "exp", "run", "-S", "models.cnn_small.lr=1e-5", "-S", "models.resnet18.lr=5e-05",
                "-S", "align.weight_decay=0.00001", "check"], workdir, dvc_env())
    assert "check: params.yaml is valid" in proc.stdout + proc.stderr
    text = (workdir / "params.yaml").read_text()
    assert "1e-05" in text  # what DVC writes: the form PyYAML read as a string
    run_ = load_params(workdir / "params.yaml")
    assert run_.params.models["cnn_small"][1].lr == 1e-5
    assert run_.params.models["resnet18"][1].lr == 5e-5
    assert run_.params.align.weight_decay == 1e-5
    assert all(isinstance(v, float) for v in (run_.params.models["cnn_small"][1].lr, run_.params.align.weight_decay))


def test_a_diverged_training_stage_caches_nothing(workdir: Path) -> None:
    """The issue's case 2: `models.cnn_small.lr: 1.0e+30` trained to loss nan and top-1 10 %, exit 0, and
    dvc.lock recorded it. Now the stage stops at the first non-finite step and DVC keeps nothing."""
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["models"]["cnn_small"]["lr"] = 1.0e30
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = yaml.safe_load((workdir / "dvc.lock").read_text())["stages"]["baseline"]
    cached_before = baseline_runs(workdir)
    assert cached_before >= 1
    proc = run(["dvc", "repro", "baseline"], workdir, dvc_env(), check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    # the first non-finite number: a training step's loss or gradient norm, or (when the steps of this tiny
    # epoch stay finite with weights of 1e30) the validation loss after it
    assert re.search(r"error: (training diverged at epoch 1, step \d+ of \d+|validation after epoch 1): "
                     r"[^\n]*(nan|inf)[^\n]*[Nn]othing was written", output), output
    assert "Traceback" not in output
    assert not (workdir / "models" / "baseline").exists()  # DVC removed the old one; nothing replaced it
    after = yaml.safe_load((workdir / "dvc.lock").read_text())["stages"]["baseline"]
    assert after == before  # the lock still describes the last successful run
    assert baseline_runs(workdir) == cached_before
    assert not list((workdir / ".kdlib-staging").glob("baseline.*"))
