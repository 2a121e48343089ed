"""Bad inputs and interruptions around outputs: staged outputs, signals, checkpoints, parameters
that change under a running stage. Each case asserts the message and that nothing half-written is
left at a final path."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from kdlib.checkpoint import Checkpoint, CheckpointError, save_checkpoint
from kdlib.io import write_json
from kdlib.outputs import MANIFEST_NAME, STAGING_DIR, OutputError, StagedOutputs, check_manifest
from kdlib.process import Terminated, process_alive, raise_on_termination
from stages.guard import ParamsChanged, check_dvc_run, params_digest, set_params_mismatches, stage_outputs
from stages.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]


def leftovers(root: Path) -> list[str]:
    """Everything under ``root`` except the staging folder's own (empty) skeleton."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and "dvc-runs" not in p.parts)


def test_exception_inside_staged_outputs_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "models" / "teacher"
    with pytest.raises(RuntimeError, match="boom"):
        with StagedOutputs([final, tmp_path / "reports" / "m.json"], "teacher", tmp_path) as out:
            out(final).mkdir()
            (out(final) / "best.pt").write_bytes(b"x" * 10)
            raise RuntimeError("boom")
    assert not final.exists()
    assert leftovers(tmp_path) == []


def test_missing_declared_output_is_named_and_nothing_is_moved(tmp_path: Path) -> None:
    done, missing = tmp_path / "a.json", tmp_path / "b.json"
    with pytest.raises(OutputError, match=r"did not produce .*b\.json; nothing was moved"):
        with StagedOutputs([done, missing], "t", tmp_path) as out:
            write_json(out(done), {"ok": 1})
    assert not done.exists() and leftovers(tmp_path) == []


def test_output_outside_root_is_refused_before_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not inside"):
        StagedOutputs([tmp_path.parent / "elsewhere.json"], "t", tmp_path)


def test_commit_writes_a_manifest_and_replaces_a_stale_output(tmp_path: Path) -> None:
    final = tmp_path / "models" / "teacher"
    final.mkdir(parents=True)
    (final / "stale.pt").write_bytes(b"old")
    with StagedOutputs([final], "teacher", tmp_path, manifests=[final]) as out:
        out(final).mkdir()
        (out(final) / "best.pt").write_bytes(b"new")
    assert sorted(p.name for p in final.iterdir()) == ["best.pt", MANIFEST_NAME]
    listed = json.loads((final / MANIFEST_NAME).read_text())["files"]
    assert listed["best.pt"]["bytes"] == 3
    check_manifest(final)


def test_staging_of_a_killed_process_is_removed_by_the_next_run(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / STAGING_DIR / f"teacher.{dead.pid}.12345" / "models" / "teacher"
    stale.mkdir(parents=True)
    (stale / "best.pt").write_bytes(b"half")
    mine = tmp_path / STAGING_DIR / f"other.{os.getpid()}.{_start(os.getpid())}"
    mine.mkdir(parents=True)  # a live process's staging is left alone
    with StagedOutputs([tmp_path / "x.json"], "teacher", tmp_path) as out:
        write_json(out(tmp_path / "x.json"), {})
    assert not stale.exists() and mine.exists()


def _start(pid: int) -> int:
    from kdlib.process import process_start_time
    return process_start_time(pid) or 0


def _checkpoint_pair(folder: Path) -> None:
    model = torch.nn.Linear(2, 2)
    for name in ("best.pt", "last.pt"):
        save_checkpoint(folder / name, model, {"epoch": 1, "val_score": 0.5})


def test_checkpoint_from_another_run_beside_the_manifest_is_refused(tmp_path: Path) -> None:
    final = tmp_path / "models" / "teacher"
    with StagedOutputs([final], "teacher", tmp_path, manifests=[final]) as out:
        _checkpoint_pair(out(final))
    save_checkpoint(final / "last.pt", torch.nn.Linear(2, 2), {"epoch": 7, "val_score": 0.1})  # another run's
    with pytest.raises(CheckpointError, match=r"last\.pt.*differs from what .*manifest\.json recorded.*dvc repro --force"):
        Checkpoint.read(final / "last.pt")


def test_checkpoint_not_in_the_manifest_is_refused(tmp_path: Path) -> None:
    final = tmp_path / "models" / "teacher"
    with StagedOutputs([final], "teacher", tmp_path, manifests=[final]) as out:
        out(final).mkdir()
        (out(final) / "notes.txt").write_text("x")
    save_checkpoint(final / "best.pt", torch.nn.Linear(2, 2), {"epoch": 1, "val_score": 0.5})
    with pytest.raises(CheckpointError, match=r"best\.pt is not listed in .*manifest\.json"):
        Checkpoint.read(final / "best.pt")


def test_truncated_checkpoint_names_the_file_and_how_to_rebuild(tmp_path: Path) -> None:
    path = tmp_path / "models" / "teacher" / "best.pt"
    save_checkpoint(path, torch.nn.Linear(2, 2), {"epoch": 1, "val_score": 0.5})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=rf"{path}.*truncated.*dvc repro --force <stage>"):
        Checkpoint.read(path)


