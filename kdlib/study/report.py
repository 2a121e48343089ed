"""Writes a study's report folder: ``table.md``, ``table.csv``, ``summary.json``, ``records.json`` (the
experiments' own metrics, :mod:`kdlib.study.records`), ``figures/`` and a self-contained ``index.html``. The same records give the same bytes (sorted inputs, no clock)."""
from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from kdlib.machine import NOT_RECORDED
from kdlib.study import figures
from kdlib.study.records import dump_records
from kdlib.study.spec import Experiment, Study, override_arg
from kdlib.study.table import Record, csv_text, main_table, markdown, pivot_table, precision_table, study_rows
from kdlib.study.zoo import claims


def _clean(value: Any) -> Any:
    """NaN → None, so summary.json is strict JSON."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def machine_counts(records: Sequence[Record]) -> dict[str, int]:
    """How many experiments trained on each machine (each model's ``costs.<role>.machine``, a
    :func:`kdlib.machine.label`, joined with `` + `` where an experiment's models trained on several,
    e.g. a teacher restored from another machine's run cache), most first."""
    counts: dict[str, int] = {}
    for r in records:
        costs = r.summary.get("costs", {})
        names = sorted({str(c.get("machine") or NOT_RECORDED) for c in costs.values() if isinstance(c, Mapping)})
        key = " + ".join(names) or NOT_RECORDED
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def build_summary(study: Study, records: Sequence[Record], missing: Sequence[Experiment],
                  overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the tables are computed from, per seed included, so anyone can recompute them."""
    rows = study_rows(study, records)
    summary: dict[str, Any] = {
        "study": study.name, "title": study.title, "about": study.about, "file": study.path.name,
        "seeds": sorted({r.experiment.seed for r in records}), "set": study.set, "overrides": dict(overrides),
        "machines": machine_counts(records),
        "axes": study.axes, "rows": rows,
        "missing": [{"experiment": e.name, "cell": e.cell.values, "seed": e.seed} for e in missing]}
    if study.families and rows:
        summary["claims"] = claims(rows, study.families, f"{study.path}: families")
    return _clean(summary)


def write_report(study: Study, records: Sequence[Record], missing: Sequence[Experiment],
                 overrides: Mapping[str, Any], out_dir: Path, page: Any, carried: Mapping[str, Any] | None = None,
                 provenance: str | None = None) -> dict[str, Any]:
    """Write the report into ``out_dir`` (which must be empty or absent); ``page(title, blocks)``
    renders the self-contained HTML (:func:`kdlib.vega_html.standalone_page`). ``carried``: records of
    other experiments that records.json held, written back unchanged (a report over some seeds
    keeps the others'); ``provenance``: table.md's sentence on how many experiments ran with the
    current parameters and code (:func:`kdlib.study.provenance.standing_line`). Returns the summary."""
    summary = build_summary(study, records, missing, overrides)
    rows = summary["rows"]
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    text = [f"# {study.title}\n", f"{study.about}\n" if study.about else "",
            f"Study `{study.name}` (`studies/{study.path.name}`): {len(records)} experiments, seeds "
            f"{', '.join(map(str, summary['seeds'])) or '—'}.",
            "Every experiment: " + (" ".join(f"`-S {override_arg(k, v)}`" for k, v in {**study.set,
                                                                                      **overrides}.items()) or
                                    "params.yaml as committed") + "."]
    commits: dict[str, int] = {}
    for r in records:
        commit = str((r.source or {}).get("commit") or "unknown")[:7]
        commits[commit] = commits.get(commit, 0) + 1
    if commits:
        text.append("Ran on commit " + ", ".join(f"`{c}` ({n})" for c, n in sorted(commits.items())) +
                    "; every experiment's metrics: `records.json`.")
    if summary["machines"]:
        text.append("Trained on: " + "; ".join(f"{m} ({n})" for m, n in summary["machines"].items()) + ".")
    if provenance:
        text.append(provenance)
    text.append("")
    blocks: list[tuple[str, str, Any]] = []
    if not rows:
        text.append("No experiment of this study has finished yet.\n")
    else:
        head, body = main_table(study, rows)
        text += [f"## Per cell: mean ± std over seeds; gain = KD − baseline of the same seed\n",
                 markdown(head, body),
                 "p (t): paired t-test of the per-seed gains; p (W): Wilcoxon signed-rank (n ≥ 6); agreement "
                 "and KL: the student's top-1 agreement with the teacher and mean KL(teacher ‖ student) on the "
                 "test split (Stanton et al., NeurIPS 2021), best checkpoint. Times (train s, ms/step, "
                 "batch-1 ms): the fastest seed, since experiments ran beside each other; memory: the median.\n"]
        blocks.append(("Per cell", "table", (head, body)))
        spec = figures.gain_chart(rows, fig_dir / "gain.png")
        blocks.append(("Gain over the baseline, 95% CI", "vega", spec))
        text.append("Figure: `figures/gain.png`.\n")
        pivot = pivot_table(study, rows)
        if pivot:
            text += ["## As the paper's grid: KD score (gain, p)\n", markdown(*pivot)]
            blocks.append(("As the paper's grid", "table", pivot))
        if study.precisions:
            ptable = precision_table(rows, study.axes)
            text += ["## Per precision (the quantize stage's measurements)\n", markdown(*ptable)]
            blocks.append(("Per precision", "table", ptable))
            blocks.append(("Accuracy vs latency", "vega", figures.precision_chart(rows, fig_dir / "precisions.png")))
            text.append("Figure: `figures/precisions.png`.\n")
        if "claims" in summary:
            text.append("## The claims, from the data\n")
            text += [f"- **{c['question']}** {c['answer']}." for c in summary["claims"]]
            text.append("")
            blocks.append(("The claims", "list", [f"{c['question']} {c['answer']}." for c in summary["claims"]]))
            blocks.append(("Student vs teacher", "vega",
                           figures.teacher_student_chart(rows, study.families, fig_dir / "teacher_student.png")))
            text.append("Figure: `figures/teacher_student.png`.\n")
    if missing:
        text.append(f"## Not finished ({len(missing)})\n")
        text += [f"- `{e.name}`: {e.cell.label}, seed {e.seed}" for e in missing]
        text.append("")
    (out_dir / "table.md").write_text("\n".join(text))
    (out_dir / "table.csv").write_text(csv_text(study, rows))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    (out_dir / "records.json").write_text(json.dumps(dump_records(records, carried), indent=1, sort_keys=True) + "\n")
    for png in sorted(fig_dir.glob("*.png")):
        blocks.append((png.stem, "png", base64.b64encode(png.read_bytes()).decode()))
    (out_dir / "index.html").write_text(page(study.title, "\n".join(text), blocks))
    return summary
