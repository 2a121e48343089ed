"""Studies: the statistics on values worked out by hand (closed forms of Student's t with 2 degrees
of freedom, the exact signed-rank null), fidelity on hand-computed logits, the study file's checks,
and the table/report from records whose numbers are known."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from kdlib.metrics import fidelity, multilabel_fidelity
from kdlib.study.page import study_page
from kdlib.study.records import RecordsError, dump_records, load_records
from kdlib.study.report import write_report
from kdlib.study.spec import Cell, StudyError, apply_overrides, experiment_name, load_study, parse_overrides
from kdlib.study.stats import correlation, group_difference, paired_difference, spread, within_correlation
from kdlib.study.table import Record, main_table, study_rows
from kdlib.study.zoo import claims

REPO = Path(__file__).resolve().parents[1]


def test_paired_difference_matches_students_t_with_two_degrees_of_freedom() -> None:
    # d = (1, 2, 3): mean 2, sd 1, t = 2·√3. For 2 df the t CDF is 1/2 + t / (2√(2 + t²)), so the
    # two-sided p is 1 − t/√(2 + t²) and the 0.975 quantile solves t/√(2 + t²) = 0.95.
    result = paired_difference([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    t = 2 * math.sqrt(3)
    q = math.sqrt(2 * 0.95 ** 2 / (1 - 0.95 ** 2))
    assert (result.n, result.mean, result.std) == (3, 2.0, 1.0)
    assert result.p_t == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    assert result.ci95_low == pytest.approx(2 - q / math.sqrt(3), rel=1e-9)
    assert result.ci95_high == pytest.approx(2 + q / math.sqrt(3), rel=1e-9)
    assert result.p_wilcoxon is None  # n < 6


def test_wilcoxon_is_the_exact_signed_rank_test_from_six_pairs() -> None:
    # all six differences positive and distinct: the rank sum is at its extreme, one of 2^6 sign
    # patterns at each end, so the exact two-sided p is 2 / 64
    result = paired_difference([1.1, 2.2, 3.3, 4.4, 5.5, 6.6], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert result.p_wilcoxon == pytest.approx(2 / 64)
    assert paired_difference([1.0] * 6, [1.0] * 6).p_wilcoxon == 1.0


def test_degenerate_samples_are_said_not_invented() -> None:
    one = paired_difference([2.0], [1.0])
    assert one.mean == 1.0 and math.isnan(one.p_t) and math.isnan(one.ci95_low)
    assert paired_difference([2.0, 3.0], [1.0, 2.0]).p_t == 0.0  # equal non-zero differences: t infinite
    assert paired_difference([1.0, 2.0], [1.0, 2.0]).p_t == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([1.0], [1.0, 2.0])
    assert spread([4.0]) .std == 0.0 and spread([1.0, 3.0]).std == pytest.approx(math.sqrt(2))
    assert correlation([1, 2, 3, 4], [2, 4, 6, 8.5]).r > 0.99 and math.isnan(correlation([1, 1, 1], [1, 2, 3]).r)
    g = group_difference([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])
    assert g.difference == 2.0 and 0 < g.p_welch < 0.1


def test_the_within_student_correlation_is_the_ancova_slope_test() -> None:
    """Bakdash & Marusich's repeated-measures correlation equals the t-test of the common slope of
    y ~ group + x; here that test is computed by least squares, independently of the formula."""
    groups = [[(97.4, 97.3), (97.4, 97.4), (95.0, 96.1), (93.2, 95.5)],
              [(97.4, 87.8), (97.4, 88.9), (95.0, 86.0), (93.2, 85.1)],
              [(96.0, 80.0), (94.0, 79.5)]]
    points = [(g, x, y) for g, group in enumerate(groups) for x, y in group]
    design = np.array([[float(x)] + [float(g == k) for k in range(len(groups))] for g, x, _ in points])
    target = np.array([y for _, _, y in points])
    coef, rss, *_ = np.linalg.lstsq(design, target, rcond=None)
    df = len(points) - design.shape[1]
    se = math.sqrt(float(rss[0]) / df * np.linalg.inv(design.T @ design)[0, 0])
    p_ancova = 2 * stats.t.sf(abs(coef[0] / se), df)
    result = within_correlation(groups + [[(91.0, 50.0)]])  # a one-cell student is left out
    assert result.n == 10 and result.r > 0 and result.p == pytest.approx(p_ancova, rel=1e-9)
    # Two cells of one student, plus a one-cell student: no degree of freedom is left. Plain Pearson r
    # on the centred values called this r = -1.00, p = 1.3e-08.
    partial = [[(97.43, 97.30), (97.36, 97.43)], [(97.58, 87.77)]]
    assert math.isnan(within_correlation(partial).p)
    assert correlation([0.035, -0.035, 0.0], [-0.065, 0.065, 0.0]).p < 1e-6  # what the old claim tested


def test_fidelity_on_hand_computed_logits() -> None:
    # sample 1: teacher (0, 0) → (.5, .5), student (ln 3, 0) → (.75, .25): both pick class 0,
    # KL = .5 ln(.5/.75) + .5 ln(.5/.25); sample 2: teacher picks 1, student 0, KL of (.25, .75) ‖ (.75, .25)
    teacher = torch.tensor([[0.0, 0.0], [0.0, math.log(3)]])
    student = torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0]])
    kl1 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    kl2 = 0.25 * math.log(0.25 / 0.75) + 0.75 * math.log(0.75 / 0.25)
    result = fidelity(teacher, student)
    assert result["agreement"] == 50.0 and result["kl"] == pytest.approx((kl1 + kl2) / 2, rel=1e-6)
    assert fidelity(teacher, teacher)["kl"] == pytest.approx(0.0, abs=1e-12)
    # one sigmoid: teacher p .5 (not positive), student .75 (positive): disagree; binary KL as kl1
    ml = multilabel_fidelity(torch.tensor([[0.0]]), torch.tensor([[math.log(3)]]))
    assert ml["agreement"] == 0.0 and ml["kl"] == pytest.approx(kl1, rel=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        fidelity(teacher, student[:, :1])


def write_study(tmp_path: Path, text: str, name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def test_study_files_are_checked_with_the_file_and_key_named(tmp_path: Path) -> None:
    cases = {
        "seeds: [0, 0]\ngrid: {}\n": "seeds",
        "grid: {seed: [1, 2]}\n": "grid.seed",
        "grid: {student: deit}\n": "grid.student",
        "colour: red\n": "unknown key 'colour'",
        "set: {student: deit}\ngrid: {student: [deit]}\n": "also in set",
        "grid: {student: [deit]}\npivot: {rows: [teacher], columns: student}\n": "pivot",
        "[1, 2]\n": "expected a mapping",
    }
    for text, message in cases.items():
        with pytest.raises(StudyError, match=message) as info:
            load_study(write_study(tmp_path, text))
        assert "tiny.yaml" in str(info.value)
    with pytest.raises(StudyError, match="lower case"):
        load_study(write_study(tmp_path, "grid: {}\n", "Bad-Name"))
    with pytest.raises(StudyError, match="no such study"):
        load_study(tmp_path / "absent.yaml")


def test_experiments_are_named_by_their_overrides(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path, "seeds: [0, 1]\nset: {eval.batch_size: 8}\n"
                                              "grid: [{student: [deit, cnn_small]}, {student: [deit]}]\n"))
    assert [c.values for c in study.cells()] == [{"student": "deit"}, {"student": "cnn_small"}]  # union, no repeat
    exps = study.experiments({"dataset": "mnist"})
    assert len(exps) == 4 and len({e.name for e in exps}) == 4
    assert exps[0].overrides == {"eval.batch_size": 8, "student": "deit", "dataset": "mnist", "seed": 0}
    assert [e.name for e in study.experiments({"dataset": "mnist"})] == [e.name for e in exps]  # stable
    assert exps[0].name != study.experiments()[0].name  # other overrides, other experiment
    assert exps[0].name == experiment_name("tiny", {"eval.batch_size": 8, "student": "deit", "dataset": "mnist"}, 0)
    assert [e.seed for e in study.experiments(seeds=[5])] == [5, 5]
    with pytest.raises(StudyError, match="axis"):
        study.experiments({"student": "deit"})
    with pytest.raises(StudyError, match="--seeds"):
        study.experiments({"seed": 3})
    assert parse_overrides(["a.b=[1, 2]", "c=0.1"]) == {"a.b": [1, 2], "c": 0.1}
    with pytest.raises(StudyError, match="key=value"):
        parse_overrides(["novalue"])
    with pytest.raises(StudyError, match="'datasets.nope'"):
        apply_overrides({"datasets": {"mnist": {}}}, {"datasets.nope.root": "x"}, "here")


def test_the_built_in_studies_load_and_every_experiment_is_valid() -> None:
    from stages.params import read_params, resolve

    base = read_params(REPO / "params.yaml")
    for path in sorted((REPO / "studies").glob("*.yaml")):
        study = load_study(path)
        for exp in study.experiments():
            resolve(apply_overrides(base, exp.overrides, str(path)))


def record(study, cell: dict, seed: int, teacher: float, baseline: float, distill: float,
           presets: tuple[str, str] = ("resnet18", "cnn_small")) -> Record:
    exp = next(e for e in study.experiments() if e.cell == Cell(cell) and e.seed == seed)

    def model(preset: str, score: float, agreement: float | None) -> dict:
        best = {"top1": score, "top5": 99.0}
        if agreement is not None:
            best.update(teacher_agreement=agreement, teacher_kl=0.1)
        return {"preset": preset, "best": best, "last": {"top1": score - 0.5, "top5": 99.0}, "train_seconds": 10.0,
                "ms_per_step": 2.0, "params": 100, "train_params": 100 + (5 if agreement and preset != "x" else 0),
                "best_epoch": 3, "last_epoch": 4, "stopped_early": False, "latency_b1_ms": 1.0}
    summary = {"score": "top1", "models": {"teacher": model(presets[0], teacher, None),
                                           "baseline": model(presets[1], baseline, 90.0),
                                           "distill": model(presets[1], distill, 95.0)}}
    return Record(exp, summary, {"results": {}})


def test_rows_tables_and_report_from_known_records(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path, "seeds: [0, 1, 2]\ngrid: {distill.kd.temperature: [2.0, 8.0]}\n"
                                              "pivot: {rows: [], columns: distill.kd.temperature}\n"))
    cells = [{"distill.kd.temperature": 2.0}, {"distill.kd.temperature": 8.0}]
    records = [record(study, cells[0], s, 97.0, 90.0 + s, 91.0 + s + 0.5 * s) for s in (0, 1, 2)]
    records += [record(study, cells[1], s, 97.0, 90.0 + s, 90.0 + s) for s in (0, 1)]
    rows = study_rows(study, records[::-1])  # order of arrival does not matter
    first, second = rows
    assert first["n"] == 3 and first["seeds"] == [0, 1, 2]
    assert first["baseline_best"]["mean"] == 91.0 and first["distill_best"]["mean"] == pytest.approx(92.5)
    assert first["gain_best"]["mean"] == pytest.approx(1.5) and first["gain_best"]["std"] == pytest.approx(0.5)
    assert first["gain_last"]["mean"] == pytest.approx(1.5) and first["extra_params"] == 0
    assert second["n"] == 2 and second["gain_best"]["mean"] == 0.0 and second["gain_best"]["p_t"] == 1.0
    missing = [e for e in study.experiments() if e.cell == Cell(cells[1]) and e.seed == 2]

    def page(title: str, text: str, blocks: list) -> str:  # the real page needs the vendored scripts
        return title + text + json.dumps([b[:2] for b in blocks])
    one, two = tmp_path / "one", tmp_path / "two"
    summary = write_report(study, records, missing, {}, one, page)
    write_report(study, records[::-1], missing, {}, two, page)
    for name in ("table.md", "table.csv", "summary.json", "index.html", "figures/gain.png"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    table = (one / "table.md").read_text()
    assert "+1.50 [" in table and "92.50 ± 1.50" in table and "## Not finished (1)" in table
    assert summary["rows"][0]["per_seed"][2] == {**summary["rows"][0]["per_seed"][2], "seed": 2,
                                                 "baseline_best": 92.0, "distill_best": 94.0}
    header = (one / "table.csv").read_text().splitlines()[0].split(",")
    assert {"distill.kd.temperature", "gain_best_p_t", "gain_best_ci95_low", "distill_teacher_agreement_mean"} \
        <= set(header)


def test_timings_come_from_the_fastest_seed_and_memory_from_the_median(tmp_path: Path) -> None:
    # two seeds' baselines trained while other experiments fought for the cores (587.8 s and 599.1 s,
    # against 44.6 s undisturbed: the methods study's cnn_small baselines); the median would report
    # a slowed-down run
    study = load_study(write_study(tmp_path, "seeds: [0, 1, 2]\ngrid: {distill.kd.temperature: [2.0]}\n"))
    cell = {"distill.kd.temperature": 2.0}
    records = []
    for seed, seconds, step_ms, latency, mib in ((0, 587.79, 1334.1, 3.0, 50.0), (1, 599.12, 1385.6, 1.2, 70.0),
                                                 (2, 44.56, 82.9, 2.0, 60.0)):
        r = record(study, cell, seed, 97.0, 90.0, 91.0)
        r.summary["models"]["baseline"].update(train_seconds=seconds, ms_per_step=step_ms, latency_b1_ms=latency,
                                               inference_mib=mib)
        records.append(r)
    row, = study_rows(study, records)
    assert (row["baseline_train_seconds"], row["baseline_ms_per_step"], row["baseline_latency_b1_ms"]) \
        == (44.56, 82.9, 1.2)
    assert row["baseline_inference_mib"] == 60.0 and row["distill_train_seconds"] == 10.0


def test_records_json_gives_back_the_same_records_and_refuses_a_foreign_one(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path, "seeds: [0, 1]\ngrid: {distill.kd.temperature: [2.0, 8.0]}\n"))
    cell = {"distill.kd.temperature": 2.0}
    records = [Record(r.experiment, r.summary, r.quantization, {"commit": f"{s}" * 40, "experiment_rev": "abc"})
               for s, r in ((s, record(study, cell, s, 97.0, 90.0 + s, 92.0 + s)) for s in (0, 1))]

    def page(title: str, text: str, blocks: list) -> str:
        return title + text
    out = tmp_path / "report"
    first = write_report(study, records, [], {}, out, page)
    stored = json.loads((out / "records.json").read_text())
    back = load_records(stored, study.experiments(), "records.json")
    assert sorted(back) == sorted(r.experiment.name for r in records)
    assert [back[r.experiment.name] for r in records] == records  # metrics, cell, seed and source all kept
    again = tmp_path / "again"
    assert write_report(study, list(back.values()), [], {}, again, page) == first
    assert (again / "records.json").read_bytes() == (out / "records.json").read_bytes()
    assert "Ran on commit `0000000` (1), `1111111` (1)" in (out / "table.md").read_text()
    # another study's experiments find nothing; a record whose overrides were edited is refused
    other = load_study(write_study(tmp_path, "seeds: [0]\ngrid: {distill.kd.temperature: [4.0]}\n"))
    assert load_records(stored, other.experiments(), "records.json") == {}
    name = records[0].experiment.name
    stored["experiments"][name]["overrides"]["distill.kd.temperature"] = 3.0
    with pytest.raises(RecordsError, match=f"records.json: experiments.{name}: its overrides"):
        load_records(stored, study.experiments(), "records.json")
    with pytest.raises(RecordsError, match="expected"):
        load_records({"experiments": []}, study.experiments(), "records.json")
    assert dump_records([]) == {"format": 1, "experiments": {}}


def test_teacher_zoo_claims_follow_the_data(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path, "seeds: [0, 1, 2]\ngrid: {teacher: [r18, vit], student: [r10]}\n"
                                              "families: {r18: ResNet, vit: ViT, r10: ResNet}\n"))
    # the same-family teacher is better and gives +2, the cross-family one +0.5 (with seed noise)
    recs = [record(study, {"teacher": t, "student": "r10"}, s, tacc, 90.0 + s, 90.0 + s + gain + 0.1 * s,
                   (t, "r10")) for t, tacc, gain in (("r18", 97.0, 2.0), ("vit", 92.0, 0.5)) for s in (0, 1, 2)]
    rows = study_rows(study, recs)
    head, body = main_table(study, rows)
    assert head[-2:] == ["teacher: batch-1 ms / MiB", "KD student: batch-1 ms / MiB"] and body[0][-1] == "1.000 / —"
    answers = claims(rows, study.families, "zoo")
    helps, better, family = answers
    assert helps["mean"] == pytest.approx(1.35) and helps["answer"].startswith("Yes") and helps["n"] == 6
    assert better["n"] == 2 and "Not testable" in better["answer"]  # two cells: no correlation test
    assert family["difference"] == pytest.approx(1.5) and family["p_welch"] < 0.05
    with pytest.raises(KeyError, match="'vit'"):
        claims(study_rows(study, recs), {"r18": "ResNet", "r10": "ResNet"}, "zoo")


def test_the_page_inlines_its_scripts_and_loads_nothing() -> None:
    page = study_page("t", "text", [("chart", "vega", {"mark": "point"}), ("a table", "table", (["a"], [["1"]]))])
    assert "<script src=" not in page and "vegaEmbed" in page and "<td>1</td>" in page


def test_the_cli_dry_run_lists_what_it_would_queue_and_refuses_bad_input_first(capsys, monkeypatch) -> None:
    from stages import study

    monkeypatch.chdir(REPO)
    # seeds 7-9: never run, so nothing in reports/studies/ls_kd/records.json counts as done
    assert study.main(["run", "ls_kd", "--only", "student=mobilenetv2", "--only", "distill.kd.temperature=1,64",
                       "--seeds", "7,8,9", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "ls_kd: 12 experiments, 0 finished or queued, 12 to queue" in out  # 2 LS x 2 T x 3 seeds
    assert out.count("dvc exp run --queue -n ls-kd-") == 12 and "-S teacher_ls=0.1" in out
    assert out.count(" report -S ") == 12  # the tables' stage and its inputs, not the ONNX export
    for args, message in [(["-S", "eval.roles=[distill]"], "eval.roles"),  # a removed key, named
                          (["-S", "distill.kd.alpha=2"], "alpha must be in [0, 1]"),
                          (["--only", "student=nope"], "--only student=nope"),
                          (["-S", "teacher_ls=0.1"], "axis")]:
        assert study.main(["run", "ls_kd", "--dry-run", "--seeds", "0", *args]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and "studies/ls_kd.yaml" in captured.err, captured.err
        assert "dvc exp run" not in captured.out
    # seed 7: never recorded. Pasted into a shell, the list value stays one argument.
    assert study.main(["run", "rescnn_precisions", "--dry-run", "--seeds", "7",
                       "--only", "models.rescnn.kwargs.blocks=4"]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert "-S 'eval.precisions=[fp32, fp16, bf16, int8_dynamic, int8_static, fp8]'" in line, line
    assert study.main(["list"]) == 0
    names = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert {"kd_gain", "ls_kd", "methods", "rescnn_precisions", "teacher_zoo"} <= names


def test_queue_workers_share_the_cores_unless_the_user_set_threads() -> None:
    from stages.study import worker_threads

    both = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert worker_threads(2, {}, cores=2) == both and worker_threads(3, {}, cores=2) == both
    assert worker_threads(2, {}, cores=16) == {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8"}
    assert worker_threads(1, {}, cores=2) == {}  # one experiment at a time: torch's own default
    assert worker_threads(2, {"OMP_NUM_THREADS": "2"}, cores=2) == {"MKL_NUM_THREADS": "1"}


def test_report_says_which_machine_each_experiment_trained_on(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path, "seeds: [0, 1, 2]\ngrid: {distill.kd.temperature: [2.0]}\n"))
    cell = {"distill.kd.temperature": 2.0}
    epyc, h200 = "AMD EPYC, 2 cores", "NVIDIA H200 (AMD EPYC, 16 cores)"
    records = []
    for seed, machines in ((0, (epyc, epyc, epyc)), (1, (h200, epyc, epyc)), (2, None)):
        r = record(study, cell, seed, 97.0, 90.0, 91.0)
        summary = dict(r.summary)
        if machines:  # seed 1: a teacher restored from a GPU machine's run cache
            summary["costs"] = {role: {"train_seconds": 1.0, "machine": m}
                                for role, m in zip(("teacher", "baseline", "distill"), machines)}
        records.append(Record(r.experiment, summary, r.quantization))
    summary = write_report(study, records, [], {}, tmp_path / "report", lambda title, text, blocks: title)
    assert summary["machines"] == {"AMD EPYC, 2 cores": 1, "AMD EPYC, 2 cores + NVIDIA H200 (AMD EPYC, 16 cores)": 1,
                                   "not recorded": 1}
    assert ("Trained on: AMD EPYC, 2 cores (1); AMD EPYC, 2 cores + NVIDIA H200 (AMD EPYC, 16 cores) (1); "
            "not recorded (1).") in (tmp_path / "report" / "table.md").read_text()


def test_precision_rows_follow_the_requested_order_whatever_order_the_record_keys_come_in(tmp_path: Path) -> None:
    """A record read back from records.json has its keys sorted; one from DVC has them as written."""
    from kdlib.study.table import precision_rows
    study = load_study(write_study(tmp_path, "seeds: [0, 1]\nset: {eval.precisions: [fp32, int8_static, bf16]}\n"
                                              "grid: {distill.kd.temperature: [2.0]}\n"))
    cell = {"distill.kd.temperature": 2.0}

    def measured(precision: str) -> dict:
        return {"status": "ok", "top1": 90.0, "latency_b1_median_ms": 1.0, "size_bytes": 10, "params": 5}
    records = []
    for seed, order in ((0, ("fp32", "int8_static", "bf16", "fp8")), (1, ("bf16", "fp32", "fp8", "int8_static"))):
        r = record(study, cell, seed, 97.0, 90.0, 91.0)
        assert r.experiment.overrides["eval.precisions"] == ["fp32", "int8_static", "bf16"]
        results = {role: {p: measured(p) for p in order} for role in ("baseline", "distill")}
        records.append(Record(r.experiment, r.summary, {"results": results}))
    for both in (records, records[::-1]):
        rows = precision_rows(both)
        assert [(x["role"], x["precision"]) for x in rows] == [
            (role, p) for role in ("baseline", "distill") for p in ("fp32", "int8_static", "bf16", "fp8")]


class FakeQueue:
    """DVC's queue as `study run` sees it, one step per poll: a worker takes a queued experiment, a running one
    succeeds at the next poll, and a worker with nothing left leaves at the poll after (dvc_task's monitor)."""

    def __init__(self) -> None:
        self.states: dict[str, str] = {}
        self.workers: list[str | None] = []  # each worker's running experiment
        self.events: list[tuple] = []

    def queue(self, exp, known) -> None:
        self.states[exp.name] = "Queued"
        self.events.append(("queue", exp.name))

    def dvc(self, *args: str, detach: bool = False, extra_env: dict | None = None) -> str:
        assert args[:3] == ("queue", "start", "--jobs")
        jobs = int(args[3])
        self.workers += [None] * (jobs - len(self.workers))
        self.events.append(("start", jobs, dict(extra_env or {})))
        return ""

    def step(self) -> dict[str, tuple[str | None, str]]:
        for i, running in enumerate(self.workers):
            if running is not None:
                self.states[running] = "Success"
                self.workers[i] = None
            elif (waiting := [n for n, s in self.states.items() if s == "Queued"]):
                self.states[waiting[0]], self.workers[i] = "Running", waiting[0]
            else:
                self.workers[i] = "gone"
        self.workers = [w for w in self.workers if w != "gone"]
        self.events.append(("running", sum(1 for s in self.states.values() if s == "Running")))
        return {name: (state, "abc1234") for name, state in self.states.items()}


def test_with_several_jobs_a_new_study_runs_its_first_experiment_alone(capsys, monkeypatch) -> None:
    """Two workers started together would each train the stages every experiment shares (hinton2015's
    teacher). The first experiment runs alone on every core; once its worker has left, the rest are queued
    and run two at a time with a thread each. A study with something done starts both at once."""
    from stages import exp_queue, study

    monkeypatch.chdir(REPO)
    fake = FakeQueue()
    monkeypatch.setattr(study, "queue", fake.queue)
    monkeypatch.setattr(study, "dvc", fake.dvc)
    monkeypatch.setattr(study, "missing_lock_outputs", lambda: None)
    monkeypatch.setattr(exp_queue, "states", lambda *a, **k: fake.step() if fake.workers or fake.events else {})
    monkeypatch.setattr(exp_queue, "orphaned", lambda known: [])
    monkeypatch.setattr(exp_queue, "workers_alive", lambda: len(fake.workers))
    args = ["run", "ls_kd", "--only", "student=mobilenetv2", "--only", "distill.kd.temperature=1", "--seeds", "7,8",
            "--poll", "0", "-j", "2"]  # 2 LS teachers x 2 seeds, never run
    assert study.main(args) == 0
    assert "runs alone first, on every core" in capsys.readouterr().out
    first = fake.events[0][1]
    starts = [e for e in fake.events if e[0] == "start"]
    assert starts == [("start", 1, {}), ("start", 2, study.worker_threads(2))]  # every core, then a share each
    rest = [e[1] for e in fake.events if e[0] == "queue"][1:]
    assert len(rest) == 3 and first not in rest
    # nothing else was queued while the first ran, nor before its worker left
    before_rest = fake.events[:fake.events.index(("queue", rest[0]))]
    assert fake.states[first] == "Success" and ("running", 0) == before_rest[-1]
    assert max(e[1] for e in fake.events if e[0] == "running") == 2 and all(s == "Success" for s in fake.states.values())

    # --no-warm-up, or a study with a finished experiment: both workers at once
    fake2 = FakeQueue()
    monkeypatch.setattr(study, "queue", fake2.queue)
    monkeypatch.setattr(study, "dvc", fake2.dvc)
    monkeypatch.setattr(exp_queue, "states", lambda *a, **k: fake2.step() if fake2.workers or fake2.events else {})
    monkeypatch.setattr(exp_queue, "workers_alive", lambda: len(fake2.workers))
    assert study.main([*args, "--no-warm-up"]) == 0
    assert [e[0] for e in fake2.events[:5]] == ["queue"] * 4 + ["start"] and fake2.events[4][1] == 2


def test_a_run_queues_nothing_while_the_worker_of_an_emptied_queue_leaves(capsys, monkeypatch) -> None:
    """A study run right after another: the first run's worker has found its queue empty and is stopping. A
    task queued then is received by that worker and lost with it (CI: Running for ever, no process record,
    every exp_show failing). The run waits for the worker to leave before it queues; a worker that runs a
    queued or running experiment takes new tasks at once."""
    from stages import exp_queue, study

    monkeypatch.chdir(REPO)
    fake = FakeQueue()
    leaving = iter([1, 1, 1])  # the leaving worker is seen three times, then gone
    events = fake.events

    def alive() -> int:
        n = next(leaving, None)
        if n is not None:
            events.append(("alive", n))
            return n
        return len(fake.workers)
    monkeypatch.setattr(study, "queue", fake.queue)
    monkeypatch.setattr(study, "dvc", fake.dvc)
    monkeypatch.setattr(study, "missing_lock_outputs", lambda: None)
    monkeypatch.setattr(study.time, "sleep", lambda s: None)
    monkeypatch.setattr(exp_queue, "states", lambda *a, **k: fake.step() if fake.workers or fake.events[3:] else {})
    monkeypatch.setattr(exp_queue, "orphaned", lambda known: [])
    monkeypatch.setattr(exp_queue, "workers_alive", alive)
    args = ["run", "ls_kd", "--only", "student=mobilenetv2", "--only", "distill.kd.temperature=1", "--only",
            "teacher_ls=0.0", "--seeds", "7", "--poll", "0"]
    assert study.main(args) == 0
    assert "waiting for the queue worker of the emptied queue to leave" in capsys.readouterr().out
    assert [e[0] for e in events[:4]] == ["alive", "alive", "alive", "queue"]

    # a worker busy with a queued experiment: no wait
    assert study.wait_for_leaving_worker({"a": ("Running", "abc"), "b": ("Success", "def")}, limit_s=0) is None
    assert "waiting" not in capsys.readouterr().out


def test_the_params_digest_covers_what_the_run_uses_only() -> None:
    """A data set, model preset or method section the experiment does not use (one added to params.yaml
    later, as dkd's was) leaves its digest as it was; one it uses, or any other key, changes it."""
    from kdlib.study.provenance import params_digest, used_params
    from stages.params import read_params

    base = read_params(REPO / "params.yaml")
    digest = params_digest(base)
    for key, value in (("datasets.cifar10.image_size", 64), ("models.deit.lr", 0.5), ("distill.dkd.beta", 2.0),
                       ("distill.lshl2.beta", 9.0)):
        other = copy.deepcopy(base)
        section, name, knob = key.split(".")
        other[section][name][knob] = value
        assert params_digest(other) == digest, key
        other[section]["new_preset"] = {"x": 1}  # a preset added beside
        assert params_digest(other) == digest, key
    student, method = base["student"], base["distill"]["method"]
    # a transfer set of every class is what runs did before distill.transfer existed: its records stay valid
    assert not base["distill"]["transfer"]["exclude_classes"] and base["distill"]["transfer"]["only_classes"] is None
    before = copy.deepcopy(base)
    del before["distill"]["transfer"]
    assert params_digest(before) == digest
    older = copy.deepcopy(base)  # before model presets had `augment` (null: the data set's own)
    assert base["models"][base["student"]]["augment"] is None
    del older["models"][base["student"]]["augment"]
    assert params_digest(older) == digest
    shifted = copy.deepcopy(base)
    shifted["distill"]["transfer"]["bias_shift"] = 2.0  # with no class left out, no logit is shifted
    assert params_digest(shifted) == digest
    without_3 = copy.deepcopy(base)
    without_3["distill"]["transfer"]["exclude_classes"] = [3]
    assert params_digest(without_3) != digest
    base = without_3
    digest = params_digest(base)
    for path in (("datasets", base["dataset"], "image_size"), ("models", student, "lr"), ("distill", method, "alpha"),
                 ("distill", "transfer", "bias_shift"), ("eval", "batch_size")):
        other = copy.deepcopy(base)
        node = other
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = 0.123
        assert params_digest(other) != digest, path
    used = used_params(base)
    assert set(used["models"]) == {base["teacher"], student} and set(used["datasets"]) == {base["dataset"]}
    assert set(k for k, v in used["distill"].items() if isinstance(v, dict)) == {"transfer", method}


def test_each_cell_against_the_reference_cell_paired_by_seed(tmp_path: Path) -> None:
    """`reference: {distill.method: kd}`: every cell's distilled student against KD's of the same student and
    seed (the methods study's "which beat KD"), over the seeds both have; a cell from another grid block, with
    an axis KD's cell lacks (DKD's warm-up), still finds it. Figures by hand: DKD's differences 1.0, 2.0, 3.0 →
    mean 2, sd 1, t = 2/(1/√3) = 3.46 on 2 df, p = 0.074; CI 2 ± 4.303/√3."""
    study = load_study(write_study(tmp_path, "seeds: [0, 1, 2]\n"
                                              "grid:\n  - {distill.method: [kd, at]}\n"
                                              "  - {distill.method: [dkd], distill.dkd.warmup: [3]}\n"
                                              "reference: {distill.method: kd}\n"))
    kd, at, dkd = {"distill.method": "kd"}, {"distill.method": "at"}, {"distill.method": "dkd", "distill.dkd.warmup": 3}
    records = [record(study, kd, s, 97.0, 90.0, 92.0 + s) for s in (0, 1, 2)]
    records += [record(study, dkd, s, 97.0, 90.0, 92.0 + 2 * s + 1.0) for s in (0, 1, 2)]
    records += [record(study, at, s, 97.0, 90.0, 91.0 + s) for s in (0, 1)]  # seed 2 not finished
    rows = {r["cell"]["distill.method"]: r for r in study_rows(study, records)}
    assert rows["kd"]["vs_reference"] is None
    vs = rows["dkd"]["vs_reference"]
    assert vs["reference"] == "distill.method=kd" and vs["n"] == 3 and vs["mean"] == pytest.approx(2.0)
    assert vs["p_t"] == pytest.approx(0.0742, abs=1e-3)
    assert vs["ci95_high"] - 2.0 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert rows["at"]["vs_reference"]["n"] == 2 and rows["at"]["vs_reference"]["mean"] == pytest.approx(-1.0)
    head, body = main_table(study, list(rows.values()))
    assert head[-2:] == ["vs kd best [95% CI]", "p vs kd (t)"] and body[0][-2:] == ["—", "—"]
    with pytest.raises(StudyError, match="reference"):
        load_study(write_study(tmp_path, "grid: {distill.method: [kd]}\nreference: {distill.method: dist}\n"))


def test_many_rows_of_a_few_students_are_drawn_one_panel_each(tmp_path: Path) -> None:
    """The LS–KD grid (3 students × 8 cells): gains of −80 and +0.3 on one axis hide the small ones, so the
    gain figure draws one panel per student, each on its own scale (the Vega-Lite spec facets the same way),
    and says over how many seeds each mean is."""
    from kdlib.study.figures import gain_chart

    study = load_study(write_study(tmp_path, "seeds: [0, 1]\ngrid: {student: [cnn_small, deit, mlp], "
                                              "distill.kd.temperature: [1.0, 2.0, 4.0]}\n"))
    records = [record(study, {"student": st, "distill.kd.temperature": t}, s, 97.0, 90.0,
                      90.0 + (40.0 if st == "deit" else 0.3) * (s + 1)) for st in ("cnn_small", "deit", "mlp")
               for t in (1.0, 2.0, 4.0) for s in (0, 1)]
    spec = gain_chart(study_rows(study, records), tmp_path / "gain.png")
    assert spec["facet"]["row"]["sort"] == ["student=cnn_small", "student=deit", "student=mlp"]
    assert spec["resolve"]["scale"]["x"] == "independent"
    assert {v["cell"] for v in spec["data"]["values"]} == {f"distill.kd.temperature={t}" for t in (1.0, 2.0, 4.0)}
    assert "n = 2 seeds per cell" in spec["spec"]["layer"][0]["encoding"]["x"]["title"]
    few = gain_chart(study_rows(study, records[:6]), tmp_path / "few.png")  # 3 rows: one panel
    assert "facet" not in few and "layer" in few
