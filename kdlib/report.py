"""Result tables (Markdown) and figures (PNG) from evaluation metrics and training histories."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

PNG_META = {"Software": None}  # no version string, so the same inputs give the same bytes
LABELS = {"top1": "top-1", "top5": "top-5", "mAP": "mAP", "CF1": "CF1", "OF1": "OF1"}


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def results_table(rows: Sequence[Mapping], columns: Sequence[str] = ("top1", "top5")) -> str:
    """Markdown table; each row has role, preset, arch, params, checkpoint_bytes, best and last
    (each with the metrics in ``columns`` and epoch; a student's with its teacher_agreement and
    teacher_kl). The first column is also shown for last."""
    best = " | ".join(f"test {LABELS.get(c, c)} best" for c in columns)
    lines = [
        f"| model | preset (arch) | params | checkpoint | {best} | test {LABELS.get(columns[0], columns[0])} last "
        "| best / last epoch | agreement with teacher / KL |",
        "|---|---|---:|---:|" + "---:|" * (len(columns) + 3),
    ]
    for r in rows:
        values = " | ".join(f"{r['best'][c]:.2f}" for c in columns)
        fidelity = (f"{r['best']['teacher_agreement']:.2f} % / {r['best']['teacher_kl']:.4f}"
                    if "teacher_agreement" in r["best"] else "—")
        lines.append(
            f"| {r['role']} | {r['preset']} ({r['arch']}) | {r['params']:,} | {_human_bytes(r['checkpoint_bytes'])} "
            f"| {values} | {r['last'][columns[0]]:.2f} | {r['best']['epoch']} / {r['last']['epoch']} | {fidelity} |"
        )
    return "\n".join(lines) + "\n"


def plot_training_curves(
    histories: Mapping[str, Mapping[str, Sequence[float]]], path: Path, score: str = "top1", note: str = ""
) -> dict[str, list[str]]:
    """Three panels, one line per model: the training cross-entropy (``train/ce``; the whole loss of a model
    without one), a distilled student's other loss terms (each on its own scale: a T²-scaled KL or a
    weighted feature term is not comparable with CE, so it never shares CE's axis), and the validation
    score. ``note``: what the curves are of (a run, its seed: n = 1). Returns each panel's line labels."""
    panels = ["train/ce", "terms", f"val/{score}"]
    titles = {"train/ce": "training cross-entropy (log scale)", "terms": "the student's distillation terms",
              f"val/{score}": f"validation {LABELS[score]} (%)"}
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.8))
    for ax, key in zip(axes, panels):
        for name, history in histories.items():
            if key == "terms":
                for term, values in history.items():
                    if term.startswith("train/") and term not in ("train/loss", "train/ce", "train/top1") and values:
                        ax.plot(range(1, len(values) + 1), values, label=f"{name}: {term.removeprefix('train/')}",
                                marker="o", markersize=2)
                continue
            values = history.get(key) or (history.get("train/loss") if key == "train/ce" else None)
            if values:
                ax.plot(range(1, len(values) + 1), values, label=name, marker="o", markersize=2)
        ax.set_title(titles[key], fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "none (the method has no term beside CE)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="0.4")
    if axes[0].lines:
        axes[0].set_yscale("log")
    if axes[1].lines and min(min(line.get_ydata()) for line in axes[1].lines) > 0:
        axes[1].set_yscale("log")
    if note:
        fig.suptitle(note, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=PNG_META)
    lines = {ax.get_title(): [line.get_label() for line in ax.lines] for ax in axes}
    plt.close(fig)
    return lines


def plot_accuracy_bars(accuracies: Mapping[str, Mapping[str, float]], path: Path, score: str = "top1",
                       note: str = "") -> tuple[float, float]:
    """Each model's test score at its best and last checkpoint as points on a shared axis that spans the
    data (a bar chart cut off below would exaggerate the differences), values printed, the legend below
    the plot where it hides nothing. ``note``: n and seed (one run has no interval to show). Returns the
    score axis' limits."""
    names = list(accuracies)
    y = np.arange(len(names))[::-1]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.55 * len(names)))
    for which, marker, offset in (("best", "o", 0.12), ("last", "s", -0.12)):
        values = [accuracies[n][which] for n in names]
        ax.scatter(values, y + offset, marker=marker, s=36, label=f"{which} checkpoint", zorder=3)
        for v, yy in zip(values, y + offset):
            ax.annotate(f"{v:.2f}", (v, yy), textcoords="offset points", xytext=(6, -3), fontsize=8)
    low = min(min(v.values()) for v in accuracies.values())
    high = max(max(v.values()) for v in accuracies.values())
    pad = max((high - low) * 0.15, 0.5)
    ax.set_xlim(max(0.0, low - pad), min(100.0, high + 2 * pad))
    ax.set_yticks(y, names)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.set_xlabel(f"test {LABELS[score]} (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(names) <= 3 else -0.2), ncol=2, fontsize=8,
              frameon=False)
    if note:
        ax.set_title(note, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=PNG_META)
    limits = ax.get_xlim()
    plt.close(fig)
    return limits


