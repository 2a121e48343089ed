"""Resume after a kill: the store's own rules, then real stages killed with SIGKILL and rerun.

A stage killed after its second epoch and run again says it resumes after epoch 2 and ends with
checkpoints and metrics byte-identical to a run that was never killed; its DVCLive logs have
every step once. Under torchrun, a killed worker makes torchrun (``runtime.max_restarts``)
restart the group, which resumes the same way.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlib.resume import ResumeError, ResumeStore, ResumeWarning, restore_rng
from stages.resume import resume_root, stage_key
from train_repo import (copy_repository, kill_group, md5, prepared_repository, run_stage, set_params, stage_env,
                        start_stage, tsv, worker_pids)

OUTPUTS = ("models/teacher/best.pt", "models/teacher/last.pt", "models/teacher/manifest.json",
           "reports/teacher/metrics.json")


# ------------------------------------------------------------------------------ the store

def test_state_and_random_streams_come_back(tmp_path: Path) -> None:
    store = ResumeStore(tmp_path, "key")
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    (tmp_path / "best.pt").write_bytes(b"best")
    store.save(3, {"weights": torch.arange(4.0), "history": [{"loss": 1.0}]}, {"best.pt": tmp_path / "best.pt"})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    state, rng, files = store.load()
    restore_rng(rng)
    assert state["epoch"] == 3 and torch.equal(state["weights"], torch.arange(4.0))
    assert files["best.pt"].read_bytes() == b"best"
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_a_truncated_state_falls_back_to_the_previous_epoch(tmp_path: Path) -> None:
    store = ResumeStore(tmp_path, "key")
    for epoch in (1, 2):
        store.save(epoch, {"epoch_marker": epoch})
    newest = tmp_path / "epoch-0002" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(ResumeWarning, match="epoch-0002.*unreadable"):
        state, _, _ = store.load()
    assert state["epoch"] == 1


def test_nothing_usable_is_a_fresh_start_with_warnings(tmp_path: Path) -> None:
    store = ResumeStore(tmp_path, "key")
    store.save(1, {})
    (tmp_path / "epoch-0001" / "rng-0.pt").write_bytes(b"")
    with pytest.warns(ResumeWarning):
        assert store.load() is None


def test_an_epoch_without_its_complete_marker_is_skipped_and_two_epochs_are_kept(tmp_path: Path) -> None:
    store = ResumeStore(tmp_path, "key")
    for epoch in (1, 2, 3):
        store.save(epoch, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0002", "epoch-0003"]
    (tmp_path / "epoch-0003" / "COMPLETE").unlink()  # killed between the state and its marker
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.load()[0]["epoch"] == 2


def test_a_state_of_another_run_is_ignored_with_a_message(tmp_path: Path) -> None:
    ResumeStore(tmp_path, "other run").save(1, {})
    with pytest.warns(ResumeWarning, match="belongs to another run"):
        assert ResumeStore(tmp_path, "this run").load() is None


def test_another_world_size_is_refused(tmp_path: Path) -> None:
    ResumeStore(tmp_path, "key", world_size=1).save(1, {})
    with pytest.raises(ResumeError, match="saved by 1 processes and this run has 2.*runtime.nproc_per_node"):
        ResumeStore(tmp_path, "key", rank=0, world_size=2).load()


def test_the_key_follows_declared_params_and_dependencies_only(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    params = json.loads(json.dumps(__import__("yaml").safe_load((repo / "params.yaml").read_text())))
    key = stage_key(repo, "teacher", params)
    assert stage_key(repo, "teacher", {**params, "eval": {**params["eval"], "timed_runs": 7}}) == key
    models = {**params["models"], params["teacher"]: {**params["models"][params["teacher"]], "lr": 0.123}}
    assert stage_key(repo, "teacher", {**params, "models": models}) != key
    assert stage_key(repo, "baseline", params) != key
    # a foreach over a mapping (evaluate: the teacher under teacher_seed, the students under seed)
    teacher, student = stage_key(repo, "evaluate", params, "teacher"), stage_key(repo, "evaluate", params, "baseline")
    assert stage_key(repo, "evaluate", {**params, "seed": params["seed"] + 1}, "teacher") == teacher
    assert stage_key(repo, "evaluate", {**params, "teacher_seed": params["teacher_seed"] + 1}, "teacher") != teacher
    assert stage_key(repo, "evaluate", {**params, "seed": params["seed"] + 1}, "baseline") != student
    assert stage_key(repo, "evaluate", {**params, "teacher_seed": params["teacher_seed"] + 1}, "baseline") == student


def test_a_queued_experiment_keeps_its_state_in_the_repository_it_came_from(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KDLIB_RESUME_DIR", raising=False)
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    copy.mkdir(parents=True)
    assert resume_root(copy) == (tmp_path / "repo" / ".kdlib-resume").resolve()
    assert resume_root(tmp_path / "repo") == (tmp_path / "repo" / ".kdlib-resume").resolve()


# ------------------------------------------------------------------------------ real stages

@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def four_epochs(params: dict) -> None:
        params["teacher"] = "cnn_small"
        params["models"]["cnn_small"].update(epochs=4, batch_size=8)
    path = prepared_repository(tmp_path_factory.mktemp("resume") / "repo")
    set_params(path, four_epochs)
    return path


def outputs(repo: Path) -> dict[str, str]:
    return {name: md5(repo / name) for name in OUTPUTS}


def wait_for_epoch(repo: Path, epoch: int, proc, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not list((repo / ".kdlib-resume").glob(f"teacher/*/epoch-{epoch:04d}/COMPLETE")):
        assert proc.poll() is None, f"the stage ended before epoch {epoch}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no epoch {epoch} state within {timeout} s"
        time.sleep(0.05)


def steps(repo: Path) -> list[int]:
    return [int(row[0]) for row in tsv(repo / "reports" / "teacher" / "plots" / "metrics" / "train" / "loss.tsv")[1:]]


@pytest.mark.slow
def test_sigkill_after_the_second_epoch_then_rerun_ends_byte_identical(repo: Path, tmp_path: Path) -> None:
    killed = copy_repository(repo, tmp_path / "killed")
    run_stage(repo, "stages.train", "teacher")
    uninterrupted = outputs(repo)

    proc = start_stage(killed, "stages.train", "teacher")
    wait_for_epoch(killed, 2, proc)
    kill_group(proc)
    assert not (killed / "models" / "teacher").exists()  # nothing half-written at the output
    out = run_stage(killed, "stages.train", "teacher")
    assert "resuming from epoch 2 of 4" in out.stderr and "resumed after epoch 2" in out.stdout
    assert outputs(killed) == uninterrupted
    assert steps(killed) == steps(repo) == [0, 1, 2, 3]
    timing = json.loads((killed / "reports" / "teacher" / "timing.json").read_text())
    assert timing["resumed_from_epoch"] == 2 and len(timing["epoch_seconds"]) == 4
    assert not list((killed / ".kdlib-resume").rglob("*.pt")), "the state is removed once the stage completes"


@pytest.mark.slow
def test_a_killed_worker_is_restarted_by_torchrun_and_resumes(repo: Path, tmp_path: Path) -> None:
    def two_processes(params: dict) -> None:
        params["models"]["cnn_small"]["batch_size"] = 4
        params["runtime"].update(nproc_per_node=2, max_restarts=1)
    reference = copy_repository(repo, tmp_path / "reference")
    killed = copy_repository(repo, tmp_path / "killed")
    for path in (reference, killed):
        set_params(path, two_processes)
    run_stage(reference, "stages.train", "teacher")

    proc = start_stage(killed, "stages.train", "teacher")
    wait_for_epoch(killed, 2, proc)
    workers = worker_pids(killed)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    assert "resuming from epoch" in err
    assert outputs(killed) == outputs(reference)


def test_states_of_other_runs_of_the_stage_are_named_and_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    from kdlib.runtime import Runtime
    from stages.params import read_params
    from stages.resume import resume_store

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("KDLIB_RESUME_DIR", str(tmp_path))
    other = tmp_path / "teacher" / "0123456789abcdef"
    ResumeStore(other, "an earlier run").save(1, {})
    with caplog.at_level("INFO"):
        store = resume_store(repo, "teacher", read_params(repo / "params.yaml"), Runtime(), enabled=True)
    assert store is not None and store.directory != other and store.load() is None
    assert "ignoring the resume states of 1 other run(s) of this stage" in caplog.text and other.name in caplog.text
    assert (other / "epoch-0001" / "COMPLETE").is_file()


HOLD = ("import sys\nfrom pathlib import Path\nfrom stages.params import read_params\nfrom stages.resume import claim\n"
        "root = Path(sys.argv[1])\nprint(claim(root, 'teacher', read_params(root / 'params.yaml')), flush=True)\n"
        "sys.stdin.read()\n")


def hold_claim(root: Path, env: dict[str, str]) -> subprocess.Popen:
    """Another process that claims ``root``'s teacher state and holds it until its stdin closes."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], cwd=root, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "True"
    return holder


