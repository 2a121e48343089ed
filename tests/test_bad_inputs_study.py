"""Studies never lose or invent experiments (issue 27, item 3): what an adversarial user found, each
turned into a check of the message and of what is kept.

- a value with a comma was split by `dvc exp run -S` into a sweep of two foreign experiments;
- a key stated twice in a study file kept its last value silently;
- `report --seeds 2` rewrote records.json with seed 2's records only;
- a report killed between `rmtree` and `rename` left no report (records.json included);
- a 60×60×60 grid never answered (O(n²) cells);
- two `run` at once queued the same experiments twice;
- records were keyed by their overrides only: after params.yaml changed, `run` still reused them.

No DVC queue is started: the queue listing is replaced by an empty one, and each test works in a
scratch git repository holding params.yaml, a study and its records.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from kdlib import yamlfile
from kdlib.study.provenance import params_digest
from kdlib.study.records import dump_records
from kdlib.study.spec import Study, StudyError, apply_overrides, load_study, override_arg
from kdlib.study.table import Record
from stages import study as cli

REPO = Path(__file__).resolve().parents[1]
STUDY = """title: t
seeds: [0, 1, 2]
set: {eval.precisions: [fp32]}
grid: {distill.kd.temperature: [2.0, 8.0]}
"""
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}


def git(work: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=work, env={**os.environ, **GIT_ENV}, capture_output=True, text=True,
                          check=True).stdout


def summary(top1: float) -> dict:
    def model(score: float) -> dict:
        return {"preset": "p", "best": {"top1": score, "top5": 99.0, "teacher_agreement": 90.0, "teacher_kl": 0.1},
                "last": {"top1": score, "top5": 99.0}, "train_seconds": 1.0, "ms_per_step": 1.0, "params": 10,
                "train_params": 10, "best_epoch": 1, "last_epoch": 2}
    return {"score": "top1", "models": {"teacher": model(97.0), "baseline": model(top1), "distill": model(top1 + 1)}}


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git repository with the project's params.yaml, a code file, study ``t`` and records of its six
    experiments (two cells × three seeds) given digests by ``backfill`` from that commit; DVC's queue
    listing is empty."""
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "t.yaml").write_text(STUDY)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "kdlib").mkdir()
    (tmp_path / "kdlib" / "train.py").write_text("EPOCHS = 1\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "base")
    head = git(tmp_path, "rev-parse", "HEAD").strip()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.exp_queue, "states", lambda: {})
    study = load_study(Path("studies/t.yaml"))
    records = [Record(e, summary(90.0 + e.seed), {"results": {}}, {"commit": head, "experiment_rev": "e" * 40})
               for e in study.experiments()]
    out = tmp_path / "reports" / "studies" / "t"
    out.mkdir(parents=True)
    (out / "records.json").write_text(json.dumps(dump_records(records), indent=1, sort_keys=True) + "\n")
    assert cli.main(["backfill", "t"]) == 0
    return tmp_path


def stored(work: Path) -> dict:
    return json.loads((work / "reports" / "studies" / "t" / "records.json").read_text())["experiments"]


# ---- a comma (or any other character) in a value ------------------------------------------------------

@pytest.mark.parametrize("value", [
    "data/mnist,data/other", "it's", "back\\", "x\\'y", "\\\\'", "1.0", "true", "NULL", "nan", "", " lead",
    "a=b", "[x]", "{a: 1}", "choice(1,2)", "ünï", "two\nlines", "resnet10t", 1e-05, 0.1, -3, 10**20, True, None,
    math.inf, [1, "a,b", [2.5, "x y"]], {"root": "a,b", "sizes": [1, 2]}])
def test_every_value_reaches_dvc_as_one_value_of_its_type(value) -> None:
    """Each ``-S`` argument is parsed back with Hydra's OverridesParser, as DVC parses it: one element,
    equal to the value with its type (1e-05 a float, '1.0' a string)."""
    arg = override_arg("datasets.mnist.root", value)
    assert cli.round_trip("datasets.mnist.root", value) is None, arg
    override = cli.parse_override(arg)
    assert not override.is_sweep_override() and cli.same_value(override.value(), value), (arg, override.value())


