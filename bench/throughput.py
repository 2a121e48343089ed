"""Training throughput of each stage against the same model's compute on in-memory tensors.

For teacher, baseline and distill: images/s of the real training loop (DataLoader, per-sample
augmentation, batch normalization, teacher forward for distill) next to the same steps on
pre-built in-memory batches. Target: the real loop reaches >= 85% of the in-memory rate, i.e.
the data path is not the bottleneck. Also shows what channels_last + bf16 autocast buy on this
CPU, which is how the presets' defaults were chosen.

    python bench/throughput.py [--quick]
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from common import bench_parser, default_params, print_table, shrink, write_result

from kdlib.checkpoint import Checkpoint
from kdlib.data import BatchNormalizer, DatasetMeta
from kdlib.losses import StudentOutput, TeacherOutput, build_objective
from kdlib.models import build_model
from kdlib.runtime import seed_everything
from kdlib.teacher import OnlineTeacher
from kdlib.train import AMP_DTYPES, build_optimizer
from stages.params import Run, resolve
from stages.pipeline import prepare, train_pipeline
from stages.workspace import Workspace


def in_memory_rate(run: Run, role: str, meta: DatasetMeta, teacher_ckpt: Path | None, steps: int,
                   amp: str, channels_last: bool) -> float:
    """Images/s of normalize → forward (+ teacher) → loss → backward → step on fixed batches."""
    model_run = run.model(role)
    spec, recipe, size = model_run.spec, model_run.recipe, model_run.input_size
    seed_everything(0)
    model = build_model(spec.arch, meta.num_classes, meta.channels, False, **spec.model_kwargs).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    normalizer = BatchNormalizer(meta.mean, meta.std, channels_last)
    optimizer = build_optimizer(model, recipe)
    images = torch.randint(0, 256, (recipe.batch_size, meta.channels, size, size), dtype=torch.uint8)
    targets = torch.randint(0, meta.num_classes, (recipe.batch_size,))
    positions = torch.arange(recipe.batch_size)
    teacher = None
    if role == "distill":  # the teacher's cost as the loop pays it: online, or a cache lookup
        if run.params.teacher_cache.enabled:
            cached = torch.randn(recipe.batch_size, meta.num_classes)
            teacher = lambda x, p, v: TeacherOutput(cached)  # noqa: E731
        else:
            checkpoint = Checkpoint.read(teacher_ckpt)
            teacher = OnlineTeacher(checkpoint.model(), checkpoint.record.input_size)
        objective = build_objective("kd", temperature=4.0, alpha=0.9)
    else:
        objective = build_objective("ce")
    dtype = AMP_DTYPES[amp]

    def step() -> None:
        x = normalizer(images)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
            teacher_out = teacher(x, positions, positions) if teacher is not None else None
        out = objective(StudentOutput(logits.float()), targets, teacher_out)
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        optimizer.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * recipe.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = bench_parser(__doc__)
    args = parser.parse_args()
    params = default_params()
    epochs = 1 if args.quick else 3
    params = shrink(params, per_class=10, epochs=epochs) if args.quick else params
    for preset in params["models"].values():
        preset.update(epochs=epochs, warmup_epochs=0)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp))
        run = resolve(params)
        index = prepare(run, ws)
        teacher_ckpt = ws.teacher_checkpoint
        for role in ("teacher", "baseline", "distill"):
            fit_result, _ = train_pipeline(run, ws, roles=(role,))[role]
            recipe = run.model(role).recipe
            amp, cl = recipe.amp, recipe.channels_last
            steps = max(len(index.split("train")) * epochs // recipe.batch_size, 5)
            memory = in_memory_rate(run, role, index.meta, teacher_ckpt, steps, amp, cl)
            fp32 = memory if (amp, cl) == ("none", False) else in_memory_rate(
                run, role, index.meta, teacher_ckpt, steps, "none", False)
            ratio = fit_result.images_per_second / memory
            rows.append([role, f"{amp}{'+cl' if cl else ''}", fit_result.images_per_second, memory,
                         f"{100 * ratio:.0f}%", fp32, f"{memory / fp32:.2f}x"])
            results.append({"stage": role, "precision": amp, "channels_last": cl,
                            "train_loop_img_s": fit_result.images_per_second, "in_memory_img_s": memory,
                            "ratio": ratio, "in_memory_fp32_img_s": fp32, "speedup_vs_fp32": memory / fp32})
    print(f"\ntorch threads {torch.get_num_threads()}; default data; {epochs} epoch(s) of the real loop")
    print_table(["stage", "settings", "loop img/s", "in-memory img/s", "loop/in-mem", "fp32 in-mem img/s",
                 "settings vs fp32"], rows)
    met = all(r["ratio"] >= 0.85 for r in results)
    print(f"data path target (loop >= 85% of in-memory for every stage): {'met' if met else 'NOT met'}")
    write_result("throughput", {"quick": args.quick, "epochs": epochs, "stages": results, "target_met": met}, args.out)


if __name__ == "__main__":
    main()
