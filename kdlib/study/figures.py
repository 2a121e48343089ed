"""A study's figures, each as a PNG (matplotlib) and a Vega-Lite spec (for the offline HTML page)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

PNG_METADATA = {"Software": None}  # no version string: the same rows give the same bytes


def _seeds(rows: Sequence[Mapping[str, Any]]) -> str:
    """``n = 3 seeds`` (or a range where cells differ): what every mean in a figure is over."""
    counts = sorted({int(r["n"]) for r in rows})
    return "n = " + (f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}") + " seeds per cell"


def _panels(rows: Sequence[Mapping[str, Any]]) -> tuple[str | None, list[str]]:
    """The axis to draw one panel per value of, when one axis of many rows has a few values (the LS–KD grid's
    three students: gains of −80 and +0.3 on one axis hide the small ones), and each row's panel."""
    if len(rows) > 8:
        for axis in rows[0]["cell"]:
            values = list(dict.fromkeys(str(r["cell"].get(axis)) for r in rows))
            if 2 <= len(values) <= 6 and all(axis in r["cell"] for r in rows):
                return axis, [f"{axis}={r['cell'][axis]}" for r in rows]
    return None, ["" for _ in rows]


def gain_chart(rows: Sequence[Mapping[str, Any]], path: Path) -> dict[str, Any]:
    """Paired gain (best epoch) of every cell with its 95 % CI, one panel per value of an axis when the rows
    are many (each panel with its own scale); returns the Vega-Lite spec."""
    facet, panels = _panels(rows)
    labels = [", ".join(f"{k}={v}" for k, v in r["cell"].items() if k != facet) or "(defaults)" for r in rows]
    order = list(dict.fromkeys(panels))
    heights = [sum(p == name for p in panels) for name in order]
    fig, axes = plt.subplots(len(order), 1, figsize=(7.5, 0.42 * len(rows) + 0.9 * len(order) + 0.6),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    score = rows[0]["score"] if rows else "top1"
    for ax, name in zip(axes[:, 0], order):
        mine = [(label, r["gain_best"]) for label, r, p in zip(labels, rows, panels) if p == name]
        y = list(range(len(mine)))[::-1]
        gains = [g for _, g in mine]
        errs = [[max(g["mean"] - g["ci95_low"], 0) if g["n"] > 1 else 0 for g in gains],
                [max(g["ci95_high"] - g["mean"], 0) if g["n"] > 1 else 0 for g in gains]]
        ax.errorbar([g["mean"] for g in gains], y, xerr=errs, fmt="o", capsize=3)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(y, [label for label, _ in mine], fontsize=8)
        if name:
            ax.set_title(name, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel(f"distilled − baseline, test {score} (pt)\nmean and 95% CI, {_seeds(rows)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=PNG_METADATA)
    plt.close(fig)
    values = [{"cell": label, "panel": panel, "gain": r["gain_best"]["mean"],
               "low": r["gain_best"]["ci95_low"] if r["gain_best"]["n"] > 1 else r["gain_best"]["mean"],
               "high": r["gain_best"]["ci95_high"] if r["gain_best"]["n"] > 1 else r["gain_best"]["mean"]}
              for label, panel, r in zip(labels, panels, rows)]
    layer = [{"mark": "rule", "encoding": {"y": {"field": "cell", "type": "nominal", "sort": None},
                                           "x": {"field": "low", "type": "quantitative",
                                                 "title": f"gain over baseline (pt), 95% CI, {_seeds(rows)}"},
                                           "x2": {"field": "high"}}},
             {"mark": {"type": "point", "filled": True},
              "encoding": {"y": {"field": "cell", "type": "nominal", "sort": None},
                           "x": {"field": "gain", "type": "quantitative"}}}]
    spec: dict[str, Any] = {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "data": {"values": values}}
    if facet is None:
        return {**spec, "width": 420, "layer": layer}
    return {**spec, "facet": {"row": {"field": "panel", "type": "nominal", "sort": order, "title": None}},
            "spec": {"width": 420, "layer": layer},
            "resolve": {"scale": {"x": "independent", "y": "independent"}}}


def _std(spread: Mapping[str, Any]) -> float:
    std = spread.get("std")
    return float(std) if spread.get("n", 0) > 1 and std is not None and std == std else 0.0


def teacher_student_chart(rows: Sequence[Mapping[str, Any]], families: Mapping[str, str], path: Path) -> dict[str, Any]:
    """Distilled student score against teacher score, one point per cell, same/cross family marked."""
    points = [{"teacher": r["teacher_preset"], "student": r["distill_preset"],
               "teacher_score": r["teacher_best"]["mean"], "student_score": r["distill_best"]["mean"],
               "teacher_std": _std(r["teacher_best"]), "student_std": _std(r["distill_best"]),
               "family": "same family" if families.get(r["teacher_preset"]) == families.get(r["distill_preset"])
               else "cross family"} for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    students = sorted({p["student"] for p in points})
    for i, student in enumerate(students):
        for fam, marker in (("same family", "o"), ("cross family", "^")):
            sel = [p for p in points if p["student"] == student and p["family"] == fam]
            if sel:
                ax.errorbar([p["teacher_score"] for p in sel], [p["student_score"] for p in sel],
                            xerr=[p["teacher_std"] for p in sel], yerr=[p["student_std"] for p in sel],
                            fmt=marker, color=f"C{i}", capsize=2, label=f"{student}, {fam}")
                for k, p in enumerate(sel):  # alternate sides so that neighbouring labels do not overlap
                    ax.annotate(p["teacher"], (p["teacher_score"], p["student_score"]), fontsize=7,
                                xytext=(5, 5 if k % 2 == 0 else -10), textcoords="offset points")
    score = rows[0]["score"] if rows else "top1"
    ax.set_xlabel(f"teacher test {score} (%), mean ± std")
    ax.set_ylabel(f"distilled student test {score} (%), mean ± std")
    ax.set_title(_seeds(rows), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=PNG_METADATA)
    plt.close(fig)
    return {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "width": 420, "height": 300,
            "data": {"values": points}, "mark": {"type": "point", "filled": True, "size": 80},
            "encoding": {"x": {"field": "teacher_score", "type": "quantitative", "scale": {"zero": False},
                               "title": f"teacher test {score} (%)"},
                         "y": {"field": "student_score", "type": "quantitative", "scale": {"zero": False},
                               "title": f"distilled student test {score} (%)"},
                         "color": {"field": "student", "type": "nominal"},
                         "shape": {"field": "family", "type": "nominal"},
                         "tooltip": [{"field": "teacher"}, {"field": "student"}]}}


def precision_chart(rows: Sequence[Mapping[str, Any]], path: Path) -> dict[str, Any]:
    """Test score against batch-1 latency of every (cell, model, precision) that ran."""
    points = [{"cell": ", ".join(f"{k}={v}" for k, v in r["cell"].items()), "model": p["role"],
               "precision": p["precision"], "latency_ms": p["latency_b1_ms"], "score": p["score"]["mean"]}
              for r in rows for p in r.get("precisions", []) if p["status"] == "ok"]
    cells = list(dict.fromkeys(p["cell"] for p in points))
    columns = min(len(cells), 3) or 1
    grid_rows = max(-(-len(cells) // columns), 1)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(4.2 * columns + 1.8, 3.4 * grid_rows + 0.6),
                             squeeze=False, sharey=True)
    markers = {"teacher": "^", "baseline": "s", "distill": "o"}
    precisions = sorted({p["precision"] for p in points})
    for ax, cell in zip(axes.flat, cells):  # one panel per cell: the models of a cell apart from another's
        for i, precision in enumerate(precisions):
            for model, marker in markers.items():
                sel = [p for p in points if p["cell"] == cell and p["precision"] == precision and p["model"] == model]
                if sel:
                    ax.scatter([p["latency_ms"] for p in sel], [p["score"] for p in sel], color=f"C{i}",
                               marker=marker, label=f"{precision}, {model}", alpha=0.85)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # the minor ticks' labels collide on a short span
        ax.set_title(cell or "(defaults)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(cells):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("latency, batch 1 (ms)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("test score (%), mean", fontsize=8)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=6, loc="center right")
    fig.suptitle(f"colour: precision; marker: model ({', '.join(f'{m} {k}' for k, m in markers.items())}); "
                 f"{_seeds(rows)}; latency: median of the timed runs, fastest seed", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.82, 0.96))
    fig.savefig(path, dpi=110, metadata=PNG_METADATA)
    plt.close(fig)
    return {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "width": 420, "height": 300,
            "data": {"values": points}, "mark": {"type": "point", "filled": True},
            "encoding": {"x": {"field": "latency_ms", "type": "quantitative", "scale": {"type": "log"},
                               "title": "latency, batch 1 (ms)"},
                         "y": {"field": "score", "type": "quantitative", "scale": {"zero": False}},
                         "color": {"field": "precision", "type": "nominal"},
                         "shape": {"field": "model", "type": "nominal"},
                         "tooltip": [{"field": "cell"}, {"field": "model"}, {"field": "precision"}]}}