def test_a_comma_value_is_one_experiment_and_the_old_form_was_a_sweep(work: Path, capsys) -> None:
    (work / "studies" / "comma.yaml").write_text("seeds: [0]\ngrid:\n"
                                                 "  datasets.mnist.root: ['data/mnist,data/other']\n")
    # what was passed before: DVC reads it as two values, two experiments neither of which is the study's
    assert cli.parse_override("datasets.mnist.root=data/mnist,data/other").is_sweep_override()
    assert cli.main(["run", "comma", "--dry-run"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if "dvc exp run" in x]
    assert len(line) == 1 and """ -S "datasets.mnist.root='data/mnist,data/other'" """ in line[0], line
    args = shlex.split(line[0])
    [root] = [args[i + 1] for i, a in enumerate(args) if a == "-S" and args[i + 1].startswith("datasets.")]
    override = cli.parse_override(root)
    assert not override.is_sweep_override() and override.value() == "data/mnist,data/other"


def test_a_value_dvc_would_change_is_refused_naming_file_key_and_value(work: Path, capsys) -> None:
    (work / "studies" / "interp.yaml").write_text("seeds: [0]\ngrid:\n  datasets.mnist.root: ['${oops}']\n")
    assert cli.main(["run", "interp", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "studies/interp.yaml: datasets.mnist.root = '${oops}'" in err and "OmegaConf" in err, err
    (work / "studies" / "date.yaml").write_text("seeds: [0]\ngrid:\n  datasets.mnist.root: [2024-01-02]\n")
    with pytest.raises(StudyError, match=r"date\.yaml: grid\.datasets\.mnist\.root: datetime\.date\(2024, 1, 2\)"):
        load_study(work / "studies" / "date.yaml")


def test_command_line_values_are_read_as_dvc_reads_them_and_sweeps_refused(work: Path, capsys) -> None:
    assert cli.parse_set(["distill.kd.alpha=1e-1", "datasets.mnist.root='1.0'",
                          "eval.precisions=[fp32, int8_static]"]) \
        == {"distill.kd.alpha": 0.1, "datasets.mnist.root": "1.0", "eval.precisions": ["fp32", "int8_static"]}
    assert type(cli.parse_set(["distill.kd.alpha=1e-5"])["distill.kd.alpha"]) is float
    for args, message in [(["-S", "datasets.mnist.root=data/a,data/b"], "sweep"),
                          (["-S", "distill.kd.alpha=choice(0.1,0.5)"], "sweep"),
                          (["-S", "+distill.kd.extra=1"], "no +, ++, ~ or @package")]:
        assert cli.main(["run", "t", "--dry-run", *args]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and "dvc exp run" not in captured.out, captured.err


# ---- keys stated twice --------------------------------------------------------------------------------

def test_a_key_stated_twice_is_refused_with_its_lines(work: Path, capsys) -> None:
    (work / "studies" / "dup.yaml").write_text("seeds: [0]\nset:\n  distill.kd.temperature: 2.0\n"
                                               "  distill.kd.temperature: 8.0\ngrid: {}\n")
    assert cli.main(["run", "dup", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "studies/dup.yaml: line 4: duplicate key 'distill.kd.temperature'" in err and "line 3" in err, err
    (work / "studies" / "dupval.yaml").write_text("seeds: [0]\ngrid: {student: [deit, cnn_small, deit]}\n")
    with pytest.raises(StudyError, match=r"dupval\.yaml: grid\.student lists deit twice"):
        load_study(work / "studies" / "dupval.yaml")
    assert cli.main(["run", "t", "--dry-run", "-S", "distill.kd.alpha=0.5", "-S", "distill.kd.alpha=0.7"]) == 2
    assert "-S distill.kd.alpha is given twice" in capsys.readouterr().err
    assert cli.main(["run", "t", "--dry-run", "-S", "models.cnn_small={epochs: 1, epochs: 2}"]) == 2
    assert "the key 'epochs' twice" in capsys.readouterr().err


def test_an_alias_bomb_in_a_study_set_is_refused_before_it_expands(work: Path, capsys) -> None:
    """The issue: the same alias bomb that hung params.yaml's digest, in a study's `set:`."""
    levels = ['  a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]'] + [
        f"  {chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(9)]
    (work / "studies" / "bomb.yaml").write_text("seeds: [0]\nset:\n  datasets.mnist.options:\n" +
                                                "\n".join("  " + line for line in levels) + "\ngrid: {}\n")
    start = time.perf_counter()
    assert cli.main(["run", "bomb", "--dry-run"]) == 2
    assert "YAML aliases expand the document to more than 1,000,000 nodes" in capsys.readouterr().err
    assert time.perf_counter() - start < 10


# ---- the grid's size ------------------------------------------------------------------------------------

def test_a_huge_grid_is_refused_at_once_and_a_large_one_builds_in_linear_time(tmp_path: Path) -> None:
    values = "[" + ", ".join(map(str, range(60))) + "]"
    grid = f"grid:\n  distill.kd.temperature: {values}\n  distill.kd.alpha: {values}\n  seed_offset: {values}\n"
    (tmp_path / "big.yaml").write_text("seeds: [0, 1, 2]\n" + grid)
    start = time.perf_counter()
    with pytest.raises(StudyError, match=r"big\.yaml: the grid has 216,000 cells × 3 seeds = 648,000 experiments, "
                                         r"more than max_experiments = 2,000"):
        load_study(tmp_path / "big.yaml")
    assert time.perf_counter() - start < 1.0
    (tmp_path / "big.yaml").write_text("seeds: [0]\nmax_experiments: 1000000\n" + grid)
    raised = load_study(tmp_path / "big.yaml")
    fresh = Study(raised.name, raised.path, "t", "", [0], {}, raised.grid, max_experiments=10**6)
    start = time.perf_counter()
    cells = fresh.cells()
    assert time.perf_counter() - start < 1.0 and len(cells) == 216_000
    assert cells[61].values == {"distill.kd.temperature": 0, "distill.kd.alpha": 1, "seed_offset": 1}
    with pytest.raises(StudyError, match="60 seeds = 12,960,000 experiments"):
        raised.experiments(seeds=list(range(60)))
    # a union of blocks keeps each cell once, whatever the order of its keys
    union = Study("u", Path("u.yaml"), "u", "", [0], {}, [{"a": [1, 2], "b": ["x"]}, {"b": ["x", "y"], "a": [2]}])
    assert [c.values for c in union.cells()] == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}, {"b": "y", "a": 2}]


# ---- report --seeds / --only keep the other records ----------------------------------------------------

def test_a_report_over_some_seeds_keeps_every_other_record(work: Path) -> None:
    before = stored(work)
    assert len(before) == 6
    assert cli.main(["report", "t", "--seeds", "2"]) == 0
    after = stored(work)
    assert after == before  # nothing lost, nothing rewritten: the seed-2 records came from the file itself
    table = (work / "reports" / "studies" / "t" / "table.md").read_text()
    assert "2 experiments, seeds 2." in table
    assert cli.main(["report", "t", "--only", "distill.kd.temperature=8"]) == 0
    assert stored(work) == before
    assert cli.main(["report", "t"]) == 0 and "6 experiments, seeds 0, 1, 2." in \
        (work / "reports" / "studies" / "t" / "table.md").read_text()


# ---- a report killed while it replaces the folder ------------------------------------------------------

class Killed(BaseException):
    """Stands for SIGKILL between two renames: nothing after it runs but ``finally`` blocks."""


def test_a_report_killed_mid_swap_loses_nothing_and_the_next_one_cleans_up(work: Path, monkeypatch) -> None:
    studies = work / "reports" / "studies"
    before = stored(work)
    (studies / ".t-abcd1234").mkdir()  # what the old rmtree + rename left when killed
    (work / ".kdlib-staging" / "study-t.999999999.1").mkdir(parents=True)  # a dead report's staging folder
    real = os.replace

    def killed_after_setting_aside(src, dst):
        real(src, dst)
        if str(dst).endswith(".old"):
            raise Killed()
    monkeypatch.setattr(os, "replace", killed_after_setting_aside)
    with pytest.raises(Killed):
        cli.main(["report", "t"])
    monkeypatch.setattr(os, "replace", real)
    assert not (studies / "t").exists()
    [aside] = [p for p in studies.iterdir() if p.name.startswith(".t.") and p.name.endswith(".old")]
    assert json.loads((aside / "records.json").read_text())["experiments"] == before
    # a dry run meanwhile (no lock) reads the records set aside: nothing is queued again
    assert cli.stored_document("t")[1]["experiments"] == before
    assert cli.main(["report", "t"]) == 0
    assert stored(work) == before
    assert sorted(p.name for p in studies.iterdir()) == ["t"]  # the aside and the .t-xxxxxxxx folder removed
    assert not list((work / ".kdlib-staging").iterdir())
    # killed again, and this time `run` is the next to come: it puts the report back before reading it
    monkeypatch.setattr(os, "replace", killed_after_setting_aside)
    with pytest.raises(Killed):
        cli.main(["report", "t"])
    monkeypatch.setattr(os, "replace", real)
    assert cli.clean_leftovers("t") == [f"reports/studies/t: put back from {aside.name} (a report was killed while "
                                        "replacing it)"]
    assert stored(work) == before


# ---- one run or report of a study at a time ------------------------------------------------------------

def test_a_second_run_or_report_is_refused_naming_the_holder(work: Path, monkeypatch, capsys) -> None:
    listed = []
    monkeypatch.setattr(cli.exp_queue, "states", lambda: listed.append(1) or {})
    monkeypatch.setattr(cli, "queue", lambda *a: pytest.fail("queued while another run held the study"))
    before = (work / "reports" / "studies" / "t" / "records.json").read_bytes()
    with cli.study_lock("t", "run"):
        for command in (["run", "t"], ["report", "t"], ["backfill", "t"]):
            assert cli.main(command) == 2
            err = capsys.readouterr().err
            assert f"study t is busy: pid {os.getpid()} (`python -m stages.study run t`" in err, err
            assert ".dvc/tmp/study-t.lock" in err
        assert not listed  # refused before looking at the queue
        assert cli.main(["run", "t", "--dry-run"]) == 0  # a dry run queues nothing and may look meanwhile
    assert (work / "reports" / "studies" / "t" / "records.json").read_bytes() == before
    with cli.study_lock("t", "report"):  # let go when the holder ends
        pass


# ---- records keyed by the parameters and code they ran with -------------------------------------------

def test_records_made_with_other_parameters_or_code_are_named_and_queued_again(work: Path, capsys) -> None:
    head = git(work, "rev-parse", "HEAD").strip()
    assert cli.worktree_code_digest() == cli.commit_code_digest(head)  # the same digest from both places
    assert cli.main(["run", "t", "--dry-run"]) == 0
    assert "t: 6 experiments, 6 finished or queued, 0 to queue; 6 of them recorded" in capsys.readouterr().out
    params = work / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("    epochs: 30\n", "    epochs: 2\n"))
    assert cli.main(["run", "t", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "t: 6 experiments, 0 finished or queued, 6 to queue" in out
    assert "6 recorded in reports/studies/t/records.json ran with other parameters or code" in out
    assert "other parameters: 6 (models.cnn_small.epochs: 30 → 2;" in out and "other code:" not in out, out
    assert out.count("dvc exp run --queue") == 6
    params.write_text(original)
    (work / "kdlib" / "train.py").write_text("EPOCHS = 2\n")
    assert cli.main(["run", "t", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"other code: 6 (they ran on commit `{head[:7]}` (6)" in out and "other parameters:" not in out, out
    # code the user vouches for (a refactor): the records stand, and the run says on what they rest
    assert cli.main(["run", "t", "--dry-run", "--accept-other-code"]) == 0
    out = capsys.readouterr().out
    assert "t: 6 experiments, 6 finished or queued, 0 to queue" in out
    assert "6 of the recorded ones ran on other code, reused as --accept-other-code asks" in out
    params.write_text(original.replace("    epochs: 30\n", "    epochs: 2\n"))  # never other parameters
    assert cli.main(["run", "t", "--dry-run", "--accept-other-code"]) == 0
    assert "t: 6 experiments, 0 finished or queued, 6 to queue" in capsys.readouterr().out
    params.write_text(original)
    assert cli.main(["report", "t"]) == 0  # all records still reported, with how they stand
    table = (work / "reports" / "studies" / "t" / "table.md").read_text()
    assert f"Against commit `{head[:7]}` with uncommitted changes" in table
    assert "0 of 6 experiments ran with the same parameters and code, 6 with other code" in table
    assert len(stored(work)) == 6


def test_backfill_adds_only_the_digests_from_the_commit_each_record_ran_on(work: Path, capsys) -> None:
    path = work / "reports" / "studies" / "t" / "records.json"
    text = path.read_text()
    records = json.loads(text)["experiments"]
    base = yamlfile.loads(git(work, "show", "HEAD:params.yaml"))
    for raw in records.values():
        assert raw["digests"]["params"] == params_digest(apply_overrides(base, raw["overrides"], "here"))
        del raw["digests"]
    bare = json.dumps({"format": 1, "experiments": records}, indent=1, sort_keys=True) + "\n"
    path.write_text(bare)
    assert cli.main(["backfill", "t"]) == 0
    assert path.read_text() == text  # the same bytes as before the digests were removed
    assert "6 of 6 records given digests" in capsys.readouterr().out
    records[next(iter(records))]["source"] = {}
    path.write_text(json.dumps({"format": 1, "experiments": records}, indent=1, sort_keys=True) + "\n")
    assert cli.main(["backfill", "t"]) == 2
    assert "no source.commit" in capsys.readouterr().err


def test_the_digest_run_expects_is_the_digest_of_what_dvc_writes(tmp_path: Path) -> None:
    """The params digest of an experiment is computed from params.yaml and its overrides; DVC's own
    apply_overrides (Hydra, OmegaConf, ruamel) must give the same parameters, a mapping merged key by key."""
    from dvc.utils.hydra import apply_overrides as dvc_apply

    base = yamlfile.load(REPO / "params.yaml")
    exp = load_study(REPO / "studies" / "ls_kd.yaml").experiments()[0]
    cases = [exp.overrides, {"models.cnn_small": {"epochs": 3}, "distill.kd.alpha": 1e-05,
                             "datasets.mnist.root": "data/a,b"}]
    for overrides in cases:
        path = tmp_path / "params.yaml"
        path.write_text((REPO / "params.yaml").read_text())
        dvc_apply(path, [override_arg(k, v) for k, v in overrides.items()])
        assert params_digest(yamlfile.loads(path.read_text())) == \
            params_digest(apply_overrides(base, overrides, "here")), overrides


def test_a_run_is_refused_while_dvc_lock_names_outputs_the_cache_lacks(work: Path, capsys) -> None:
    """A fresh clone before `dvc pull` / `dvc repro`: DVC fails every queued experiment that restores stages
    from the run cache (seen in a hinton2015 run), so nothing is queued and the remedy is said."""
    (work / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    (work / "dvc.lock").write_text((REPO / "dvc.lock").read_text())  # its outputs are in no cache here
    assert cli.main(["run", "t"]) == 2
    err = capsys.readouterr().err
    assert "dvc.lock records data/prepared, in neither the workspace nor the DVC cache" in err, err
    assert "Run `dvc pull`" in err and "`dvc repro prepare`" in err
    assert cli.main(["run", "t", "--dry-run"]) == 0  # a dry run still lists the plan
