"""report: gathers every stage's results into ``reports/results.md``, ``reports/summary.json``
(the headline metrics, the KD gain, each model's reproducible record), ``reports/costs.json`` (each
model's measured training time, ms/step, latency and memory), ``reports/quantization.{json,csv}`` and the PNG figures
(training curves, accuracy bars, confusion matrices; accuracy vs latency and size in
``reports/quantize/figures``, apart, since measured figures vary run to run)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from kdlib.io import read_json, write_json, write_text
from kdlib.quantize.figures import write_quantization_report
from kdlib.report import (model_costs, model_record, plot_accuracy_bars, plot_confusion, plot_training_curves,
                          results_markdown)
from stages.guard import stage_outputs
from stages.params import ROLES, Run, load_params
from stages.workspace import Workspace


def history(ws: Workspace, role: str, score: str) -> dict[str, list[float]]:
    """The role's logged curves: every training term (``train/*.tsv``) and the validation score."""
    metrics = ws.reports / role / "plots" / "metrics"
    curves = {}
    for tsv in [*sorted((metrics / "train").glob("*.tsv")), metrics / "val" / f"{score}.tsv"]:
        key = f"{tsv.parent.name}/{tsv.stem}"
        curves[key] = pd.read_csv(tsv, sep="\t")[tsv.stem].tolist()
    return curves


def report(run: Run, ws: Workspace, out: Callable[[Path], Path]) -> str:
    """Write the report's files (each at ``out(final path)``); returns results.md's text."""
    score, figures = run.score, out(ws.reports / "figures")
    evaluation = {role: read_json(ws.reports / "evaluate" / f"{role}.json") for role in ROLES}
    rows = [{"role": role, "preset": run.model(role).preset, "arch": run.model(role).spec.arch, **evaluation[role]}
            for role in ROLES]
    figures.mkdir(parents=True, exist_ok=True)
    note = f"one run (n = 1): seed {run.seed}, teacher seed {run.params.teacher_seed}; studies give means over seeds"
    plot_training_curves({role: history(ws, role, score) for role in ROLES}, figures / "training_curves.png", score,
                         note)
    plot_accuracy_bars({role: {w: evaluation[role][w][score] for w in ("best", "last")} for role in ROLES},
                       figures / "test_accuracy.png", score, note)
    for role in ROLES:
        confusion = read_json(ws.reports / "evaluate" / "matrix" / f"{role}.json")
        if confusion["matrix"] is not None:
            plot_confusion(confusion["matrix"], confusion["classes"], f"{role} (best checkpoint, test)",
                           figures / f"confusion_{role}.png")
    quant_rows = [row for role in ROLES for row in read_json(ws.reports / "quantize" / f"{role}.json")]
    training = {role: read_json(ws.reports / role / "timing.json")["train_seconds"] for role in ROLES}
    # measured figures (latency, memory) vary run to run: apart from the reproducible ones
    table = write_quantization_report(quant_rows, run.params.eval, score, out(ws.reports / "quantization.json"),
                                      out(ws.reports / "quantization.csv"), out(ws.reports / "quantize" / "figures"),
                                      training)
    kd_gain = round(evaluation["distill"]["best"][score] - evaluation["baseline"]["best"][score], 4)
    manifest = read_json(ws.reports / "prepare" / "manifest.json")
    fp32 = {row["model"]: row for row in quant_rows if row["precision"] == "fp32"}
    training = {role: read_json(ws.reports / role / "metrics.json") for role in ROLES}
    write_json(out(ws.reports / "summary.json"), {
        **{role: {"best": evaluation[role]["best"][score], "last": evaluation[role]["last"][score]} for role in ROLES},
        f"kd_gain_{score}": kd_gain, "score": score,
        "models": {role: model_record(evaluation[role], training[role], score) for role in ROLES}})
    write_json(out(ws.reports / "costs.json"), {"costs": {role: model_costs(
        training[role], read_json(ws.reports / role / "timing.json"), fp32.get(role),
        manifest["splits"]["train"]["count"]) for role in ROLES}})
    title = f"{run.params.dataset}, teacher {run.teacher.preset} → student {run.student.preset}"
    text = results_markdown(title, manifest, run.method.name,
                            run.method.knobs, run.seed, rows, score, kd_gain, table)
    write_text(out(ws.reports / "results.md"), text)
    return text


def main() -> None:
    ws = Workspace()
    r = ws.reports
    with stage_outputs("report", r / "figures", r / "quantize" / "figures", r / "results.md", r / "summary.json",
                       r / "costs.json", r / "quantization.json", r / "quantization.csv", ws=ws) as out:
        print(report(load_params(), ws, out))


if __name__ == "__main__":
    main()
