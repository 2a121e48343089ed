"""End to end: the real `dvc repro` on a copy of this repository with tiny parameters.

Checks every declared output and metric exists, that a second `dvc repro` does nothing, and that
each student's fidelity to the teacher is what its logits give. That a second from-scratch run
reproduces every cached output bit for bit is in test_bench_pipeline.py.
"""
from __future__ import annotations

import json

import pytest

from kdlib.machine import describe as describe_machine
from kdlib.machine import label as machine_label
from pipeline_run import ROLES, declared_outputs, trained  # noqa: F401

pytestmark = pytest.mark.slow


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
    assert [manifest["splits"][s]["count"] for s in ("train", "val", "test")] == [40, 20, 40]
    assert "KD gain" in (work / "reports/results.md").read_text()
    summary = json.loads((work / "reports/summary.json").read_text())
    assert summary["kd_gain_top1"] == pytest.approx(summary["distill"]["best"] - summary["baseline"]["best"])
    quantization = json.loads((work / "reports/quantization.json").read_text())["results"]
    assert {row["status"] for role in ("teacher", "baseline", "distill") for row in quantization[role].values()} \
        == {"ok"}, quantization

    for role in ("baseline", "distill"):  # a study's record of each model, from the same files
        evaluation = json.loads((work / f"reports/evaluate/{role}.json").read_text())
        assert summary["models"][role]["best"] == {k: evaluation["best"][k] for k in (
            "top1", "top5", "teacher_agreement", "teacher_kl")}
        assert summary["models"][role]["params"] == evaluation["params"]
        costs = json.loads((work / "reports/costs.json").read_text())["costs"][role]
        assert costs["ms_per_step"] > 0 and costs["train_seconds"] > 0
        assert costs["machine"] == machine_label(describe_machine("cpu"))  # the copy trains here, on the CPU
    assert "teacher_agreement" not in json.loads((work / "reports/evaluate/teacher.json").read_text())["best"]

    assert "Running stage" in record["first_stdout"]
    second = record["second_stdout"]
    assert "Running stage" not in second, second
    assert "up to date" in second


def test_each_students_fidelity_to_the_teacher_is_its_test_agreement_and_kl(trained, monkeypatch):
    """evaluate's teacher_agreement / teacher_kl against the formulas applied here to both models'
    test logits (numpy, float64): % of equal argmax, and mean sum_c p_t (log p_t - log p_s)."""
    import numpy as np

    from kdlib.checkpoint import Checkpoint
    from stages.evaluate import evaluate_checkpoint
    from stages.params import read_params, resolve
    from stages.workspace import Workspace

    work, _ = trained
    monkeypatch.chdir(work)  # the index lists images relative to the repository
    ws = Workspace(work)
    run_ = resolve(read_params(work / "params.yaml"))
    teacher = evaluate_checkpoint(run_, ws.index(), Checkpoint.read(ws.teacher_checkpoint), ws=ws).logits.double().numpy()

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    for role in ("baseline", "distill"):
        for which in ("best", "last"):
            student = evaluate_checkpoint(run_, ws.index(), Checkpoint.read(ws.checkpoint(role, which)), ws=ws)
            s_logits = student.logits.double().numpy()
            agreement = 100.0 * np.mean(teacher.argmax(1) == s_logits.argmax(1))
            kl = np.mean((np.exp(log_softmax(teacher)) * (log_softmax(teacher) - log_softmax(s_logits))).sum(1))
            row = json.loads((work / f"reports/evaluate/{role}.json").read_text())[which]
            assert row["teacher_agreement"] == pytest.approx(agreement, abs=1e-3), (role, which)
            assert row["teacher_kl"] == pytest.approx(kl, abs=1e-5), (role, which)
