"""The pipeline on CUDA: a ConvNeXt-T teacher and a DeiT-S student at 224 px, bf16 autocast, 2 epochs.

Runs the real stages (check, prepare, teacher, baseline, teacher_cache, align, distill,
evaluate) in a scratch copy of this repository on generated 256×256 JPEGs (coloured shapes,
one class per shape and colour), with ``runtime.device: cuda``, channels_last, pinned memory and
``amp: bf16`` for both models. Prints per stage: wall seconds, training images/s and peak CUDA
memory (``timing.json``), and writes ``reports/bench/gpu.json``. Without a CUDA device it says
so, writes ``{"cuda": false}`` and exits 0: nothing else in this project needs a GPU.

    python bench/gpu.py [--compile] [--images-per-class N]
    python bench/gpu.py --device cpu --quick   # the same script, tiny, on a CPU (its test)
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw

from common import bench_parser, copy_repo, git_env, print_table, write_result

from kdlib import yamlfile

STAGES = (["check"], ["prepare"], ["train", "teacher"], ["train", "baseline"], ["teacher_cache"], ["align"],
          ["train", "distill"], ["evaluate", "teacher"], ["evaluate", "baseline"], ["evaluate", "distill"])
SHAPES = ("ellipse", "rectangle", "triangle", "cross")
# --quick (the CPU smoke run a test makes): the stages that differ on CUDA
QUICK_STAGES = (["prepare"], ["train", "teacher"], ["teacher_cache"], ["train", "distill"])
COLOURS = ((220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 200, 40), (160, 60, 200))


def make_images(root: Path, per_class: int, size: int, seed: int = 0) -> int:
    """An imagefolder tree of ``size``² JPEGs: 20 classes (shape × colour), random placement,
    scale and background, so the models have something to learn."""
    rng = np.random.default_rng(seed)
    count = 0
    for split, n in (("train", per_class), ("val", max(per_class // 4, 2)), ("test", max(per_class // 4, 2))):
        for shape in SHAPES:
            for c, colour in enumerate(COLOURS):
                folder = root / split / f"{shape}_{c}"
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    background = tuple(int(v) for v in rng.integers(0, 256, 3))
                    image = Image.new("RGB", (size, size), background)
                    draw = ImageDraw.Draw(image)
                    half = int(rng.integers(size // 8, size // 3))
                    cx, cy = (int(v) for v in rng.integers(half, size - half, 2))
                    box = (cx - half, cy - half, cx + half, cy + half)
                    if shape == "ellipse":
                        draw.ellipse(box, fill=colour)
                    elif shape == "rectangle":
                        draw.rectangle(box, fill=colour)
                    elif shape == "triangle":
                        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
                    else:
                        draw.rectangle((cx - half, cy - half // 4, cx + half, cy + half // 4), fill=colour)
                        draw.rectangle((cx - half // 4, cy - half, cx + half // 4, cy + half), fill=colour)
                    image.save(folder / f"{i:04d}.jpg", quality=90)
                    count += 1
    return count


def gpu_params(params: dict, data: Path, device: str, quick: bool, compile_model: bool) -> dict:
    size = 32 if quick else 224
    params["dataset"] = "generated"
    params["datasets"]["generated"] = {
        "layout": "imagefolder", "root": str(data), "image_size": size, "channels": 3,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "augment": "imagenet",
        "preload": True, "preload_size": int(size * 256 / 224)}
    amp = "bf16" if device == "cuda" else "none"
    common = {"epochs": 2, "warmup_epochs": 0, "schedule": "cosine", "optimizer": "adamw", "weight_decay": 0.05, "augment": None,
              "label_smoothing": 0.0, "patience": 0, "channels_last": device == "cuda", "amp": amp}
    params["models"]["gpu_teacher"] = {
        **common, "arch": "convnext_atto" if quick else "convnext_tiny", "input_size": size, "lr": 1e-3,
        "batch_size": 16 if quick else 128, "drop_path": 0.1}
    params["models"]["gpu_student"] = {
        **common, "arch": "deit_tiny_distilled_patch16_224" if quick else "deit_small_distilled_patch16_224",
        "input_size": size, "lr": 5e-4, "batch_size": 16 if quick else 128, "drop_path": 0.1,
        **({"kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}} if quick else {})}
    params.update(teacher="gpu_teacher", student="gpu_student")
    params["distill"]["method"] = "kd"
    params["eval"]["batch_size"] = 256
    params["runtime"].update(device=device, compile=compile_model)
    return params


def stage_row(repo: Path, stage: list[str], seconds: float) -> dict:
    role = stage[1] if len(stage) > 1 else stage[0]
    row: dict = {"stage": " ".join(stage), "seconds": round(seconds, 1)}
    timing = repo / "reports" / ("teacher_cache" if role == "teacher_cache" else role) / "timing.json"
    if stage[0] in ("train", "align", "teacher_cache") and timing.is_file():
        found = json.loads(timing.read_text())
        row["train_images_per_second"] = found.get("train_images_per_second")
        row["peak_cuda_memory_gib"] = round(found["peak_cuda_memory_bytes"] / 2**30, 2) \
            if found.get("peak_cuda_memory_bytes") else None
    if stage[0] == "evaluate":
        row["test_top1"] = json.loads((repo / "reports" / "evaluate" / f"{role}.json").read_text()).get("best", {}).get("top1")
    return row


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--compile", action="store_true", help="runtime.compile: torch.compile the trained models")
    parser.add_argument("--images-per-class", type=int, default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}): nothing measured")
        write_result("gpu", {"cuda": False}, args.out)
        return
    per_class = args.images_per_class or (4 if args.quick else 64)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = copy_repo(Path(tmp) / "repo")
        images = make_images(Path(tmp) / "images", per_class, 256 if not args.quick else 40)
        params = gpu_params(yamlfile.load(repo / "params.yaml"), Path(tmp) / "images", args.device,
                            args.quick, args.compile)
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for stage in QUICK_STAGES if args.quick else STAGES:
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", f"stages.{stage[0]}", *stage[1:]], cwd=repo, env=git_env(),
                                  capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"stages.{' '.join(stage)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            rows.append(stage_row(repo, stage, time.perf_counter() - start))
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"\n{device}; {images} generated JPEGs, 2 epochs, {'bf16 autocast' if args.device == 'cuda' else 'fp32'}"
          f"{', torch.compile' if args.compile else ''}")
    print_table(["stage", "seconds", "train img/s", "peak CUDA GiB", "test top-1"],
                [[r["stage"], r["seconds"], *("" if r.get(k) is None else r[k] for k in
                                              ("train_images_per_second", "peak_cuda_memory_gib", "test_top1"))]
                 for r in rows])
    write_result("gpu", {"cuda": args.device == "cuda", "device": device, "images": images, "quick": args.quick,
                         "compile": args.compile, "stages": rows}, args.out)


if __name__ == "__main__":
    main()
