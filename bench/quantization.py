"""Quantized inference against the best fp32 path, and the KD student against its teacher.

Trains the default pipeline (shortened) in a copy of this repository with ``dvc repro`` of the
``evaluate@<role>`` stages, or takes ``--repo`` with trained models, then measures every (model, precision) in a fresh
process (kdlib.quantize.measure.run_isolated): test accuracy, batch-1 latency (median/p95),
images/s at batch 64, peak RSS, size on disk. Targets: the fastest int8 student is >= 2x faster at
batch 1 than the fastest fp32 student path (eager NCHW, channels_last, ONNX Runtime), loses
<= 0.5 pt top-1 and is >= 3x smaller. All figures are ratios from one run.

    python bench/quantization.py [--quick] [--repo PATH] [--threads 2]
"""
from __future__ import annotations

import os
import random
import subprocess
import tempfile
from pathlib import Path

import yaml
from torch import Tensor

from common import bench_parser, copy_repo, dvc_stages, git_env, print_table, stage_group, write_result

from kdlib import yamlfile
from kdlib.checkpoint import Checkpoint
from kdlib.quantize.measure import EvalJob, TensorImages, add_deltas, materialize, run_isolated
from stages.params import load_params, resolve
from stages.workspace import Workspace

STUDENT = ["fp32", "fp32_channels_last", "onnx_fp32", "bf16", "fp16", "int8_dynamic", "int8_static", "fp8",
           "onnx_int8"]
TEACHER = ["fp32", "fp32_channels_last", "onnx_fp32", "int8_static", "onnx_int8"]
FP32_PATHS = {"fp32", "fp32_channels_last", "onnx_fp32"}
INT8_PATHS = {"int8_static", "onnx_int8", "int8_dynamic"}


