"""A study's figures, each as a PNG (matplotlib) and a Vega-Lite spec (for the offline HTML page)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PNG_METADATA = {"Software": None}  # no version string: the same rows give the same bytes


def gain_chart(rows: Sequence[Mapping[str, Any]], path: Path) -> dict[str, Any]:
    """Paired gain (best epoch) of every cell with its 95 % CI; returns the Vega-Lite spec."""
    labels = [", ".join(f"{k}={v}" for k, v in r["cell"].items()) or "(defaults)" for r in rows]
    gains = [r["gain_best"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    y = list(range(len(rows)))[::-1]
    means = [g["mean"] for g in gains]
    errs = [[max(g["mean"] - g["ci95_low"], 0) if g["n"] > 1 else 0 for g in gains],
            [max(g["ci95_high"] - g["mean"], 0) if g["n"] > 1 else 0 for g in gains]]
    ax.errorbar(means, y, xerr=errs, fmt="o", capsize=3)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel(f"distilled − baseline, test {rows[0]['score'] if rows else 'top1'} (pt), 95% CI")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=PNG_METADATA)
    plt.close(fig)
    values = [{"cell": label, "gain": g["mean"], "low": g["ci95_low"] if g["n"] > 1 else g["mean"],
               "high": g["ci95_high"] if g["n"] > 1 else g["mean"]} for label, g in zip(labels, gains)]
    return {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "width": 420,
            "data": {"values": values}, "layer": [
                {"mark": "rule", "encoding": {"y": {"field": "cell", "type": "nominal", "sort": None},
                                              "x": {"field": "low", "type": "quantitative",
                                                    "title": "gain over baseline (pt), 95% CI"},
                                              "x2": {"field": "high"}}},
                {"mark": {"type": "point", "filled": True},
                 "encoding": {"y": {"field": "cell", "type": "nominal", "sort": None},
                              "x": {"field": "gain", "type": "quantitative"}}}]}


def teacher_student_chart(rows: Sequence[Mapping[str, Any]], families: Mapping[str, str], path: Path) -> dict[str, Any]:
    """Distilled student score against teacher score, one point per cell, same/cross family marked."""
    points = [{"teacher": r["teacher_preset"], "student": r["distill_preset"],
               "teacher_score": r["teacher_best"]["mean"], "student_score": r["distill_best"]["mean"],
               "family": "same family" if families.get(r["teacher_preset"]) == families.get(r["distill_preset"])
               else "cross family"} for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    students = sorted({p["student"] for p in points})
    for i, student in enumerate(students):
        for fam, marker in (("same family", "o"), ("cross family", "^")):
            sel = [p for p in points if p["student"] == student and p["family"] == fam]
            if sel:
                ax.scatter([p["teacher_score"] for p in sel], [p["student_score"] for p in sel], marker=marker,
                           color=f"C{i}", label=f"{student}, {fam}")
                for p in sel:
                    ax.annotate(p["teacher"], (p["teacher_score"], p["student_score"]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
    score = rows[0]["score"] if rows else "top1"
    ax.set_xlabel(f"teacher test {score} (%)")
    ax.set_ylabel(f"distilled student test {score} (%)")
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
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, precision in enumerate(sorted({p["precision"] for p in points})):
        sel = [p for p in points if p["precision"] == precision]
        ax.scatter([p["latency_ms"] for p in sel], [p["score"] for p in sel], color=f"C{i}", label=precision)
    ax.set_xscale("log")
    ax.set_xlabel("latency, batch 1 (ms): median of the timed runs, fastest seed")
    ax.set_ylabel("test score (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
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
