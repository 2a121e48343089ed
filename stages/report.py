"""report: reports/results.md and PNG figures (training curves, accuracy bars, confusion)."""
from __future__ import annotations

import json

import pandas as pd

from kdlib.report import LABELS, plot_accuracy_bars, plot_confusion, plot_training_curves, results_table
from stages.common import REPORTS_DIR, ROLES
from stages.params import load_params

FIGURES = REPORTS_DIR / "figures"


def history(role: str, score: str) -> dict[str, list[float]]:
    curves = {}
    for key in ("train/loss", f"val/{score}"):
        tsv = REPORTS_DIR / role / "plots" / "metrics" / f"{key}.tsv"
        curves[key] = pd.read_csv(tsv, sep="\t")[key.split("/")[-1]].tolist()
    return curves


def main() -> None:
    params = load_params()
    evaluation = json.loads((REPORTS_DIR / "evaluate" / "metrics.json").read_text())
    manifest = json.loads((REPORTS_DIR / "prepare" / "manifest.json").read_text())
    confusions = json.loads((REPORTS_DIR / "evaluate" / "confusion_matrices.json").read_text())
    presets = {"teacher": params["teacher"], "baseline": params["student"], "distill": params["student"]}
    score = "mAP" if "kd_gain_mAP" in evaluation else "top1"
    columns = ["mAP", "CF1", "OF1"] if score == "mAP" else ["top1", "top5"]
    rows = [{"role": role, "preset": presets[role], "arch": params["models"][presets[role]]["arch"],
             **evaluation[role]} for role in ROLES]
    FIGURES.mkdir(parents=True, exist_ok=True)
    plot_training_curves({role: history(role, score) for role in ROLES}, FIGURES / "training_curves.png", score)
    plot_accuracy_bars({role: {w: evaluation[role][w][score] for w in ("best", "last")} for role in ROLES},
                       FIGURES / "test_accuracy.png", score)
    for role in ROLES:
        if role in confusions:
            plot_confusion(confusions[role], confusions["classes"], f"{role} (best checkpoint, test)",
                           FIGURES / f"confusion_{role}.png")
    method = params["distill"]["method"]
    knobs = ", ".join(f"{k} = {v}" for k, v in params["distill"][method].items())
    splits = manifest["splits"]
    text = (
        f"# Results: {params['dataset']}, teacher {params['teacher']} → student {params['student']}\n\n"
        f"Data: {manifest['num_classes']} classes; train {splits['train']['count']}, "
        f"val {splits['val']['count']}, test {splits['test']['count']} images. "
        f"Distillation: {method} ({knobs}); seed {params['seed']}.\n\n"
        + results_table(rows, columns)
        + f"\nKD gain (distill − baseline, best checkpoints, test {LABELS[score]}): "
        f"**{evaluation[f'kd_gain_{score}']:+.2f} pt**\n\n"
        "Figures: `figures/training_curves.png`, `figures/test_accuracy.png`, `figures/confusion_*.png`.\n"
    )
    quant_table = REPORTS_DIR / "quantize" / "table.md"
    if quant_table.is_file():  # written by the quantize stage
        text += ("\n## Quantized evaluation (every model x precision; stages/quantize.py)\n\n" + quant_table.read_text()
                 + "\nFigures: `quantize/accuracy_vs_latency.png`, `quantize/accuracy_vs_size.png` (Pareto front "
                 "dashed), `quantize/teacher_vs_student.png` (bubble area = parameters).\n")
    (REPORTS_DIR / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