def plot_confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str], title: str, path: Path) -> None:
    cm = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * len(classes), 0.6 + 0.45 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    if len(classes) <= 30:
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 10 else 0)
        ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=PNG_META)
    plt.close(fig)


def results_markdown(title: str, manifest: Mapping, method: str, knobs: Mapping, seed: int,
                     rows: Sequence[Mapping], score: str, kd_gain: float, quantization: str | None) -> str:
    """``results.md``: the data, the distillation method, the models table and the KD gain, then
    the quantized-evaluation table when there is one."""
    columns = ["mAP", "CF1", "OF1"] if score == "mAP" else ["top1", "top5"]
    splits = manifest["splits"]
    text = (
        f"# Results: {title}\n\n"
        f"Data: {manifest['num_classes']} classes; train {splits['train']['count']}, "
        f"val {splits['val']['count']}, test {splits['test']['count']} images. "
        f"Distillation: {method} ({', '.join(f'{k} = {v}' for k, v in knobs.items())}); seed {seed}.\n\n"
        + results_table(rows, columns)
        + f"\nKD gain (distill − baseline, best checkpoints, test {LABELS[score]}): **{kd_gain:+.2f} pt**. "
        "Agreement with teacher: the share of test images where the student's top class is the teacher's; "
        "KL: mean KL(teacher ‖ student) of the softmax outputs, nats (Stanton et al., NeurIPS 2021).\n\n"
        "Figures: `figures/training_curves.png`, `figures/test_accuracy.png`, `figures/confusion_*.png`.\n"
    )
    if quantization:
        text += ("\n## Quantized evaluation (every model x precision; stages/quantize.py)\n\n" + quantization
                 + "\nFigures: `quantize/figures/accuracy_vs_latency.png`, `quantize/figures/accuracy_vs_size.png` "
                 "(Pareto front dashed), `quantize/figures/teacher_vs_student.png` (bubble area = parameters).\n")
    return text


def model_record(evaluation: Mapping, training: Mapping, score: str) -> dict:
    """What one trained model contributes to a study row (``summary.json``'s ``models.<role>``): the
    values a re-run reproduces bit for bit. ``evaluation``: the evaluate stage's row; ``training``: the
    training stage's metrics.json (``params`` counted while training, so a distilled student's includes
    what its method adds, e.g. LSHFM's ``feat_fc``). Measured costs: :func:`model_costs`."""
    keys = [score, "top5"] if score == "top1" else [score]
    record = {"preset": evaluation["preset"], "arch": evaluation["arch"], "params": evaluation["params"],
              "train_params": training.get("params"), "checkpoint_bytes": evaluation["checkpoint_bytes"],
              "best_epoch": evaluation["best"]["epoch"], "last_epoch": evaluation["last"]["epoch"],
              "stopped_early": bool(training.get("stopped_early"))}
    if "transfer_absent_classes" in evaluation:  # a transfer set without some classes (kdlib.transfer)
        record["transfer_absent_classes"] = evaluation["transfer_absent_classes"]
    for which in ("best", "last"):
        row = evaluation[which]
        record[which] = {k: row[k] for k in (*keys, "teacher_agreement", "teacher_kl", "transfer") if k in row}
    return record


def model_costs(training: Mapping, timing: Mapping, fp32: Mapping | None, train_images: int) -> dict:
    """One model's measured costs (``costs.json``'s ``costs.<role>``: wall-clock figures, which vary
    run to run, kept apart from the reproducible ``summary.json``): training seconds, ms per optimizer
    step (the median epoch's time over its ``ceil(train_images / global_batch)`` steps) and, from the
    quantize stage's fp32 row (or None), batch-1 latency (with ``latency_b1_noisy`` and its spread
    where the row has them), throughput and memory; ``machine``: what
    the training ran on (:func:`kdlib.machine.label`, from ``timing``), where it was recorded."""
    steps = -(-train_images // max(int(training.get("global_batch") or 1), 1))
    epochs = timing.get("epoch_seconds") or []
    costs = {"train_seconds": timing.get("train_seconds"),
             "ms_per_step": round(1000 * float(np.median(epochs)) / steps, 3) if epochs else None}
    if fp32 is not None and fp32.get("status") == "ok":
        costs.update(latency_b1_ms=fp32["latency_b1_median_ms"], throughput_img_s=fp32["throughput_img_s"],
                     inference_mib=fp32["inference_mib"], peak_rss_mib=fp32["peak_rss_mib"])
        if "latency_b1_noisy" in fp32:  # a latency timed on a busy machine says so here too
            costs.update(latency_b1_noisy=fp32["latency_b1_noisy"], latency_b1_spread=fp32["latency_b1_spread"])
    if timing.get("machine"):
        costs["machine"] = str(timing["machine"])
    return costs
