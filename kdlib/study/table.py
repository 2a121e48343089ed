"""A study's table from its experiments' metrics: one row per cell over seeds.

Each experiment contributes its ``reports/summary.json`` (the report stage's, with
``models.<role>`` records) and ``reports/quantization.json``. For every cell: n seeds; mean ± std of
the teacher's, the baseline's and the distilled student's test score at the best and the last
epoch; the distilled student's paired difference from the baseline of the same seed
(:func:`~kdlib.study.stats.paired_difference`: mean, 95 % CI, paired t-test, Wilcoxon for n ≥ 6);
training time, ms per step and the parameters the method adds (timings: the fastest seed, see
``TIMES``); and each student's fidelity to
the teacher on the test split (top-1 agreement, mean KL(teacher ‖ student); Stanton et al.,
NeurIPS 2021).
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from kdlib.study.spec import Experiment, Study, _scalar
from kdlib.study.stats import paired_difference, spread

ROLES = ("teacher", "baseline", "distill")
# Timings are taken from the fastest seed: experiments of a study run beside each other (queue workers)
# and beside whatever else the machine does, which only ever slows a run down, so the minimum is the
# least disturbed measurement (as timeit reports). Memory, size and parameters take the median.
TIMES = ("train_seconds", "ms_per_step", "latency_b1_ms")


@dataclass(frozen=True)
class Record:
    """One finished experiment: which it is, and the metrics it wrote (``summary``: summary.json and
    costs.json together); ``source``: where it came from (the experiment's commit, the commit it ran on);
    ``digests``: what decided its result, ``{"params": …, "code": …}`` (:mod:`kdlib.study.provenance`),
    None for a record made before they were kept."""

    experiment: Experiment
    summary: Mapping[str, Any]
    quantization: Mapping[str, Any] | None = None
    source: Mapping[str, Any] | None = None
    digests: Mapping[str, str] | None = None


def _get(record: Record, role: str, *path: str) -> Any:
    """``summary.json``'s ``models.<role>.<path>``, else ``costs.json``'s ``costs.<role>.<path>``
    (the experiment's metrics files read together)."""
    models = record.summary.get("models", {}).get(role, {})
    node: Any = models if path[0] in models else record.summary.get("costs", {}).get(role, {})
    for key in path:
        node = node.get(key) if isinstance(node, Mapping) else None
    return node


def _values(records: Sequence[Record], role: str, *path: str) -> list[float]:
    return [float(v) for r in records if (v := _get(r, role, *path)) is not None]


def cell_row(study: Study, cell_records: Sequence[Record]) -> dict[str, Any]:
    """The statistics of one cell (``cell_records``: its finished experiments, sorted by seed)."""
    first = cell_records[0]
    score = first.summary.get("score", "top1")
    row: dict[str, Any] = {"cell": dict(first.experiment.cell.values), "n": len(cell_records),
                           "seeds": [r.experiment.seed for r in cell_records], "score": score,
                           "experiments": [r.experiment.name for r in cell_records]}
    for role in ROLES:
        row[f"{role}_preset"] = _get(first, role, "preset")
        for which in ("best", "last"):
            row[f"{role}_{which}"] = spread(_values(cell_records, role, which, score)).as_dict()
            if score == "top1":
                row[f"{role}_{which}_top5"] = spread(_values(cell_records, role, which, "top5")).as_dict()
        for key in ("teacher_agreement", "teacher_kl"):
            if role != "teacher":
                row[f"{role}_{key}"] = spread(_values(cell_records, role, "best", key)).as_dict()
        for key in ("train_seconds", "ms_per_step", "latency_b1_ms", "inference_mib", "params"):
            values = _values(cell_records, role, key)
            row[f"{role}_{key}"] = (min(values) if key in TIMES else float(np.median(values))) if values else None
        row[f"{role}_best_epoch"] = spread(_values(cell_records, role, "best_epoch")).as_dict()
        row[f"{role}_last_epoch"] = spread(_values(cell_records, role, "last_epoch")).as_dict()
    for which in ("best", "last"):
        row[f"gain_{which}"] = paired_difference(_values(cell_records, "distill", which, score),
                                                 _values(cell_records, "baseline", which, score)).as_dict()
    extra = [_get(r, "distill", "train_params") - _get(r, "baseline", "train_params") for r in cell_records
             if _get(r, "distill", "train_params") is not None and _get(r, "baseline", "train_params") is not None]
    row["extra_params"] = int(extra[0]) if extra else None
    row["per_seed"] = [{"seed": r.experiment.seed, "experiment": r.experiment.name,
                        **{f"{role}_{which}": _get(r, role, which, score) for role in ROLES for which in ("best", "last")},
                        **{f"{role}_{k}": _get(r, role, "best", k) for role in ("baseline", "distill")
                           for k in ("teacher_agreement", "teacher_kl")},
                        **{f"{role}_train_seconds": _get(r, role, "train_seconds") for role in ROLES}}
                       for r in cell_records]
    row.update(transfer_stats(cell_records, row["per_seed"]))
    if study.precisions:
        row["precisions"] = precision_rows(cell_records)
    return row


TRANSFER_COUNTS = ("errors", "absent_errors", "bias_shift", "corrected_errors", "corrected_absent_errors")


def transfer_stats(cell_records: Sequence[Record], per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """A cell whose student was distilled on a transfer set without some classes (:mod:`kdlib.transfer`):
    its best checkpoint's test errors overall and on the absent classes, before and after the bias
    shift, over seeds (and each seed's in ``per_seed``); {} for any other cell."""
    found = [_get(r, "distill", "best", "transfer") for r in cell_records]
    if not any(found):
        return {}
    first = next(t for t in found if t)
    # the transfer set as the experiments state it: DVC's metrics reader keeps numbers only, so the absent
    # classes' names (and bias_shift_from) in summary.json do not come back through it
    transfer_set = {k.removeprefix("distill.transfer."): v for k, v in cell_records[0].experiment.overrides.items()
                    if k.startswith("distill.transfer.") and not k.endswith(".bias_shift")}
    out: dict[str, Any] = {"distill_transfer_set": transfer_set,
                           "distill_transfer_images": first["images"],
                           "distill_transfer_absent_images": first["absent_images"]}
    for key in TRANSFER_COUNTS:
        values = [float(t[key]) for t in found if t and key in t]
        if values:
            out[f"distill_best_transfer_{key}"] = spread(values).as_dict()
    for seed_row, counts in zip(per_seed, found):
        if counts:
            seed_row["distill_best_transfer"] = dict(counts)
    return out


def precision_rows(cell_records: Sequence[Record]) -> list[dict[str, Any]]:
    """Per student role × precision over seeds: accuracy, latency, size (the quantize stage's rows),
    precisions in the order the experiments' ``eval.precisions`` asked for them (then by name): the
    order of a record's keys depends on whether it came from DVC or from ``records.json``."""
    out = []
    results = [(r, (r.quantization or {}).get("results", {})) for r in cell_records]
    roles = [role for role in ("baseline", "distill") if any(role in res for _, res in results)]
    asked = list(dict.fromkeys(p for r in cell_records for p in r.experiment.overrides.get("eval.precisions") or []))
    for role in roles:
        found = {p for _, res in results for p in res.get(role, {})}
        precisions = [p for p in asked if p in found] + sorted(found - set(asked))
        for precision in precisions:
            rows = [res[role][precision] for _, res in results if precision in res.get(role, {})]
            ok = [x for x in rows if x.get("status") == "ok"]
            score = "top1" if ok and "top1" in ok[0] else "mAP"
            out.append({"role": role, "precision": precision, "n": len(ok),
                        "status": "ok" if ok else rows[0].get("status"),
                        "reason": None if ok else rows[0].get("reason"),
                        "params": rows[0].get("params"),
                        "score": spread([x[score] for x in ok]).as_dict() if ok else None,
                        "latency_b1_ms": min(x["latency_b1_median_ms"] for x in ok) if ok else None,
                        "size_bytes": int(np.median([x["size_bytes"] for x in ok])) if ok else None,
                        "train_seconds": min(tr) if (tr := [v for r, _ in results if (
                            v := _get(r, role, "train_seconds")) is not None]) else None,
                        "last_epoch": spread(_values(cell_records, role, "last_epoch")).as_dict(),
                        "stopped_early": sum(bool(_get(r, role, "stopped_early")) for r in cell_records)})
    return out


def study_rows(study: Study, records: Sequence[Record]) -> list[dict[str, Any]]:
    """One row per cell with at least one finished experiment, in the study's cell order; with a
    ``reference``, each row's ``vs_reference`` (:func:`reference_difference`)."""
    by_cell: dict[str, list[Record]] = {}
    for r in records:
        by_cell.setdefault(r.experiment.cell.key, []).append(r)
    rows = []
    for cell in study.cells():
        mine = sorted(by_cell.get(cell.key, []), key=lambda r: r.experiment.seed)
        if mine:
            rows.append(cell_row(study, mine))
    if study.reference:
        for row in rows:
            row["vs_reference"] = reference_difference(study.reference, row, rows)
    return rows


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def reference_difference(reference: Mapping[str, Any], row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]
                         ) -> dict[str, Any] | None:
    """``row``'s distilled student against its reference cell's, paired by seed (the seeds both have): the
    mean difference of the best checkpoints' test scores, its 95 % CI and p. The reference cell has the
    ``reference`` values and ``row``'s values for its other axes; ``None`` where there is none (or the row is
    it)."""
    for other in rows:
        cell, mine = other["cell"], row["cell"]
        if all(k in cell and _same(cell[k], v) for k, v in reference.items()) and all(
                _same(cell[k], mine.get(k)) for k in cell if k not in reference):
            if other is row:
                return None
            theirs = {s["seed"]: s["distill_best"] for s in other["per_seed"]}
            pairs = [(s["distill_best"], theirs[s["seed"]]) for s in row["per_seed"] if s["seed"] in theirs]
            label = ", ".join(f"{k}={_scalar(v)}" for k, v in reference.items())
            return {"reference": label, **paired_difference([a for a, _ in pairs], [b for _, b in pairs]).as_dict()}
    return None


# ---- rendering -------------------------------------------------------------------------------

def _num(x: float | None, digits: int = 2, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _pm(s: Mapping[str, Any] | None, digits: int = 2) -> str:
    if not s or not s.get("n"):
        return "—"
    return _num(s["mean"], digits) if s["n"] == 1 else f"{_num(s['mean'], digits)} ± {_num(s['std'], digits)}"


def _p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "—"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _gain(g: Mapping[str, Any]) -> str:
    if not g["n"]:
        return "—"
    if g["n"] < 2:
        return _num(g["mean"], sign=True)
    return f"{_num(g['mean'], sign=True)} [{_num(g['ci95_low'], sign=True)}, {_num(g['ci95_high'], sign=True)}]"


def main_table(study: Study, rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The headline table: header and cells (markdown-ready strings)."""
    score = rows[0]["score"] if rows else "top1"
    axes = study.axes
    head = [*axes, "n", f"teacher {score}", f"baseline {score} best", f"KD {score} best", f"KD {score} last",
            "gain best [95% CI]", "p (t)", "p (W)", "gain last", "agreement KD / base (%)", "KL KD / base",
            "train s (KD)", "ms/step (KD / base)", "extra params"]
    speed = bool(getattr(study, "families", None))  # the teacher-zoo study compares models' cost too
    if speed:
        head += ["teacher: batch-1 ms / MiB", "KD student: batch-1 ms / MiB"]
    reference = getattr(study, "reference", None)
    if reference:
        name = "/".join(_scalar(v) for v in reference.values())
        head += [f"vs {name} best [95% CI]", f"p vs {name} (t)"]
    out = []
    for r in rows:
        gb, gl = r["gain_best"], r["gain_last"]
        out.append([*(_scalar(r["cell"].get(a)) if a in r["cell"] else "" for a in axes), str(r["n"]),
                    _pm(r["teacher_best"]), _pm(r["baseline_best"]), _pm(r["distill_best"]), _pm(r["distill_last"]),
                    _gain(gb), _p(gb["p_t"]), _p(gb["p_wilcoxon"]), _num(gl["mean"], sign=True),
                    f"{_pm(r['distill_teacher_agreement'])} / {_pm(r['baseline_teacher_agreement'])}",
                    f"{_pm(r['distill_teacher_kl'], 3)} / {_pm(r['baseline_teacher_kl'], 3)}",
                    _num(r["distill_train_seconds"], 1),
                    f"{_num(r['distill_ms_per_step'], 1)} / {_num(r['baseline_ms_per_step'], 1)}",
                    "—" if r["extra_params"] is None else f"{r['extra_params']:,}"])
        if speed:
            out[-1] += [f"{_num(r[f'{role}_latency_b1_ms'], 3)} / {_num(r[f'{role}_inference_mib'], 0)}"
                        for role in ("teacher", "distill")]
        if reference:
            vs = r.get("vs_reference")
            out[-1] += ["—", "—"] if not vs else [_gain(vs), _p(vs["p_t"])]
    return head, out


def pivot_table(study: Study, rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]] | None:
    """The paired gain (best epoch) laid out as the paper's grid: ``pivot.rows`` × ``pivot.columns``."""
    if not study.pivot:
        return None
    row_keys, col_key = list(study.pivot["rows"]), study.pivot["columns"]
    columns = list(dict.fromkeys(r["cell"].get(col_key) for r in rows))
    lines: dict[tuple, dict[Any, str]] = {}
    for r in rows:
        key = tuple(r["cell"].get(k) for k in row_keys)
        g = r["gain_best"]
        lines.setdefault(key, {})[r["cell"].get(col_key)] = (
            f"{_pm(r['distill_best'])} ({_num(g['mean'], sign=True)}, p {_p(g['p_t'])})")
    head = [*row_keys, *(f"{col_key}={_scalar(c)}" for c in columns)]
    return head, [[*map(_scalar, key), *(cells.get(c, "") for c in columns)] for key, cells in lines.items()]


def precision_table(rows: Sequence[Mapping[str, Any]], axes: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    head = [*axes, "model", "precision", "params", "test score", "latency b1 (ms)", "size (KiB)", "train s",
            "last epoch", "stopped early"]
    out = []
    for r in rows:
        for p in r.get("precisions", []):
            cells = [*(_scalar(r["cell"].get(a)) for a in axes), p["role"], p["precision"],
                     "—" if p["params"] is None else f"{p['params']:,}"]
            if p["status"] != "ok":
                out.append([*cells, f"{p['status']}: {p['reason'] or ''}"[:80], "", "", "", "", ""])
                continue
            out.append([*cells, _pm(p["score"]), _num(p["latency_b1_ms"], 3),
                        _num(p["size_bytes"] / 1024, 1), _num(p["train_seconds"], 1), _pm(p["last_epoch"], 1),
                        f"{p['stopped_early']}/{r['n']}"])
    return head, out


def markdown(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(head), line(["---"] * len(head)), *map(line, body)]) + "\n"


def csv_text(study: Study, rows: Sequence[Mapping[str, Any]]) -> str:
    """Every number of every row, flat (one column per statistic), for spreadsheets."""
    flat_rows = []
    for r in rows:
        flat: dict[str, Any] = {a: r["cell"].get(a) for a in study.axes}
        for key, value in r.items():
            if key in ("cell", "per_seed", "precisions", "experiments", "seeds"):
                continue
            if isinstance(value, Mapping):
                flat.update({f"{key}_{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        flat["seeds"] = " ".join(map(str, r["seeds"]))
        flat_rows.append(flat)
    columns = list(dict.fromkeys(k for f in flat_rows for k in f))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    for f in flat_rows:
        writer.writerow({k: _csv_value(f.get(k)) for k in columns})
    return buf.getvalue()


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(round(v, 6))
    return "" if v is None else v
