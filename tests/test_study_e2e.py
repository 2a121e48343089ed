"""A tiny study end to end on a copy of the reproduced tiny pipeline (pipeline_run.trained):
`python -m stages.study run` queues DVC experiments and skips what is done, `report` reads them
back through dvc.api into reports/studies/<name>/ (the numbers checked against `dvc exp show
--json`, a second report byte-identical, and the same again from records.json once the experiments
are removed from DVC: its records' parameter and code digests match what `run` would run), and
the report's page renders offline in Chromium."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from browser import charts, offline_prefix, rendered_dom  # noqa: F401 (a fixture)
from dvc_repo import copy_workspace, dvc_env, run
from kdlib.machine import describe as describe_machine
from kdlib.machine import label as machine_label
from pipeline_run import trained  # noqa: F401 (the fixture)

pytestmark = pytest.mark.slow

# The reproduced pipeline's own temperature, on a transfer set without 3s (Hinton et al. 2015 §3) with
# the bias shift chosen on validation: seed 0's experiment takes its teacher and baseline from the
# committed run and trains the distilled student only; seed 1's trains both students.
TINY = """title: A tiny study
seeds: [0]
set: {distill.transfer.exclude_classes: [3], distill.transfer.bias_shift: val}
grid: {distill.kd.temperature: [4.0]}
"""


def study(work, env, *args: str):
    """``python -m stages.study ARGS``; if it fails or times out, the queue's own logs are in the error.
    The limit is generous: on a 2-core CI machine the slowest tests run beside this one."""
    try:
        return run([sys.executable, "-m", "stages.study", *args], work, env, timeout=2400)
    except (AssertionError, subprocess.TimeoutExpired) as err:
        logs = [work / ".dvc" / "tmp" / "study-queue.log", *sorted((work / ".dvc" / "tmp" / "exps").rglob("*.out"))]
        out = err.output.decode(errors="replace") if isinstance(err, subprocess.TimeoutExpired) and err.output else ""
        raise AssertionError(f"{err}\n{out[-2000:]}\n" + "\n".join(f"--- {p}:\n{p.read_text(errors='replace')[-3000:]}"
                                                   for p in logs if p.is_file())) from None


def test_a_tiny_study_runs_skips_what_is_done_and_reports(trained, tmp_path_factory, offline_prefix, tmp_path):
    work, env = copy_workspace(trained[0], tmp_path_factory.mktemp("study") / "repo"), dvc_env()
    (work / "studies" / "tiny.yaml").write_text(TINY)
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "a tiny study"], work, env)
    assert "1 experiments, 0 finished or queued, 1 to queue" in study(work, env, "run", "tiny", "--poll", "2").stdout
    again = study(work, env, "run", "tiny", "--seeds", "0,1", "--poll", "2").stdout
    assert "2 experiments, 1 finished or queued, 1 to queue" in again

    study(work, env, "report", "tiny", "--seeds", "0,1")
    out = work / "reports" / "studies" / "tiny"
    summary = json.loads((out / "summary.json").read_text())
    [row] = summary["rows"]
    assert row["n"] == 2 and row["seeds"] == [0, 1] and not summary["missing"]
    # the same numbers through another reader: each experiment's summary.json in `dvc exp show --json`
    shown = {}
    for commit in json.loads(run(["dvc", "exp", "show", "--json"], work, env).stdout):
        for exp in [e for r in commit.get("experiments") or [] for e in r["revs"]]:
            metrics = exp["data"]["metrics"]["reports/summary.json"]["data"]
            shown[exp["name"]] = (metrics["baseline"]["best"], metrics["distill"]["best"])
    pairs = [shown[name] for name in row["experiments"]]
    assert [(s["baseline_best"], s["distill_best"]) for s in row["per_seed"]] == pairs
    gains = [d - b for b, d in pairs]
    assert row["gain_best"]["mean"] == pytest.approx(sum(gains) / 2, abs=1e-6)
    assert row["distill_teacher_agreement"]["n"] == 2 and 0 <= row["distill_teacher_agreement"]["mean"] <= 100
    # the transfer set's errors, overall and on the 3s, before and after the shift, over both seeds
    assert row["distill_transfer_set"] == {"exclude_classes": [3]} and row["distill_best_transfer_errors"]["n"] == 2
    for seed_row in row["per_seed"]:
        counts = seed_row["distill_best_transfer"]  # numbers only: DVC's metrics reader drops strings
        assert -20.0 <= counts["bias_shift"] <= 20.0 and counts["absent_images"] == row["distill_transfer_absent_images"]
        assert 0 <= counts["corrected_absent_errors"] <= counts["absent_images"]
        assert round(100.0 * (1 - counts["errors"] / counts["images"]), 4) == seed_row["distill_best"]
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    study(work, env, "report", "tiny", "--seeds", "0,1")
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert "| 4.0 | 2 |" in (out / "table.md").read_text()
    # seed 0's models come from the reproduced pipeline's run cache, seed 1's trained in the queue: both here
    assert f"Trained on: {machine_label(describe_machine('cpu'))} (2)." in (out / "table.md").read_text()
    # each record's digests, read from its experiment commit (the params.yaml DVC wrote, the code of its
    # tree), are what `run` computes from the working tree: both experiments count as made with them
    assert "2 of 2 experiments ran with the same parameters and code" in (out / "table.md").read_text()
    stored = json.loads((out / "records.json").read_text())["experiments"]
    assert all(set(r["digests"]) == {"params", "code"} for r in stored.values()) and len(stored) == 2
    # the experiments gone from DVC (another machine, or a new session): the committed records.json
    # stands in for them; nothing is queued again and the report is the same
    run(["dvc", "exp", "remove", "--all-commits"], work, env)
    assert "2 experiments, 2 finished or queued, 0 to queue; 2 of them recorded" in \
        study(work, env, "run", "tiny", "--seeds", "0,1", "--poll", "2").stdout
    assert not [c for c in json.loads(run(["dvc", "exp", "show", "--json"], work, env).stdout) if c.get("experiments")]
    study(work, env, "report", "tiny", "--seeds", "0,1")
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    found = charts(rendered_dom(out / "index.html", offline_prefix, tmp_path))
    assert sum(found.views.values()) == 1, found.views  # the gain chart, drawn with the network off
    assert len(found.images) == 1  # figures/gain.png, inlined
