"""The quantization table (Markdown) and figures (PNG): accuracy against latency and against size
with the Pareto front marked, and the teacher-vs-student bubble plot (bubble area ∝ parameters)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kdlib.quantize.measure import ACCURACY_LOSS_MARGIN_PT, LATENCY_SPREAD_BOUND, loss_cause  # noqa: E402
from kdlib.report import LABELS, PNG_META, _human_bytes  # noqa: E402

MARKERS = "osD^v<>pP*Xh"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower ``x`` (cost) and higher ``y`` (accuracy)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _ok(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def plot_accuracy_vs(rows: Sequence[Mapping[str, Any]], x_key: str, xlabel: str, path: Path,
                     score: str = "top1") -> None:
    """One point per (model, precision); colour = model, marker = precision; Pareto front as a line."""
    rows = _ok(rows)
    models = sorted({r["model"] for r in rows})
    precisions = sorted({r["precision"] for r in rows})
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r in rows:
        color = colors[models.index(r["model"]) % len(colors)]
        hollow = x_key.startswith("latency_b1") and r.get("latency_b1_noisy")  # a busy machine's figure
        ax.scatter(r[x_key], r[score], edgecolors=color, facecolors="none" if hollow else color,
                   marker=MARKERS[precisions.index(r["precision"]) % len(MARKERS)], s=40, zorder=3)
    points = [(r[x_key], r[score]) for r in rows]
    front = pareto_front(points)
    if front:
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "k--", lw=1, zorder=2,
                label="Pareto front")
        for i in front:
            ax.annotate(f"{rows[i]['model']}/{rows[i]['precision']}", points[i], fontsize=7,
                        xytext=(4, -10), textcoords="offset points")
    for m in models:
        ax.scatter([], [], color=colors[models.index(m) % len(colors)], label=m)
    for p in precisions:
        ax.scatter([], [], color="gray", marker=MARKERS[precisions.index(p) % len(MARKERS)], label=p)
    if x_key.startswith("latency_b1") and any(r.get("latency_b1_noisy") for r in rows):
        ax.scatter([], [], edgecolors="gray", facecolors="none", label="hollow: noisy latency")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"test {LABELS.get(score, score)} (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=PNG_META)
    plt.close(fig)


def plot_teacher_student(rows: Sequence[Mapping[str, Any]], path: Path, score: str = "top1",
                         precision: str = "fp32") -> None:
    """The teacher-architecture study's figure: accuracy against batch-1 latency, bubble area
    proportional to parameters."""
    rows = [r for r in _ok(rows) if r["precision"] == precision]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    biggest = max((r["params"] for r in rows), default=1)
    for r in rows:
        ax.scatter(r["latency_b1_median_ms"], r[score], s=60 + 3000 * r["params"] / biggest, alpha=0.5)
        ax.annotate(f"{r['model']}\n{r['params']:,} params", (r["latency_b1_median_ms"], r[score]),
                    fontsize=8, ha="center", va="center")
    ax.set_xscale("log")
    ax.set_xlabel(f"latency per image, batch 1 ({precision}, ms, log scale)")
    ax.set_ylabel(f"test {LABELS.get(score, score)} (%)")
    ax.margins(0.25)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=PNG_META)
    plt.close(fig)


def _memory(row: Mapping[str, Any]) -> str:
    inference = row.get("inference_mib")
    return f"{inference:.0f} / {row['peak_rss_mib']:.0f} MiB" if inference is not None else \
        f"— / {row['peak_rss_mib']:.0f} MiB"


def accuracy_flagged(row: Mapping[str, Any], score: str) -> bool:
    """Whether ``row`` loses more than the margin against its fp32 row: its own flag, or (a row
    measured before rows carried one) its delta against :data:`ACCURACY_LOSS_MARGIN_PT`."""
    delta = row.get(f"delta_{score}")
    if "accuracy_loss_flagged" in row:
        return bool(row["accuracy_loss_flagged"])
    return delta is not None and delta < -ACCURACY_LOSS_MARGIN_PT


def delta_cell(row: Mapping[str, Any], score: str) -> str:
    """The Δ vs fp32 of ``row``, marked ``⚠`` when it loses more than the margin."""
    delta = row.get(f"delta_{score}", 0.0)
    return f"⚠ {delta:+.2f}" if accuracy_flagged(row, score) else f"{delta:+.2f}"


def latency_cell(row: Mapping[str, Any]) -> str:
    """``median / p95`` batch-1 latency of ``row``; a noisy one (``latency_b1_noisy``) marked with
    its spread, not shown as a plain figure."""
    text = f"{row['latency_b1_median_ms']:.3f} / {row['latency_b1_p95_ms']:.3f}"
    if row.get("latency_b1_noisy"):
        return f"⚠ {text} (noisy: p90/median {row['latency_b1_spread']:.1f}×)"
    return text


def table_notes(rows: Sequence[Mapping[str, Any]], score: str) -> str:
    """The footnotes the table's ``⚠`` marks need: what each means and its likely cause (the CPU
    capability for int8), one line per distinct cause; empty when nothing is marked."""
    label = LABELS.get(score, score)
    notes = []
    causes: dict[str, list[str]] = {}
    for r in rows:
        if r.get("status") == "ok" and accuracy_flagged(r, score):
            cause = r.get("accuracy_loss_cause") or loss_cause(r["precision"], r.get("cpu"))
            causes.setdefault(cause, []).append(f"{r['model']} {r['precision']}")
    for cause, which in causes.items():
        margin = next((r.get("accuracy_loss_margin_pt") for r in rows if r.get("accuracy_loss_margin_pt")),
                      ACCURACY_LOSS_MARGIN_PT)
        verb = "loses" if len(which) == 1 else "lose"
        notes.append(f"⚠ Δ: {', '.join(which)} {verb} more than {margin:g} pt of test {label} against the same "
                     f"model in fp32 (kdlib.quantize.measure.ACCURACY_LOSS_MARGIN_PT): not noise. Likely cause: "
                     f"{cause}.")
    noisy = [r for r in rows if r.get("status") == "ok" and r.get("latency_b1_noisy")]
    if noisy:
        worst = max(r["latency_b1_spread"] for r in noisy)
        bound = noisy[0].get("latency_b1_spread_bound", LATENCY_SPREAD_BOUND)
        which = ", ".join(f"{r['model']} {r['precision']}" for r in noisy)
        notes.append(f"⚠ noisy latency: {which}: in each of "
                     f"{max(r.get('latency_b1_attempts', 1) for r in noisy)} timings the 90th percentile of the "
                     f"batch-1 calls was more than {bound:g}× their median (up to {worst:.1f}×): the machine was "
                     "busy and these medians are not the model's latency; re-measure on an idle machine "
                     "(`dvc repro --force quantize@<role>`) before comparing them.")
    return "".join(f"\n{note}\n" for note in notes)


def quantization_table(rows: Sequence[Mapping[str, Any]], score: str = "top1",
                       training_seconds: Mapping[str, float] | None = None) -> str:
    """Markdown: model, params, precision, accuracy (Δ vs fp32), latency, throughput, size, memory,
    MACs, training time (the residual-CNN precision study's summary with the deployment columns
    added). Memory: what loading the checkpoint, converting it (export, calibration, compilation
    where the precision needs them) and running it at batch 1 and the throughput batch added to
    the process's peak RSS (``inference_mib``), then the whole evaluation process's peak.
    A Δ losing more than the margin and a noisy latency are marked ``⚠`` and explained in
    footnotes below the table (:func:`table_notes`)."""
    label = LABELS.get(score, score)
    lines = [f"| model | params | MACs | precision | backend | test {label} | Δ vs fp32 | latency b1 median / p95 (ms) "
             "| img/s (batch) | size | × smaller | memory: model / process peak | training time |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    training_seconds = training_seconds or {}
    for r in rows:
        trained = training_seconds.get(r["model"])
        trained_text = f"{trained:.0f} s" if trained is not None else "—"
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r.get('params', 0):,} | — | {r['precision']} | "
                         f"{r.get('status')}: {r.get('reason', '')} | — | — | — | — | — | — | — | {trained_text} |")
            continue
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['macs'] / 1e6:,.1f} M | {r['precision']} | {r['backend']} | "
            f"{r[score]:.2f} | {delta_cell(r, score)} | {latency_cell(r)} | "
            f"{r['throughput_img_s']:,.0f} ({r['throughput_batch']}) | {_human_bytes(r['size_bytes'])} | "
            f"{r.get('size_ratio', 1.0):.2f} | {_memory(r)} | {trained_text} |")
    return "\n".join(lines) + "\n" + table_notes(rows, score)


CSV_COLUMNS = ["model", "precision", "status", "backend", "top1", "top5", "mAP", "delta_top1", "delta_mAP",
               "accuracy_loss_flagged", "latency_b1_median_ms", "latency_b1_p95_ms", "latency_b1_spread",
               "latency_b1_noisy", "throughput_img_s", "size_bytes", "size_ratio", "inference_mib", "peak_rss_mib",
               "params", "macs", "reason"]
MEMORY_NOTE = ("inference_mib: peak RSS (VmHWM, reset at the start) while the checkpoint is loaded, converted "
               "(export, calibration, compilation where the precision needs them) and timed at batch 1 and the "
               "throughput batch, minus the RSS before (rss_start_mib: a fresh process forked from a server that "
               "has imported torch); peak_rss_mib: that process's peak over the whole evaluation, accuracy pass "
               "included")


def write_quantization_report(rows: Sequence[Mapping[str, Any]], settings: Any, score: str, json_path: Path,
                              csv_path: Path, figures: Path, training_seconds: Mapping[str, float]) -> str:
    """Every model × precision row as JSON (with the measurement settings and ``flags``: the rows
    losing more than the accuracy margin and those with a noisy latency) and CSV, the three
    figures (accuracy vs latency and vs size with the Pareto front, teacher vs student), and the
    Markdown table, which is returned."""
    import csv
    import io

    from kdlib.io import write_json, write_text

    measured = {"threads": settings.threads, "batch_1_timed_runs": settings.timed_runs,
                "warmup_runs": settings.warmup_runs, "throughput_batch": settings.throughput_batch,
                "throughput_runs": settings.throughput_runs, "calibration_images": settings.calibration_images,
                "score": score, "memory": MEMORY_NOTE, "accuracy_loss_margin_pt": ACCURACY_LOSS_MARGIN_PT,
                "latency_spread_bound": LATENCY_SPREAD_BOUND}
    ok = [r for r in rows if r.get("status") == "ok"]
    flags = {"accuracy_loss": [f"{r['model']}/{r['precision']}" for r in ok if accuracy_flagged(r, score)],
             "latency_b1_noisy": [f"{r['model']}/{r['precision']}" for r in ok if r.get("latency_b1_noisy")]}
    results: dict[str, Any] = {}
    for r in rows:
        results.setdefault(r["model"], {})[r["precision"]] = r
    write_json(json_path, {"settings": measured, "flags": flags, "results": results})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(csv_path, buffer.getvalue())
    figures.mkdir(parents=True, exist_ok=True)
    plot_accuracy_vs(rows, "latency_b1_median_ms", f"latency per image, batch 1, {settings.threads} threads (ms)",
                     figures / "accuracy_vs_latency.png", score)
    plot_accuracy_vs(rows, "size_bytes", "serialized size (bytes)", figures / "accuracy_vs_size.png", score)
    plot_teacher_student(rows, figures / "teacher_vs_student.png", score)
    return quantization_table(rows, score, training_seconds)