def train_copy(work: Path, quick: bool) -> Path:
    """The pipeline up to evaluate (every ``evaluate@<role>`` stage) in a copy of the repository,
    with fewer epochs."""
    repo = copy_repo(work)
    params = yamlfile.load(repo / "params.yaml")
    for preset in params["models"].values():
        preset.update(epochs=1 if quick else 5, warmup_epochs=0, patience=0)
    if quick:
        params["datasets"]["mnist"].setdefault("options", {}).update(
            train_per_class=10, val_per_class=5, test_per_class=20)
    resolve(params)  # a ParamError here names the problem; DVC would only say the stage failed
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    evaluate = [s for s in dvc_stages(repo) if stage_group(s) == "evaluate"]
    proc = subprocess.run(["dvc", "repro", *evaluate], cwd=repo, env=git_env(), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"dvc repro {' '.join(evaluate)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return repo


def eval_data(role: str) -> tuple[Path, TensorImages, Tensor, Tensor | None]:
    """``role``'s checkpoint, its test split and a seeded sample of 256 training images for
    calibration, decoded at the model's input size (run from the repository's root)."""
    run, ws = load_params(Path("params.yaml")), Workspace()
    index = ws.index()
    path = ws.checkpoint(role).resolve()
    size = Checkpoint.read(path).record.input_size
    test, train = run.dataset.load(index, "test", size, False), run.dataset.load(index, "train", size, False)
    picks = sorted(random.Random(0).sample(range(len(train)), min(256, len(train))))
    return path, materialize(test), materialize(train, picks).images, test.ignore


def measure(repo: Path, threads: int, quick: bool) -> list[dict]:
    os.chdir(repo)  # the prepared index records paths relative to the repository
    runs = dict(warmup=3, timed_runs=20, throughput_runs=3) if quick else dict(warmup=50, timed_runs=1000,
                                                                              throughput_runs=20)
    rows = []
    for role, precisions in (("distill", STUDENT), ("baseline", ["fp32"]), ("teacher", TEACHER)):
        path, test_set, calibration, ignore = eval_data(role)
        for precision in precisions:
            job = EvalJob(role, path, precision, test_set, calibration, threads, 256, 64,
                          runs["warmup"], runs["timed_runs"], runs["throughput_runs"], "cpu", ignore)
            row = run_isolated(job)
            print(f"{role:9s} {precision:18s} {row['status']} {row.get('reason', '')}", flush=True)
            rows.append(row)
    return add_deltas(rows, "top1")


def ort_breakdown(repo: Path, threads: int, quick: bool) -> dict[str, dict]:
    """Per-node ONNX Runtime profile of the student at batch 1, fp32 against static int8: which
    kernels int8 speeds up, which it slows, and the per-call time no kernel removes."""
    import numpy as np
    import torch

    from kdlib.checkpoint import model_from_checkpoint
    from kdlib.data import BatchNormalizer
    from kdlib.quantize import PRECISIONS
    from kdlib.quantize.base import QuantContext, Skipped
    from kdlib.quantize.onnx_common import profile_nodes

    os.chdir(repo)
    path, test_set, calibration, _ = eval_data("distill")
    model, meta = model_from_checkpoint(path)
    model.eval()
    normalize = BatchNormalizer(meta["mean"], meta["std"])
    torch.set_num_threads(threads)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = QuantContext(normalize(test_set.images[:64]), [normalize(b) for b in calibration.split(64)],
                           threads=threads, workdir=Path(tmp))
        x = np.ascontiguousarray(ctx.example[:1].numpy())
        for precision in ("onnx_fp32", "onnx_int8"):
            try:
                module = PRECISIONS.get(precision)(model, ctx).module
            except Skipped as why:
                print(f"no ONNX Runtime profile: {why}")
                return {}
            out[precision] = profile_nodes(module.path, x, threads, runs=300 if quick else 3000)
    return out


def best(rows: list[dict], model: str, names: set[str], batch: int = 1) -> dict | None:
    """The fastest ok row among ``names``: lowest batch-1 median latency, or highest images/s at batch 64."""
    ok = [r for r in rows if r["model"] == model and r["precision"] in names and r["status"] == "ok"]
    speed = (lambda r: -r["latency_b1_median_ms"]) if batch == 1 else (lambda r: r["throughput_img_s"])
    return max(ok, key=speed) if ok else None


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--repo", type=Path, help="a repository with data/prepared and models/*/best.pt")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    out = args.out.resolve()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        repo = args.repo.resolve() if args.repo else train_copy(Path(tmp), args.quick)
        cwd = os.getcwd()
        try:
            rows = measure(repo, args.threads, args.quick)
            profiles = ort_breakdown(repo, args.threads, args.quick)
        finally:
            os.chdir(cwd)
    table = []
    for r in rows:
        if r["status"] != "ok":
            table.append([r["model"], r["precision"], f"{r['status']}: {r.get('reason', '')[:60]}"] + [""] * 10)
            continue
        table.append([r["model"], r["precision"], r["backend"][:40], r["top1"], f"{r.get('delta_top1', 0):+.2f}",
                      f"{r['latency_b1_median_ms']:.3f}", f"{r['latency_b1_p95_ms']:.3f}",
                      f"{1e3 / r['throughput_img_s']:.3f}", f"{r['size_bytes'] / 1024:.1f}",
                      f"{r.get('size_ratio', 1):.2f}x", f"{r.get('inference_mib', float('nan')):.0f}", f"{r['peak_rss_mib']:.0f}", f"{r['macs'] / 1e6:.2f}"])
    print(f"\nthreads {args.threads}; batch-1 latency over the timed runs; ms/img at batch 64; "
          f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print_table(["model", "precision", "backend", "top-1", "Δ pt", "b1 ms", "b1 p95", "b64 ms/img", "size KiB",
                 "smaller", "infer MiB", "peak MiB", "MMACs"], table)
    fp32, int8 = best(rows, "distill", FP32_PATHS), best(rows, "distill", INT8_PATHS)
    summary: dict = {}
    if fp32 and int8:
        ref = next(r for r in rows if r["model"] == "distill" and r["precision"] == "fp32")
        fp32_b64 = best(rows, "distill", FP32_PATHS, batch=64)
        int8_b64 = best(rows, "distill", INT8_PATHS, batch=64)
        summary["int8_vs_best_fp32"] = {
            "int8_path": int8["precision"], "int8_backend": int8["backend"], "fp32_path": fp32["precision"],
            "speedup_b1": round(fp32["latency_b1_median_ms"] / int8["latency_b1_median_ms"], 3),
            "int8_path_b64": int8_b64["precision"], "fp32_path_b64": fp32_b64["precision"],
            "speedup_b64": round(int8_b64["throughput_img_s"] / fp32_b64["throughput_img_s"], 3),
            "top1_loss_pt": round(ref["top1"] - int8["top1"], 3),
            "size_ratio": round(ref["size_bytes"] / int8["size_bytes"], 3)}
        s = summary["int8_vs_best_fp32"]
        s["target_met"] = s["speedup_b1"] >= 2 and s["top1_loss_pt"] <= 0.5 and s["size_ratio"] >= 3
        print(f"\nint8 student ({s['int8_path']}: {s['int8_backend']}) vs best fp32 student ({s['fp32_path']}): "
              f"{s['speedup_b1']:.2f}x at batch 1; at batch 64 {s['int8_path_b64']} vs {s['fp32_path_b64']} "
              f"{s['speedup_b64']:.2f}x; "
              f"{s['top1_loss_pt']:+.2f} pt top-1 lost, {s['size_ratio']:.2f}x smaller; "
              f"target (>=2x, <=0.5 pt, >=3x) {'met' if s['target_met'] else 'NOT met'}")
    for precision, prof in profiles.items():
        print(f"\nONNX Runtime per-node profile, student {precision}, batch 1, {args.threads} threads: "
              f"run {prof['run_median_us']:.0f} us, kernels {prof['kernel_sum_us']:.0f} us")
        print_table(["node", "op", "median us"], [[n["node"][:40], n["op"], f"{n['median_us']:.0f}"]
                                                  for n in prof["nodes"]])
    summary["onnx_profile_b1"] = profiles
    student = {r["precision"]: r for r in rows if r["model"] == "distill" and r["status"] == "ok"}
    teacher = {r["precision"]: r for r in rows if r["model"] == "teacher" and r["status"] == "ok"}
    if "fp32" in student and "fp32" in teacher:
        kd = {"speedup_b1_fp32": round(teacher["fp32"]["latency_b1_median_ms"] / student["fp32"]["latency_b1_median_ms"], 2),
              "speedup_b64_fp32": round(student["fp32"]["throughput_img_s"] / teacher["fp32"]["throughput_img_s"], 2),
              "inference_mib_teacher": teacher["fp32"].get("inference_mib"),
              "inference_mib_student": student["fp32"].get("inference_mib"),
              "peak_rss_saving_mib": round(teacher["fp32"]["peak_rss_mib"] - student["fp32"]["peak_rss_mib"], 1),
              "size_ratio": round(teacher["fp32"]["size_bytes"] / student["fp32"]["size_bytes"], 1),
              "params_ratio": round(teacher["fp32"]["params"] / student["fp32"]["params"], 1),
              "top1_teacher": teacher["fp32"]["top1"], "top1_student": student["fp32"]["top1"]}
        bt, bs = best(rows, "teacher", set(teacher)), best(rows, "distill", set(student))
        kd["speedup_b1_best_vs_best"] = round(bt["latency_b1_median_ms"] / bs["latency_b1_median_ms"], 2)
        summary["kd_student_vs_teacher"] = kd
        print(f"KD student vs teacher (fp32 eager): {kd['speedup_b1_fp32']}x faster at batch 1, "
              f"{kd['speedup_b64_fp32']}x at batch 64, "
              f"inference memory {kd['inference_mib_teacher']} -> {kd['inference_mib_student']} MiB "
              f"(whole-process peak {kd['peak_rss_saving_mib']} MiB less), "
              f"{kd['size_ratio']}x smaller, {kd['params_ratio']}x fewer parameters; best path vs best path "
              f"{kd['speedup_b1_best_vs_best']}x at batch 1")
    write_result("quantization", {"quick": args.quick, "threads": args.threads, "load_average_before": load_before[0],
                                  "rows": rows, "summary": summary,
                                  "target_met": summary.get("int8_vs_best_fp32", {}).get("target_met", False)}, out)


if __name__ == "__main__":
    main()
