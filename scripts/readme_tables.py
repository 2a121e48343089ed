"""README.md's tables of measured figures, generated from the JSON in reports/ that holds them.

    python scripts/readme_tables.py            # rewrite every generated block of README.md in place
    python scripts/readme_tables.py --check    # rewrite nothing; exit 1 with a diff when a block differs

README.md holds each generated block between

    <!-- generated: NAME from reports/... (python scripts/readme_tables.py) -->
    <!-- end generated: NAME -->

and NAME is one of the generators registered below (``--list`` names them and their sources). A
generator is a function ``(repo_root, reports=None) -> str`` that reads only JSON files under
``reports`` (default ``repo_root/reports``) and returns Markdown: a table, then optionally a paragraph
of the headline figures that README quotes next to it. A block's lines are indented like its start
marker (blocks inside a list item), and paragraphs are wrapped to README's line length.

``--check`` exits 1 naming every block whose text differs from what its JSON gives (with a unified
diff), every generator without a block and every marker without a generator; a source file that does
not exist stops either mode with exit 2, naming it. ``--reports DIR`` and ``--readme PATH`` point the
script elsewhere (the tests use them on copies); ``--skip NAME`` leaves a block as it is.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
COMMAND = "python scripts/readme_tables.py"
WIDTH = 105  # README's paragraphs are wrapped at about this many columns
START = re.compile(r"^(?P<indent>[ \t]*)<!-- generated: (?P<name>\S+) from (?P<sources>.+?) "
                   r"\((?P<command>[^()]*)\) -->\s*$")
END = re.compile(r"^[ \t]*<!-- end generated: (?P<name>\S+) -->\s*$")
ROLES = ("teacher", "baseline", "distill")

sys.path.insert(0, str(REPO))
from kdlib.quantize.figures import delta_cell, table_notes  # noqa: E402 (kdlib: the results table's own marks)


class SourceMissing(Exception):
    """A generator's JSON file does not exist; the message names it."""


@dataclass(frozen=True)
class Generator:
    name: str
    sources: tuple[str, ...]  # paths under the reports folder
    build: Callable[..., str]
    pending: bool  # its source is rewritten by the pipeline's run (README's text may wait for it)

    def marker(self) -> str:
        sources = ", ".join(f"reports/{s}" for s in self.sources)
        return f"<!-- generated: {self.name} from {sources} ({COMMAND}) -->"

    def missing(self, reports: Path) -> list[str]:
        return [f"reports/{s}" for s in self.sources if not (reports / s).is_file()]


GENERATORS: dict[str, Generator] = {}


def generator(name: str, *sources: str, pending: bool = False) -> Callable[[Callable[..., str]], Callable[..., str]]:
    def register(fn: Callable[..., str]) -> Callable[..., str]:
        GENERATORS[name] = Generator(name, sources, fn, pending)
        return fn
    return register


def _reports(repo_root: Path, reports: Path | None) -> Path:
    return Path(reports) if reports is not None else Path(repo_root) / "reports"


def _json(reports: Path, source: str) -> Any:
    path = reports / source
    if not path.is_file():
        raise SourceMissing(f"missing source file reports/{source} ({path})")
    return json.loads(path.read_text())


# --- formatting ------------------------------------------------------------------------------------

WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine",
         10: "ten"}


def _minus(text: str) -> str:
    return text.replace("-", "−")


def _f(x: float, digits: int = 2) -> str:
    return _minus(f"{x:.{digits}f}")


def _signed(x: float, digits: int = 2) -> str:
    return _minus(f"{x:+.{digits}f}")


def _pm(mean: float, std: float, signed: bool = False) -> str:
    return f"{_signed(mean) if signed else _f(mean)} ± {std:.2f}"


def _bytes(n: float, kib_digits: int = 1) -> str:
    """KiB below 1 MiB (``kib_digits`` decimals), else MiB with one decimal."""
    if n < 1024:
        return f"{n:.0f} B"
    if n < 1024 ** 2:
        return f"{n / 1024:.{kib_digits}f} KiB"
    if n < 1024 ** 3:
        return f"{n / 1024 ** 2:.1f} MiB"
    return f"{n / 1024 ** 3:.1f} GiB"