def test_a_claimed_state_is_refused_to_a_second_process_until_the_first_ends(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.params import read_params
    from stages.resume import claim

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("KDLIB_RESUME_DIR", str(tmp_path))
    params = read_params(repo / "params.yaml")
    holder = hold_claim(repo, {**os.environ, "PYTHONPATH": str(repo)})
    try:
        assert claim(repo, "teacher", params) is False
    finally:
        holder.communicate("")
    assert claim(repo, "teacher", params) is True
    assert claim(repo, "teacher", params) is True  # this process holds it now
    assert list(tmp_path.glob("teacher/*.lock"))


@pytest.mark.slow
def test_a_second_run_of_the_same_stage_at_once_trains_without_touching_the_first_ones_state(
        repo: Path, tmp_path: Path) -> None:
    # two queued experiments that need the same teacher share the resume folder of the repository they
    # came from; the one that does not own the state must neither use nor remove it
    reference = copy_repository(repo, tmp_path / "reference")
    run_stage(reference, "stages.train", "teacher")
    second = copy_repository(repo, tmp_path / "second")
    env = {**stage_env(second), "KDLIB_RESUME_DIR": str(tmp_path / "shared")}
    holder = hold_claim(second, env)
    try:
        from stages.params import read_params

        key = stage_key(second, "teacher", read_params(second / "params.yaml"))
        owned = tmp_path / "shared" / "teacher" / key[:16]
        assert owned.with_name(f"{owned.name}.lock").is_file()
        ResumeStore(owned, key).save(1, {})  # the owner's epoch 1 (no model in it: using it would fail)
        proc = subprocess.run([sys.executable, "-m", "stages.train", "teacher"], cwd=second, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "holds its resume state; this run trains without resume" in proc.stderr
        assert "resuming" not in proc.stderr
        assert outputs(second) == outputs(reference)
        assert (owned / "epoch-0001" / "COMPLETE").is_file()  # left to its owner
    finally:
        holder.communicate("")