def test_missing_checkpoint_names_the_file_and_how_to_rebuild(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nothere\.pt does not exist.*dvc repro --force"):
        Checkpoint.read(tmp_path / "nothere.pt")


def test_write_json_that_fails_leaves_no_temporary_file(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_json(tmp_path / "m.json", {"bad": object()})
    assert leftovers(tmp_path) == []


STAGE_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from kdlib.io import write_json
    from stages.guard import stage_outputs
    class Workspace:  # the real one imports torch: seconds per test for the same root attribute
        root = Path(sys.argv[1])
    ws = Workspace()
    with stage_outputs("demo", ws.root / "out" / "result.json", ws=ws) as out:
        write_json(out(ws.root / "out" / "partial.json"), {"half": True})
        print("working", flush=True)
        time.sleep(float(sys.argv[2]))
        write_json(out(ws.root / "out" / "result.json"), {"done": True})
    print("committed", flush=True)
""")


def _start_stage(tmp_path: Path, sleep_s: float, env: dict[str, str] | None = None) -> subprocess.Popen:
    (tmp_path / "params.yaml").write_text("a: 1\n")
    return subprocess.Popen([sys.executable, "-c", STAGE_SCRIPT, str(tmp_path), str(sleep_s)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_terminated_stage_exits_128_plus_signal_and_writes_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    proc = _start_stage(tmp_path, 30)
    assert proc.stdout.readline().strip() == "working"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, err
    assert f"demo: stopped by {sig.name}; nothing was written" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == ["params.yaml"]


def test_params_changed_while_the_stage_ran_discards_its_outputs(tmp_path: Path) -> None:
    proc = _start_stage(tmp_path, 2)
    assert proc.stdout.readline().strip() == "working"
    (tmp_path / "params.yaml").write_text("a: 2\n")  # what a second `dvc exp run -S a=2` does
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert "params.yaml changed while this stage ran; its outputs were discarded" in err
    assert "dvc exp run --queue" in err
    assert not (tmp_path / "out").exists()


def test_a_comment_edit_is_not_a_parameter_change(tmp_path: Path) -> None:
    proc = _start_stage(tmp_path, 1)
    assert proc.stdout.readline().strip() == "working"
    (tmp_path / "params.yaml").write_text("# a comment\na:   1\n")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert json.loads((tmp_path / "out" / "result.json").read_text()) == {"done": True}
    assert not (tmp_path / "out" / "partial.json").exists()  # undeclared: discarded with the staging


def test_later_stage_of_a_dvc_run_refuses_rewritten_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stages.guard as guard
    monkeypatch.setattr(guard, "dvc_ancestor", lambda: (os.getpid(), _start(os.getpid())))
    monkeypatch.setattr(guard, "command_line", lambda pid: ["dvc", "exp", "run"])
    ws = Workspace(tmp_path)
    (tmp_path / "params.yaml").write_text("distill: {kd: {temperature: 4}}\n")
    digest, values = params_digest(tmp_path / "params.yaml")
    check_dvc_run(ws, "teacher", digest, values)  # the first stage records what it read
    (tmp_path / "params.yaml").write_text("distill: {kd: {temperature: 8}}\n")
    digest, values = params_digest(tmp_path / "params.yaml")
    with pytest.raises(ParamsChanged, match=r"distill: params.yaml differs from what stage 'teacher' of this `dvc` "
                                            r"run .* read.*dvc queue start"):
        check_dvc_run(ws, "distill", digest, values)


def test_dvc_exp_run_set_values_that_params_yaml_no_longer_holds() -> None:
    values = {"distill": {"kd": {"temperature": 8}}, "student": "cnn_small"}
    argv = ["dvc", "exp", "run", "-S", "distill.kd.temperature=4", "-S", "student=cnn_small",
            "--set-param=params.yaml:seed=3"]
    assert set_params_mismatches(argv, values) == ["distill.kd.temperature=4 (params.yaml has 8)"]
    # DVC writes 1e-3 as a number; YAML 1.1 would read the text as a string: still the same value
    assert set_params_mismatches(["-S", "models.deit.lr=1e-3", "-S", "student='cnn_small'"],
                                 {"models": {"deit": {"lr": 0.001}}, "student": "cnn_small"}) == []


def test_outside_dvc_there_is_no_run_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a dvc run (no DVC_STAGE) there is no run record: only the stage's own check applies."""
    monkeypatch.delenv("DVC_STAGE", raising=False)
    (tmp_path / "params.yaml").write_text("a: 1\n")
    digest, values = params_digest(tmp_path / "params.yaml")
    check_dvc_run(Workspace(tmp_path), "teacher", digest, values)
    assert not (tmp_path / STAGING_DIR / "dvc-runs").exists()


def test_invalid_params_yaml_exits_2_before_work(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**yaml.safe_load((REPO / "params.yaml").read_text()),
                                                          "student": "nosuch"}, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "stages.check"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 2
    assert "student = 'nosuch': expected one of the models presets:" in proc.stderr and "cnn_small" in proc.stderr
    assert not (tmp_path / "reports").exists()


def test_terminated_is_not_swallowed_by_except_exception() -> None:
    raise_on_termination()
    caught = None
    try:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Exception:  # noqa: BLE001 - what library code might do
            caught = "exception"
    except Terminated as stop:
        caught = stop.exit_code
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    assert caught == 143


CHILD_SCRIPT = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c",
        "from kdlib.process import child_initializer; import time; child_initializer(); time.sleep(60)"])
    print(child.pid, flush=True)
    time.sleep(60)
""")


def test_a_worker_dies_with_its_killed_parent() -> None:
    parent = subprocess.Popen([sys.executable, "-c", CHILD_SCRIPT], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    child = int(parent.stdout.readline())
    time.sleep(1.0)  # the child has called prctl
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while process_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(child)