def _and(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _count(n: int) -> str:
    return WORDS.get(n, str(n))


def _range(values: Iterable[float], digits: int) -> str:
    values = list(values)
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return low if low == high else f"{low}–{high}"


def _stdev(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _bold(text: str, on: bool) -> str:
    return f"**{text}**" if on else text


def _table(header: Sequence[str], align: Sequence[str], rows: Iterable[Sequence[str]], tight: bool = False) \
        -> list[str]:
    """Markdown table lines; an empty cell is ``|  |``, or ``| |`` with ``tight`` (as README writes each)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for row in rows:
        line = "| " + " | ".join(row) + " |"
        while tight and "|  |" in line:
            line = line.replace("|  |", "| |")
        lines.append(line)
    return lines


def _markdown(table: Sequence[str], *paragraphs: str) -> str:
    """A table, then each paragraph (one line each here; wrapping happens when the block is written)."""
    return "\n\n".join(["\n".join(table), *[p for p in paragraphs if p]]) + "\n"


# --- generators, in README's order -------------------------------------------------------------------


@generator("models", *(f"evaluate/{role}.json" for role in ROLES), pending=True)
def models(repo_root: Path, reports: Path | None = None) -> str:
    """The default run's models table (what ``reports/results.md`` shows): one evaluate JSON per role."""
    from kdlib.report import results_table  # the pipeline's own formatting of this table

    folder = _reports(repo_root, reports)
    rows = [{"role": role, **_json(folder, f"evaluate/{role}.json")} for role in ROLES]
    columns = ("top1", "top5") if "top1" in rows[0]["best"] else ("mAP", "CF1", "OF1")
    return results_table(rows, columns)


@generator("default_run_kd", "bench/kd_cache.json")
def default_run_kd(repo_root: Path, reports: Path | None = None) -> str:
    """The sentence under the models table: the KD gain over the kd_cache benchmark's seeds."""
    d = _json(_reports(repo_root, reports), "bench/kd_cache.json")
    base, cached, online = d["top1_baseline"], d["top1_cached"], d["top1_online"]
    gain = statistics.mean(c - b for c, b in zip(cached, base))
    gaps = d["cached_minus_online_top1"]
    same = ("the same with the teacher online or cached" if all(abs(g) < 0.005 for g in gaps) else
            f"within {max(abs(g) for g in gaps):.2f} pt with the teacher online or cached")
    return (f"Over {_count(len(d['seeds']))} seeds (`bench/kd_cache.py`) KD adds **{_signed(gain)} pt** "
            f"({_pm(statistics.mean(base), _stdev(base))} → {_pm(statistics.mean(cached), _stdev(cached))}), "
            f"{same}, and the cached student trains at {d['cached_vs_baseline']:.2f}× the baseline's epoch time.\n")


DEFAULT_BACKENDS = {"fp32": "PyTorch eager", "bf16": "PyTorch eager", "fp16": "PyTorch eager",
                    "int8_dynamic": "torchao `quantize_` (Linear only)",
                    "int8_static": "torchao PT2E + X86InductorQuantizer, Inductor",
                    "fp8": "PyTorch eager, dequantized at compute", "onnx_int8": "ONNX Runtime, QDQ static"}
TEACHER_PRECISIONS = ("fp32", "int8_static", "onnx_fp32", "onnx_int8")  # the student shows every precision


def _backend(precision: str, row: Mapping[str, Any]) -> str:
    if precision == "onnx_fp32":
        version = re.search(r"onnxruntime ([0-9.]+)", row.get("backend", ""))
        return "ONNX Runtime" + (f" {version.group(1)}" if version else "")
    return DEFAULT_BACKENDS.get(precision, row.get("backend", ""))


STUDIES_IN_README = ("kd_gain", "methods", "teacher_zoo", "rescnn_precisions", "ls_kd")  # studies whose reports/studies/<name>/summary.json README quotes


def _study(name: str) -> Callable[..., str]:
    def build(repo_root: Path, reports: Path | None = None) -> str:
        """``python -m stages.study report NAME``'s main table, from its summary.json."""
        from types import SimpleNamespace

        from kdlib.study.table import main_table

        d = _json(_reports(repo_root, reports), f"studies/{name}/summary.json")
        head, body = main_table(SimpleNamespace(axes=d["axes"], families=d.get("claims")), d["rows"])
        n = sum(r["n"] for r in d["rows"])
        text = (f"{_count(n).capitalize()} experiments, seeds {_and([str(x) for x in d['seeds']])}"
                + (f"; {_count(len(d['missing']))} not finished" if d["missing"] else "") + ".")
        claims = [f"{c['question']} {c['answer']}." for c in d.get("claims", [])]
        return _markdown(_table(head, ["---"] * len(d["axes"]) + ["---:"] * (len(head) - len(d["axes"])), body),
                         text, *claims)
    return build


for _name in STUDIES_IN_README:
    generator(f"study_{_name}", f"studies/{_name}/summary.json")(_study(_name))


# Hinton, Vinyals & Dean 2015, §3: test errors out of MNIST's 10,000 (the transfer sets as the paper gives them)
HINTON_PAPER = {"teacher": "67", "student": "146", "distilled": "74", "no3": "206 (133 on 3s)",
                "no3_fixed": "109 (14 on 3s)", "only78": "47.3 %", "only78_fixed": "13.2 %"}


def _errors(row: Mapping[str, Any], key: str, images: int = 10000) -> tuple[float, float]:
    """Mean and std over seeds of the test errors of ``row[key]`` (a top-1 % spread): (100 − top-1) × N / 100."""
    spread_ = row[key]
    return (100.0 - spread_["mean"]) * images / 100.0, (spread_.get("std") or 0.0) * images / 100.0


def _count_pm(mean: float, std: float, n: int) -> str:
    return f"{mean:,.1f} ± {std:.1f}" if n > 1 else f"{mean:,.0f}"


@generator("hinton2015", "studies/hinton2015/summary.json")
def hinton2015(repo_root: Path, reports: Path | None = None) -> str:
    """The ``hinton2015`` study beside §3 of Hinton, Vinyals & Dean (2015): test errors out of 10,000 of the
    best (validation-selected) checkpoints, mean ± std over seeds."""
    d = _json(_reports(repo_root, reports), "studies/hinton2015/summary.json")
    rows = d["rows"]

    def cell(**wanted: Any) -> dict[str, Any] | None:
        for r in rows:
            values = r["cell"]
            transfer = any(k.startswith("distill.transfer") for k in values)
            if all(values.get(k) == v for k, v in wanted.items()) and transfer == any(
                    k.startswith("distill.transfer") for k in wanted):
                return r
        return None

    body: list[list[str]] = []
    main = cell(student="hinton_student", **{"distill.kd.temperature": 20.0})
    if main is not None:
        n = main["n"]
        body.append(["784-1200-1200-10 teacher (dropout, max-norm, ±2 px jitter)", HINTON_PAPER["teacher"],
                     _count_pm(*_errors(main, "teacher_best"), 1)])
        body.append(["784-800-800-10 student alone", HINTON_PAPER["student"],
                     _count_pm(*_errors(main, "baseline_best"), n)])
        body.append(["the same student distilled, T = 20", HINTON_PAPER["distilled"],
                     _count_pm(*_errors(main, "distill_best"), n)])
    for student, label, temperatures in (("hinton_student", "800-800", (2.0, 4.0, 8.0)),
                                         ("hinton_student30", "30-30", (1.0, 2.5, 4.0, 8.0, 20.0))):
        if student == "hinton_student30" and (r := cell(student=student, **{"distill.kd.temperature": 1.0})):
            body.append([f"{label} student alone", "—", _count_pm(*_errors(r, "baseline_best"), r["n"])])
        for t in temperatures:
            r = cell(student=student, **{"distill.kd.temperature": t})
            if r is not None:
                paper = ("T > 8 all similar (300+ units)" if label == "800-800" else
                         "T 2.5–4 clearly best (30 units)") if t == temperatures[0] else ""
                body.append([f"{label} distilled, T = {t:g}", paper, _count_pm(*_errors(r, "distill_best"), r["n"])])
    for key, label, shifts in (("distill.transfer.exclude_classes", "no 3 in the transfer set", (3.5, "val")),
                               ("distill.transfer.only_classes", "only 7s and 8s in the transfer set", (7.6, "val"))):
        for shift in shifts:
            r = next((x for x in rows if key in x["cell"] and x["cell"].get("distill.transfer.bias_shift") == shift), None)
            if r is None or "distill_best_transfer_errors" not in r:
                continue
            n, images = r["n"], r["distill_transfer_images"]
            absent = r["distill_transfer_absent_images"]

            def shown(errors: str, on_absent: str) -> str:
                e = r[f"distill_best_transfer_{errors}"]
                if key.endswith("only_classes"):  # the paper gives an error rate here
                    return f"{100 * e['mean'] / images:.1f} % ± {100 * (e.get('std') or 0) / images:.1f}"
                a = r[f"distill_best_transfer_{on_absent}"]
                return f"{_count_pm(e['mean'], e.get('std') or 0, n)} ({a['mean']:.1f} of {absent:,} on 3s)"
            if shift == shifts[0]:
                body.append([label, HINTON_PAPER["no3" if "exclude" in key else "only78"], shown("errors", "absent_errors")])
            s = r["distill_best_transfer_bias_shift"]
            chosen = _minus(f"{s['mean']:.1f}")
            what = (f"bias of the absent classes +{shift:g} (the paper's)" if shift != "val" else
                    f"bias shift chosen on validation (s = {chosen} ± {s.get('std') or 0:.1f})")
            paper = HINTON_PAPER[("no3" if "exclude" in key else "only78") + "_fixed"] if shift != "val" else "—"
            body.append([f"  … {what}", paper, shown("corrected_errors", "corrected_absent_errors")])
    seeds = ", ".join(str(s) for s in d["seeds"])
    text = (f"Test errors out of 10,000 (best checkpoint by validation; mean ± std over seeds {seeds}; one teacher). "
            f"{_count(sum(r['n'] for r in rows)).capitalize()} experiments"
            + (f", {_count(len(d['missing']))} not finished" if d["missing"] else "") + ".")
    return _markdown(_table(["", "paper", "kdlib"], ["---", "---:", "---:"], body), text)


@generator("quantization", "quantization.json", pending=True)
def quantization(repo_root: Path, reports: Path | None = None) -> str:
    """The default run's quantized evaluation: every KD-student precision and the teacher's main ones."""
    d = _json(_reports(repo_root, reports), "quantization.json")
    score = d.get("settings", {}).get("score", "top1")
    results = d["results"]
    rows, flagged = [], []
    for model, label, precisions in (("distill", "KD student", list(results.get("distill", {}))),
                                     ("teacher", "teacher", TEACHER_PRECISIONS)):
        for precision in precisions:
            r = results.get(model, {}).get(precision)
            if r is None:
                continue
            name = "fp8 (weights)" if precision == "fp8" else precision
            if r.get("status") != "ok":
                # the reason's first clause; the whole of it is in reports/quantization.json
                rows.append([label, name, f"{r.get('status')}: {r.get('reason', '').split(':')[0]}", "", "", "", "", "",
                             ""])
                continue
            # ¹: a .pt2 archive (graph + weights) larger than the fp32 checkpoint
            mark = "¹" if r.get("artifact") == ".pt2" and r.get("size_ratio", 1.0) < 1 else ""
            # a loss beyond the margin and a noisy latency are marked as results.md marks them
            delta = "" if precision == "fp32" else _minus(delta_cell(r, score))
            latency = f"{r['latency_b1_median_ms']:.3f}"
            if r.get("latency_b1_noisy"):
                latency = f"⚠ {latency} (noisy: p90/median {r['latency_b1_spread']:.1f}×)"
            rows.append([label, name, _backend(precision, r), _f(r[score]), delta, latency,
                         f"{r['throughput_img_s']:,.0f}", _bytes(r["size_bytes"]) + mark, f"{r['inference_mib']:.0f} MiB"])
            flagged.append({**r, "model": label, "precision": precision})
    label = {"top1": "top-1"}.get(score, score)
    table = _table(["model", "precision", "backend", f"test {label}", "Δ", "batch 1 (ms)",
                    f"batch {d.get('settings', {}).get('throughput_batch', 64)} (img/s)", "size", "model memory²"],
                   ["---"] * 3 + ["---:"] * 6, rows)
    teacher = results.get("teacher", {})
    text = ""
    if teacher.get("fp8", {}).get("status") == "ok" and teacher.get("fp32", {}).get("status") == "ok":
        text = (f"fp8 weights are dequantized at compute: at batch 1 ResNet-18 takes "
                f"{teacher['fp8']['latency_b1_median_ms']:.1f} ms per image in fp8 against "
                f"{teacher['fp32']['latency_b1_median_ms']:.1f} ms in fp32.")
    notes = [line for line in table_notes(flagged, score).splitlines() if line.strip()]
    return _markdown(table, text, *notes)


PIPELINE_TARGETS = {"total": 300.0, "teacher": 97.0, "noop": 2.0}  # bench/pipeline.py's targets
PIPELINE_GROUPS = ("evaluate", "quantize")  # one stage per model


@generator("pipeline", "bench/pipeline.json")
def pipeline(repo_root: Path, reports: Path | None = None) -> str:
    """``bench/pipeline.py``: seconds per stage of the default repro and of the method experiment
    on top of it, the totals, the no-op repro, the accuracies and the targets."""
    d = _json(_reports(repo_root, reports), "bench/pipeline.json")
    seconds, exp = d["stage_seconds"], d["method_experiment_stage_seconds"]
    method = d["method_experiment"]["set"][0]
    rows = [[f"`{s}`", f"{seconds[s]:.1f} s", f"{exp[s]:.1f} s" if s in exp else "—"] for s in d["stages"]]
    rows.append(["**total**", f"**{d['total_seconds']:.0f} s**", f"**{d['method_experiment_seconds']:.0f} s**"])
    rows.append(["no-op repro", f"{d['noop_repro_seconds']:.2f} s", ""])
    table = _table(["stage", "default `dvc repro`", f"then `dvc exp run -S {method}`"], ["---", "---:", "---:"], rows,
                   tight=True)
    # the same experiment when evaluate and quantize were one stage over every model: it re-ran the
    # unchanged teacher's and baseline's measurements too
    one_stage = d["method_experiment_seconds"] + sum(
        seconds[s] for s in d["stages"] if s.split("@")[0] in PIPELINE_GROUPS and s not in exp)
    ev = d["evaluate"]
    score = "top1" if "kd_gain_top1" in ev else "mAP"
    t, b, k = (ev[role]["best"][score] for role in ROLES)
    unit = " %" if score == "top1" else ""
    total, noop, exp_s = d["total_seconds"], d["noop_repro_seconds"], d["method_experiment_seconds"]
    verdicts = [
        f"default run {total:.0f} s: target ≤ {PIPELINE_TARGETS['total']:.0f} s "
        + ("met" if total <= PIPELINE_TARGETS["total"] else "**not met**"),
        f"method experiment {exp_s:.0f} s against {one_stage:.0f} s with one evaluate and one quantize stage over all "
        f"models ({exp_s / one_stage:.2f}×): target ≤ 0.5× " + ("met" if exp_s <= one_stage / 2 else "**not met**"),
        f"teacher ≥ {PIPELINE_TARGETS['teacher']:.0f} % " + ("met" if d["teacher_top1"] >= PIPELINE_TARGETS["teacher"]
                                                           else "**not met**"),
        f"no-op repro < {PIPELINE_TARGETS['noop']:.0f} s " + ("met" if noop < PIPELINE_TARGETS["noop"] else "**not met**"),
    ]
    text = (f"Teacher {_f(t)}{unit}, baseline {_f(b)}{unit}, KD {_f(k)}{unit} ({_signed(ev[f'kd_gain_{score}'])}); "
            f"the {method.split('=')[-1]} student {_f(d['method_experiment']['summary']['distill']['best'])}{unit}. "
            + "; ".join(verdicts).capitalize() + ".")
    return _markdown(table, text)


@generator("kd_cache", "bench/kd_cache.json")
def kd_cache(repo_root: Path, reports: Path | None = None) -> str:
    """``bench/kd_cache.py``: epoch time and test top-1 of the baseline and of KD online and cached."""
    d = _json(_reports(repo_root, reports), "bench/kd_cache.json")
    variants = (("baseline", "baseline"), ("KD, teacher online", "online"), ("KD, teacher cache", "cached"))
    rows = []
    for label, key in variants:
        top1 = d[f"top1_{key}"]
        ratio = d[f"epoch_s_{key}"] / d["epoch_s_baseline"]
        ratio_text = f"**{ratio:.2f}×**" if key == "cached" else f"{ratio:.2f}×"
        rows.append([label, f"{d[f'epoch_s_{key}']:.2f} s", ratio_text, _pm(statistics.mean(top1), _stdev(top1))])
    table = _table(["variant", "epoch (median)", "vs baseline", f"test top-1 ({len(d['seeds'])} seeds)"],
                   ["---", "---:", "---:", "---:"], rows)
    gains = [c - b for c, b in zip(d["top1_cached"], d["top1_baseline"])]
    text = (f"Per seed, cached − online top-1 = {', '.join(_signed(g) for g in d['cached_minus_online_top1'])} "
            f"(identical views; the teacher runs in float32 either way), KD − baseline = "
            f"{', '.join(_signed(g) for g in gains)}. The cache (30 views × 1,000 images, exact logits) takes "
            f"{d['cache_bytes'] / 2 ** 20:.1f} MiB and {d['cache_build_seconds']:.1f} s to build — the teacher "
            "forwards of one online run, paid once and reused by every sweep over the student's recipe or the "
            "method's knobs.")
    return _markdown(table, text)


QUANT_BENCH_ROWS = (  # (model, precision, label): README's selection and names
    ("distill", "fp32", "fp32 eager"), ("distill", "fp32_channels_last", "fp32 channels_last"),
    ("distill", "onnx_fp32", "ONNX Runtime fp32"), ("distill", "int8_static", "int8_static (PT2E, Inductor)"),
    ("distill", "onnx_int8", "ONNX Runtime int8 (QDQ)"), ("distill", "fp8", "fp8 weights"),
    ("teacher", "fp32", "fp32 eager"), ("teacher", "onnx_fp32", "ONNX Runtime fp32"),
    ("teacher", "int8_static", "int8_static"), ("teacher", "onnx_int8", "ONNX Runtime int8"))
MODEL_LABELS = {"distill": "KD student", "teacher": "teacher", "baseline": "baseline"}
FP32_PATHS = ("fp32", "fp32_channels_last", "onnx_fp32")
CONVERTED = ("onnx_fp32", "onnx_int8", "int8_static")  # ¹: the model memory includes the converter
PATH_NAMES = {"onnx_int8": "ONNX Runtime QDQ", "onnx_fp32": "ONNX Runtime", "int8_static": "PyTorch's int8_static",
              "fp32": "eager fp32", "fp32_channels_last": "channels_last fp32"}
B64_NAMES = {"onnx_fp32": "ONNX fp32", "onnx_int8": "ONNX int8", "int8_static": "PyTorch's int8_static",
             "fp32": "eager fp32", "fp32_channels_last": "channels_last fp32"}
BEST_NAMES = {"onnx_fp32": "ONNX fp32", "onnx_int8": "ONNX int8", "int8_static": "int8_static", "fp32": "eager fp32",
              "fp32_channels_last": "channels_last fp32", "fp8": "fp8"}


def _bench_rows(d: Mapping[str, Any]) -> dict[tuple[str, str], Mapping[str, Any]]:
    return {(r["model"], r["precision"]): r for r in d["rows"] if r.get("status") == "ok"}


@generator("quantization_bench", "bench/quantization.json")
def quantization_bench(repo_root: Path, reports: Path | None = None) -> str:
    """``bench/quantization.py``: student precisions against the best fp32 path, KD student against teacher."""
    d = _json(_reports(repo_root, reports), "bench/quantization.json")
    by = _bench_rows(d)
    student = [r for (m, _), r in by.items() if m == "distill"]
    fastest_b1 = min(student, key=lambda r: r["latency_b1_median_ms"], default=None)
    fastest_b64 = max(student, key=lambda r: r["throughput_img_s"], default=None)
    smallest_int8 = min((r for r in student if "int8" in r["precision"]), key=lambda r: r["size_bytes"], default=None)
    rows = []
    for model, precision, label in QUANT_BENCH_ROWS:
        r = by.get((model, precision))
        if r is None:
            continue

        b1 = _bold(f"{r['latency_b1_median_ms']:.3f}", r is fastest_b1)
        rows.append([MODEL_LABELS[model], label, _f(r["top1"]),
                     "" if precision in FP32_PATHS else _signed(r.get("delta_top1", 0.0)),
                     f"{b1} / {r['latency_b1_p95_ms']:.3f}",
                     _bold(f"{1000 / r['throughput_img_s']:.3f}", r is fastest_b64),
                     _bold(_bytes(r["size_bytes"]), r is smallest_int8),
                     f"{r['inference_mib']:.0f} MiB" + ("¹" if precision in CONVERTED else "")])
    table = _table(["model", "precision", "test top-1", "Δ", "batch 1 median / p95 (ms)", "batch 64 (ms/img)", "size",
                    "model memory"], ["---", "---"] + ["---:"] * 6, rows, tight=True)
    s = d["summary"]
    parts = [f"Load average before the run: {d['load_average_before']:.2f}."]
    q = s.get("int8_vs_best_fp32")
    if q:
        b64 = {p: 1000 / by[("distill", p)]["throughput_img_s"] for p in (q["int8_path_b64"], q["fp32_path_b64"])}
        parts.append(
            f"**int8 target {'met' if q['target_met'] else 'not met'}.** The fastest int8 student "
            f"({PATH_NAMES.get(q['int8_path'], q['int8_path'])}) is {q['speedup_b1']:.2f}× the fastest fp32 one "
            f"({PATH_NAMES.get(q['fp32_path'], q['fp32_path'])}) at batch 1, loses {q['top1_loss_pt']:.2f} pt and is "
            f"{q['size_ratio']:.2f}× smaller; at batch 64 {B64_NAMES.get(q['int8_path_b64'], q['int8_path_b64'])} is "
            f"{q['speedup_b64']:.2f}× faster than {B64_NAMES.get(q['fp32_path_b64'], q['fp32_path_b64'])} "
            f"({b64[q['int8_path_b64']]:.3f} vs {b64[q['fp32_path_b64']]:.3f} ms/image).")
    v = s.get("kd_student_vs_teacher")
    if v:
        best = {m: min((r for (mm, _), r in by.items() if mm == m), key=lambda r: r["latency_b1_median_ms"])
                ["precision"] for m in ("distill", "teacher")}
        parts.append(
            f"**KD student vs teacher** (fp32 eager): {v['speedup_b1_fp32']:.1f}× faster at batch 1, "
            f"{v['speedup_b64_fp32']:.1f}× at batch 64, {v['inference_mib_teacher']:.0f} → "
            f"{v['inference_mib_student']:.0f} MiB of model memory "
            f"({v['inference_mib_teacher'] / v['inference_mib_student']:.1f}× less), {v['size_ratio']:.0f}× smaller, "
            f"{v['params_ratio']:.0f}× fewer parameters, {_signed(v['top1_student'] - v['top1_teacher'])} pt; "
            f"best path against best path ({BEST_NAMES.get(best['distill'], best['distill'])} student vs "
            f"{BEST_NAMES.get(best['teacher'], best['teacher'])} teacher) "
            f"{v['speedup_b1_best_vs_best']:.1f}× at batch 1.")
    return _markdown(table, " ".join(parts))


PROFILE_ROWS = (("onnx_fp32", "fp32 (NCHWc, ReLU fused)"), ("onnx_int8", "int8 (QLinearConv, NHWC)"))
CONV_OPS = ("Conv", "QLinearConv")
CONV_LABELS = {"cnn_small": ("conv1 (1→32)", "conv2 (32→64)", "conv3 (64→64)")}
LAYOUT_OPS = ("QuantizeLinear", "DequantizeLinear", "Transpose")


@generator("onnx_profile", "bench/quantization.json")
def onnx_profile(repo_root: Path, reports: Path | None = None) -> str:
    """``bench/quantization.py``'s per-node ONNX Runtime profile of the KD student at batch 1."""
    d = _json(_reports(repo_root, reports), "bench/quantization.json")
    profile = d["summary"]["onnx_profile_b1"]
    student = _bench_rows(d).get(("distill", "fp32"), {})
    convs = {p: [n["median_us"] for n in profile[p]["nodes"] if n["op"] in CONV_OPS] for p, _ in PROFILE_ROWS}
    n_convs = max(len(c) for c in convs.values())
    labels = CONV_LABELS.get(student.get("arch", ""), ())
    labels = labels if len(labels) == n_convs else tuple(f"conv{i + 1}" for i in range(n_convs))
    rows = []
    for precision, label in PROFILE_ROWS:
        p, c = profile[precision], convs[precision]
        rows.append([label, *(f"{us:.0f} µs" for us in c), *([""] * (n_convs - len(c))),
                     f"{p['kernel_sum_us'] - sum(c):.0f} µs", str(len(p["nodes"])), f"{p['kernel_sum_us']:.0f} µs",
                     f"{p['run_median_us']:.0f} µs"])
    table = _table(["ONNX Runtime", *labels, "other nodes", "nodes", "kernels", "run"],
                   ["---"] + ["---:"] * (n_convs + 4), rows)
    fp32, int8 = convs["onnx_fp32"], convs["onnx_int8"]
    extra = len(profile["onnx_int8"]["nodes"]) - len(profile["onnx_fp32"]["nodes"])
    layout = [n["median_us"] for n in profile["onnx_int8"]["nodes"] if n["op"] in LAYOUT_OPS]
    text = ""
    if len(fp32) == len(int8) >= 2 and layout:
        text = (f"int8 speeds up the {_count(len(fp32) - 1)} real convolutions {sum(fp32[1:]) / sum(int8[1:]):.2f}× "
                f"but the first one, with a single input channel, is {int8[0] / fp32[0]:.1f}× slower in int8, and the "
                f"int8 graph has {_count(extra)} more nodes (Quantize/Dequantize at both ends, two NCHW↔NHWC "
                f"transposes) at ~{statistics.mean(layout):.0f} µs each.")
        if student.get("macs"):
            text += (f" At {student['macs'] / 1e6:.2f} MMACs per image the call is bound by per-node overhead, not by "
                     "arithmetic.")
    return _markdown(table, text)


THROUGHPUT_TARGET = 0.85  # bench/throughput.py: loop >= 85 % of in-memory for every stage


@generator("throughput", "bench/throughput.json")
def throughput(repo_root: Path, reports: Path | None = None) -> str:
    """``bench/throughput.py``: training images/s of each stage's loop against in-memory tensors."""
    d = _json(_reports(repo_root, reports), "bench/throughput.json")
    rows = []
    for s in d["stages"]:
        precision = "fp32" if s["precision"] in ("none", "fp32", None) else s["precision"]
        settings = precision + (" + channels_last" if s.get("channels_last") else "")
        rows.append([s["stage"], settings, f"{s['train_loop_img_s']:,.0f}", f"{s['in_memory_img_s']:,.0f}",
                     f"{100 * s['ratio']:.0f} %", f"{s['speedup_vs_fp32']:.2f}×"])
    table = _table(["stage", "settings", "loop img/s", "in-memory img/s", "loop / in-memory", "in-memory vs fp32"],
                   ["---", "---"] + ["---:"] * 4, rows)
    lowest = min(d["stages"], key=lambda s: s["ratio"])
    verdict = "met" if all(s["ratio"] >= THROUGHPUT_TARGET for s in d["stages"]) else "not met"
    text = (f"{d['epochs']} epochs per stage. Target {verdict}: the lowest loop / in-memory ratio is "
            f"{100 * lowest['ratio']:.0f} % ({lowest['stage']}), against {100 * THROUGHPUT_TARGET:.0f} %.")
    return _markdown(table, text)


@generator("loader", "bench/loader.json")
def loader(repo_root: Path, reports: Path | None = None) -> str:
    """``bench/loader.py``: the JPEG path on 500×375 photographs: decoding, the pixel cache, data wait."""
    d = _json(_reports(repo_root, reports), "bench/loader.json")
    rates, per_core = d["images_per_second"], d["images_per_second_per_core"]
    rows = [[k, f"{rates[k] / per_core[k]:.0f}", f"{rates[k]:,.0f}", f"{per_core[k]:,.0f}"] for k in rates]
    if not d["gpu"]:
        rows.append(["GPU nvJPEG batch decode + crop/flip", "–", "no CUDA device", "–"])
    table = _table(["path", "processes", "images/s", "images/s per core"], ["---"] + ["---:"] * 3, rows)
    reduced = ", ".join(f"{n} px {r['speedup']:.2f}× (scale 1/{r['scale']})" for n, r in d["reduced_decode"].items())
    s = d["student"]
    text = (f"{d['images']} JPEGs {d['image_size'][0]}×{d['image_size'][1]}, {d['cores']} cores (load average "
            f"{d['load_average'][0]:.1f} during the run), fastest of {d['repeats']} runs. Reduced / full decode: {reduced}. "
            f"The 256-px cache is {d['cache_mib_per_image']:.2f} MiB per image (page cache, shared) against "
            f"{d['full_size_mib_per_image']:.2f} MiB at full size; reading from it is "
            f"{d['cache_speedup_2_workers']:.1f}× decoding every epoch (2 workers). ResNet-18 at {s['input']} px, "
            f"batch {s['batch_size']}: step {s['step_s']:.2f} s, data wait {100 * s['wait_over_step']:.1f} % of it.")
    return _markdown(table, text)


@generator("scale", "bench/scale.json")
def scale(repo_root: Path, reports: Path | None = None) -> str:
    """``bench/scale.py``: one process against two with the same global batch."""
    d = _json(_reports(repo_root, reports), "bench/scale.json")
    names = {"deit": "1-block DeiT (no batch statistics)", "cnn_small": "cnn_small (BatchNorm)"}
    rows = [[names.get(c["preset"], c["preset"]),
             *(f"{c['max_abs_difference'][k]:.1e}" for k in ("train/loss", "val/loss", "val/top1", "weights"))]
            for c in d["one_against_two"]]
    table = _table(["student", "train loss", "val loss", "val top-1 (pt)", "final weights"],
                   ["---"] + ["---:"] * 4, rows)
    return _markdown(table, f"Largest absolute difference over {d['epochs']} epochs, 1 process × batch 16 against "
                            "2 processes × batch 8 (gloo, CPU).")


@generator("resume", "bench/scale.json")
def resume(repo_root: Path, reports: Path | None = None) -> str:
    """``bench/scale.py``: the teacher stage killed after epoch 2 and run again."""
    d = _json(_reports(repo_root, reports), "bench/scale.json")
    rows = [[str(r["processes"]), f"`{name}`", f"`{v['uninterrupted'][:12]}`", f"`{v['killed_and_resumed'][:12]}`"]
            for r in d["kill_and_resume"] for name, v in r["md5"].items()]
    table = _table(["processes", "file", "md5, uninterrupted", "md5, killed after epoch 2 + rerun"],
                   ["---:", "---", "---", "---"], rows)
    verdict = "identical" if d["resume_identical"] else "NOT identical"
    return _markdown(table, f"{max(r['processes'] for r in d['kill_and_resume'])} processes: a worker killed, "
                            f"torchrun's `--max-restarts` restarted the group. Every file {verdict}.")


# --- README blocks ------------------------------------------------------------------------------------


@dataclass
class Block:
    name: str
    start: int  # line index of the start marker
    end: int  # line index of the end marker
    indent: str


def find_blocks(lines: Sequence[str]) -> tuple[list[Block], list[str]]:
    """The generated blocks of README's lines, and the problems with their markers."""
    blocks, problems, open_block = [], [], None
    for i, line in enumerate(lines):
        if "<!-- generated:" in line:
            m = START.match(line)
            if not m:
                problems.append(f"line {i + 1}: malformed start marker: {line.strip()}")
                continue
            if open_block:
                problems.append(f"line {i + 1}: block {m['name']!r} starts inside block {open_block[0]!r}")
            open_block = (m["name"], i, m["indent"])
        elif "<!-- end generated:" in line:
            m = END.match(line)
            if not m:
                problems.append(f"line {i + 1}: malformed end marker: {line.strip()}")
            elif not open_block or open_block[0] != m["name"]:
                problems.append(f"line {i + 1}: end marker of {m['name']!r} without its start marker")
            else:
                blocks.append(Block(open_block[0], open_block[1], i, open_block[2]))
                open_block = None
    if open_block:
        problems.append(f"block {open_block[0]!r} (line {open_block[1] + 1}) has no end marker")
    names = [b.name for b in blocks]
    for name in dict.fromkeys(n for n in names if names.count(n) > 1):
        problems.append(f"block {name!r} appears {names.count(name)} times")
    for b in blocks:
        if b.name not in GENERATORS:
            problems.append(f"marker {b.name!r} (line {b.start + 1}) has no generator (known: {', '.join(GENERATORS)})")
    for name in GENERATORS:
        if name not in names:
            problems.append(f"generator {name!r} has no block in README (add {GENERATORS[name].marker()} "
                            f"and <!-- end generated: {name} -->)")
    return blocks, problems


LINE_START_HAZARD = re.compile(r"^([-+*>#|]|\d+[.)])(\s|$)")  # a list, quote, heading or table row
OPERATORS = ("±", "=", "−")  # joined with the words on both sides
GLUE = re.compile(r"^([=±→×%−–]|pt|ms|µs|s|MiB|KiB|min)\W*$")  # stays on the line of the word before it


def wrap(paragraph: str, width: int) -> list[str]:
    """Greedy wrap at spaces. A line never starts with what Markdown would read as a list, quote,
    heading or table row, nor with a unit or an operator (the word stays on the previous line)."""
    words: list[str] = []
    for word in paragraph.split(" "):  # "a ± b", "T = 4" and "KD − baseline" stay on one line
        if len(words) >= 3 and words[-2] in OPERATORS:
            words[-3:] = [f"{words[-3]} {words[-2]} {words[-1]}"]
        words.append(word)
    if len(words) >= 3 and words[-2] in OPERATORS:
        words[-3:] = [" ".join(words[-3:])]
    lines, current = [], ""
    for word in words:
        if current and len(current) + 1 + len(word) > width and not LINE_START_HAZARD.match(word) \
                and not GLUE.match(word):
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        lines.append(current)
    return lines


def render(gen: Generator, markdown: str, indent: str) -> list[str]:
    """The block's lines, markers included: tables as they are, paragraphs wrapped, all indented."""
    body = []
    for line in markdown.rstrip("\n").split("\n"):
        if not line.strip():
            body.append("")
        elif line.lstrip().startswith("|"):
            body.append(indent + line)
        else:
            body.extend(indent + w for w in wrap(line, WIDTH - len(indent)))
    return [indent + gen.marker(), *body, f"{indent}<!-- end generated: {gen.name} -->"]


def generate(repo_root: Path, reports: Path, readme_text: str, skip: Sequence[str] = ()) \
        -> tuple[str, list[tuple[str, list[str], list[str]]], list[str]]:
    """README's text with every block regenerated (except ``skip``), each regenerated block as
    (name, current lines, new lines), and the marker problems. Raises SourceMissing."""
    lines = readme_text.split("\n")
    blocks, problems = find_blocks(lines)
    results = []
    out, last = [], 0
    for b in sorted(blocks, key=lambda b: b.start):
        gen = GENERATORS.get(b.name)
        current = lines[b.start:b.end + 1]
        if gen is None or b.name in skip:
            new = current
        else:
            missing = gen.missing(reports)
            if missing:
                hint = (f"; the pipeline's run writes {'them' if len(missing) > 1 else 'it'}, and --skip {b.name} "
                        "leaves the block as it is until then") if gen.pending else ""
                raise SourceMissing(f"block {b.name!r}: missing source file{'s' * (len(missing) > 1)} "
                                    f"{', '.join(missing)} (looked in {reports}){hint}")
            try:
                new = render(gen, gen.build(repo_root, reports), b.indent)
            except SourceMissing as e:
                raise SourceMissing(f"block {b.name!r}: {e}") from None
            results.append((b.name, current, new))
        out += lines[last:b.start] + new
        last = b.end + 1
    out += lines[last:]
    return "\n".join(out), results, problems


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 when a block differs")
    ap.add_argument("--readme", type=Path, default=REPO / "README.md")
    ap.add_argument("--reports", type=Path, default=REPO / "reports", help="the JSON's folder (default REPO/reports)")
    ap.add_argument("--skip", action="append", default=[], metavar="NAME", help="leave this block as it is")
    ap.add_argument("--list", action="store_true", help="name every generator and its sources")
    args = ap.parse_args(argv)
    if args.list:
        for gen in GENERATORS.values():
            print(f"{gen.name}: {', '.join(f'reports/{s}' for s in gen.sources)}"
                  + (" (rewritten by the pipeline's run)" if gen.pending else ""))
        return 0
    unknown = [name for name in args.skip if name not in GENERATORS]
    if unknown:
        print(f"readme_tables: --skip {', '.join(unknown)}: no such generator", file=sys.stderr)
        return 2
    if str(REPO) not in sys.path:  # kdlib, when run without the editable install
        sys.path.insert(0, str(REPO))
    text = args.readme.read_text()
    try:
        new_text, results, problems = generate(REPO, args.reports, text, args.skip)
    except SourceMissing as e:
        print(f"readme_tables: {e}", file=sys.stderr)
        return 2
    changed = [(name, old, new) for name, old, new in results if old != new]
    if args.check:
        for name, old, new in changed:
            sources = ", ".join(f"reports/{s}" for s in GENERATORS[name].sources)
            print(f"block {name!r} in {args.readme.name} differs from {sources}:")
            sys.stdout.writelines(difflib.unified_diff(
                [line + "\n" for line in old], [line + "\n" for line in new],
                f"{args.readme.name} (block {name})", f"generated from {sources}"))
        for problem in problems:
            print(f"readme_tables: {problem}")
        if changed or problems:
            print(f"readme_tables: {len(changed)} block(s) differ, {len(problems)} marker problem(s); "
                  f"`{COMMAND}` rewrites the blocks", file=sys.stderr)
            return 1
        print(f"readme_tables: {args.readme.name} agrees with the JSON ({len(results)} blocks checked"
              + (f", skipped: {', '.join(args.skip)}" if args.skip else "") + ")")
        return 0
    if problems:
        for problem in problems:
            print(f"readme_tables: {problem}", file=sys.stderr)
        return 1
    if new_text != text:
        args.readme.write_text(new_text)
    print(f"readme_tables: rewrote {len(changed)} of {len(results)} block(s)"
          + (f" ({', '.join(n for n, _, _ in changed)})" if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
