"""quantize: every trained model in every precision of ``eval.precisions`` — test accuracy and its
change from fp32, batch-1 latency (median/p95), throughput, peak memory, size on disk, MACs.

Each (model, precision) runs in a fresh process (kdlib.quantize.measure.run_isolated), so the
peak RSS is that evaluation's own. Calibration uses a seeded sample of the training split.
Writes reports/quantization.{json,csv}, reports/quantize/table.md and figures.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
from pathlib import Path
from typing import Any

import torch

from kdlib.checkpoint import load_checkpoint
from kdlib.quantize.figures import plot_accuracy_vs, plot_teacher_student, quantization_table
from kdlib.quantize.measure import EvalJob, add_deltas, materialize, run_isolated
from stages.common import MODELS_DIR, REPORTS_DIR, load_split, prepared_index, write_json
from stages.params import load_params

OUT_DIR = REPORTS_DIR / "quantize"
CSV_COLUMNS = ["model", "precision", "status", "backend", "top1", "top5", "mAP", "delta_top1", "delta_mAP",
               "latency_b1_median_ms", "latency_b1_p95_ms", "throughput_img_s", "size_bytes", "size_ratio",
               "inference_mib", "peak_rss_mib", "params", "macs", "reason"]


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    params = load_params()
    ev, preset = params["eval"], params["datasets"][params["dataset"]]
    index = prepared_index()
    score = "mAP" if index.meta.task == "multilabel" else "top1"
    data: dict[Any, Any] = {}
    rows: list[dict[str, Any]] = []
    for role in ev["roles"]:
        path = MODELS_DIR / role / "best.pt"
        size = load_checkpoint(path)["meta"]["input_size"]
        if size not in data:  # decode each split once per input size, then share it with every job
            test = load_split(index, "test", preset, size, False)
            train = load_split(index, "train", preset, size, False)
            picks = random.Random(params["seed"]).sample(range(len(train)), min(ev["calibration_images"], len(train)))
            test_set = materialize(test) if preset.get("preload") else test
            data[size] = (test_set, materialize(train, sorted(picks)).images, test.ignore)
        test_set, calibration, ignore = data[size]
        for precision in ev["precisions"]:
            job = EvalJob(role, path, precision, test_set, calibration, ev["threads"], ev["batch_size"],
                          ev["throughput_batch"], ev["warmup_runs"], ev["timed_runs"], ev["throughput_runs"],
                          "cuda" if torch.cuda.is_available() else "cpu", ignore, preset.get("ap_mode", "voc"))
            row = run_isolated(job)
            rows.append(row)
            shown = f"{row[score]:.2f}  b1 {row['latency_b1_median_ms']:.3f} ms" if row["status"] == "ok" else \
                f"{row['status']}: {row.get('reason')}"
            print(f"{role:9s} {precision:13s} {shown}", flush=True)
    add_deltas(rows, score)
    settings = {"threads": ev["threads"], "batch_1_timed_runs": ev["timed_runs"], "warmup_runs": ev["warmup_runs"],
                "throughput_batch": ev["throughput_batch"], "throughput_runs": ev["throughput_runs"],
                "calibration_images": ev["calibration_images"], "score": score,
                "memory": "inference_mib: peak RSS (VmHWM, reset at the start) while the checkpoint is loaded, "
                          "converted (export, calibration, compilation where the precision needs them) and "
                          "timed at batch 1 and the throughput batch, minus the RSS before "
                          "(rss_start_mib: a fresh process forked from a server that has imported torch); "
                          "peak_rss_mib: that process's peak over the whole evaluation, accuracy pass included"}
    results: dict[str, Any] = {}
    for r in rows:
        results.setdefault(r["model"], {})[r["precision"]] = r
    write_json(REPORTS_DIR / "quantization.json", {"settings": settings, "results": results})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(REPORTS_DIR / "quantization.csv", buffer.getvalue())
    training = {}
    for role in ev["roles"]:
        timing = REPORTS_DIR / role / "timing.json"
        if timing.is_file():
            training[role] = json.loads(timing.read_text()).get("train_seconds")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write_text(OUT_DIR / "table.md", quantization_table(rows, score, training))
    plot_accuracy_vs(rows, "latency_b1_median_ms", f"latency per image, batch 1, {ev['threads']} threads (ms)",
                     OUT_DIR / "accuracy_vs_latency.png", score)
    plot_accuracy_vs(rows, "size_bytes", "serialized size (bytes)", OUT_DIR / "accuracy_vs_size.png", score)
    plot_teacher_student(rows, OUT_DIR / "teacher_vs_student.png", score)
    print(quantization_table(rows, score, training))


if __name__ == "__main__":
    main()
