"""The one training loop: teacher, baseline, feature alignment and distillation all use :func:`fit`.

The objective decides what is learned (:mod:`kdlib.losses`) and what each step computes: the
student's pooled features or its distillation head when the method needs them, and the
teacher's output from an optional ``teacher`` callable (:class:`kdlib.teacher.OnlineTeacher`
or :class:`kdlib.teacher_cache.CachedTeacher`: the loop does not know which). Training images
are replayable views (:mod:`kdlib.data.views`), so a cached teacher output belongs to exactly
the view the student sees. Logging and checkpointing happen only on the main process
(:class:`kdlib.runtime.Runtime`), so running under ``torchrun`` needs only a DDP wrapper.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

from kdlib.checkpoint import save_checkpoint
from kdlib.data.dataset import IndexedImageDataset
from kdlib.data.transforms import BatchNormalizer
from kdlib.data.views import AugmentedViews, make_view_seeds
from kdlib.features import prediction_logits, student_output
from kdlib.losses.registry import TeacherOutput
from kdlib.metrics import evaluate
from kdlib.runtime import Runtime, make_loader

# (normalized images, image positions, view indices) -> the teacher's output on those views
TeacherFn = Callable[[Tensor, Tensor, Tensor], TeacherOutput]
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Recipe:
    """Optimization recipe of one training run (one model preset of ``params.yaml``)."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step | constant
    warmup_epochs: int = 0
    min_lr: float = 0.0
    step_epochs: int = 30
    step_gamma: float = 0.1
    label_smoothing: float = 0.0
    patience: int = 0  # epochs without a better val top-1 before stopping; 0 = never stop early
    grad_clip: float = 0.0  # max grad norm; 0 = off
    channels_last: bool = False
    amp: str = "none"  # none | bf16 | fp16
    eval_batch_size: int = 256
    num_workers: int = 0


class MetricsLogger(Protocol):
    """What :func:`fit` needs from a logger (DVCLive's ``Live`` fits)."""

    def log_metric(self, name: str, val: float) -> Any: ...

    def next_step(self) -> Any: ...


@dataclass
class FitResult:
    best_epoch: int
    score_name: str  # what picked the best checkpoint: "top1", or "mAP" for multi-label data
    best_val_score: float
    last_epoch: int
    last_val_score: float
    stopped_early: bool
    train_seconds: float
    images_per_second: float
    history: list[dict[str, float]] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)


def lr_factor(step: int, steps_per_epoch: int, recipe: Recipe) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (linear warmup, then the schedule)."""
    epoch_f = step / max(steps_per_epoch, 1)
    if recipe.warmup_epochs and epoch_f < recipe.warmup_epochs:
        return (step + 1) / (recipe.warmup_epochs * steps_per_epoch)
    floor = recipe.min_lr / recipe.lr if recipe.lr > 0 else 0.0
    if recipe.schedule == "constant":
        return 1.0
    if recipe.schedule == "step":
        return recipe.step_gamma ** int(epoch_f // recipe.step_epochs)
    if recipe.schedule == "cosine":
        span = max(recipe.epochs - recipe.warmup_epochs, 1e-8)
        progress = min(max(epoch_f - recipe.warmup_epochs, 0.0) / span, 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {recipe.schedule!r}; known: cosine, step, constant")


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters (1-d tensors), nor on what the model itself
    # exempts (timm's no_weight_decay(): position embeddings, class/distillation tokens), as
    # timm and DeiT do.
    exempt = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name in exempt else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}; known: sgd, adamw")


def fit(
    model: nn.Module,
    train_set: IndexedImageDataset,
    val_set: IndexedImageDataset,
    objective: nn.Module,
    recipe: Recipe,
    normalizer: BatchNormalizer,
    checkpoint_dir: Path,
    checkpoint_meta: dict[str, Any],
    seed: int,
    teacher: TeacherFn | None = None,
    logger: MetricsLogger | None = None,
    runtime: Runtime = Runtime(),
    progress: bool = True,
    ap_mode: str = "voc",
    mix: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
    view_seeds: Tensor | None = None,
    select_best: bool = True,
) -> FitResult:
    """Train ``model`` with ``objective``; write ``best.pt`` (best val top-1 — mAP for multi-hot
    targets, with ``ap_mode`` — ties broken by val loss) and ``last.pt``. ``mix`` (see
    :func:`kdlib.data.transforms.build_mix`) mixes each normalized training batch.

    Epoch ``e`` trains on view ``(e − 1) mod K`` of every image, from ``view_seeds`` ``(N, K)``
    (a teacher cache's views); by default ``K`` = epochs, a fresh view per epoch, seeded by
    ``seed``. With ``select_best=False`` (feature alignment, whose classifier is not being
    trained) nothing is validated and only ``last.pt`` is written.

    The test split never enters here: model selection and early stopping use ``val_set`` only.
    """
    device = runtime.device
    amp_dtype = AMP_DTYPES[recipe.amp]
    model.to(device)
    normalizer.to(device)
    objective.to(device)  # buffers such as LSH hyperplanes live where the features are
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    if view_seeds is None:
        view_seeds = make_view_seeds(seed, len(train_set), recipe.epochs)
    views = AugmentedViews(train_set, view_seeds)
    train_loader = make_loader(views, recipe.batch_size, True, seed, runtime, recipe.num_workers)
    val_loader = make_loader(val_set, recipe.eval_batch_size, False, seed, runtime, recipe.num_workers)
    optimizer = build_optimizer(model, recipe)
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
    scaler = torch.amp.GradScaler(device.type, enabled=recipe.amp == "fp16")
    steps_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, recipe)
    )
    if getattr(objective, "needs_teacher", False) and teacher is None:
        raise ValueError(f"{type(objective).__name__} needs a teacher")
    with_features = getattr(objective, "needs_features", False)
    if getattr(objective, "uses_distillation_token", False):
        if not hasattr(model, "set_distilled_training"):
            raise ValueError(f"{type(objective).__name__} needs a student with a distillation token "
                             f"(timm's *_distilled_* models); {type(model).__name__} has none")
        model.set_distilled_training(True)  # training returns (class, distillation) logits

    checkpoint_dir = Path(checkpoint_dir)
    best_score, best_loss, best_epoch, epochs_without_gain = -1.0, math.inf, 0, 0
    multilabel = train_set.multi_hot is not None
    history: list[dict[str, float]] = []
    epoch_times: list[float] = []
    seen, train_seconds, last_val_score, epoch = 0, 0.0, 0.0, 0
    stopped_early = False

    for epoch in range(1, recipe.epochs + 1):
        train_loader.sampler.set_epoch(epoch - 1)  # type: ignore[union-attr]
        model.train()
        sums: dict[str, Tensor | float] = {}
        correct: Tensor | int = 0
        count = 0
        start = time.perf_counter()
        # disable=None: a progress bar on a terminal, nothing in a log file
        batches = tqdm(train_loader, desc=f"epoch {epoch}/{recipe.epochs}", leave=False,
                       disable=None if progress and runtime.is_main else True)
        for images, targets, positions, view_ids in batches:
            images = images.to(device, non_blocking=True)
            if train_set.batch_transform is not None:
                images = train_set.batch_transform(images, views.batch_seeds(positions, view_ids))
            images = normalizer(images)
            targets = targets.to(device, non_blocking=True)
            if mix is not None:  # MixUp/CutMix: the teacher below sees the same mixed images
                images, targets = mix(images, targets)
            # the teacher runs in its own precision (float32), not the student's autocast: its
            # outputs are then the same online and from the cache
            teacher_out = teacher(images, positions, view_ids) if teacher is not None else None
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                student = student_output(model, images, with_features)
            student = _float32(student)  # losses in fp32 whatever the autocast dtype
            out = objective(student, targets, _float32(teacher_out) if teacher_out is not None else None)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out.total).backward()
            if recipe.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            # accumulate on the device: a float() per step would wait for the GPU every step
            n = len(targets)
            count += n
            if not multilabel:  # with mixed soft targets, against their dominant class
                labels = targets.argmax(dim=1) if targets.ndim == 2 else targets
                correct = correct + (prediction_logits(student).detach().argmax(dim=1) == labels).sum()
            for name, value in {"loss": out.total.detach(), **out.terms}.items():
                sums[name] = sums.get(name, 0.0) + value * n
        epoch_seconds = time.perf_counter() - start
        train_seconds += epoch_seconds
        seen += count

        row = {f"train/{k}": float(v) / count for k, v in sums.items()}
        if not multilabel and select_best:
            row["train/top1"] = 100.0 * float(correct) / count
        improved = False
        if select_best:
            val = evaluate(model, val_loader, normalizer, device, amp_dtype, val_set.ignore, ap_mode)
            last_val_score = val.score
            row.update({"val/loss": val.loss, **{f"val/{name}": value for name, value in val.metrics.items()}})
            # ties in top-1 are common on small validation sets: the lower loss breaks them
            improved = val.score > best_score or (val.score == best_score and val.loss < best_loss)
            if improved:
                best_score, best_loss, best_epoch, epochs_without_gain = val.score, val.loss, epoch, 0
            else:
                epochs_without_gain += 1
        row["lr"] = optimizer.param_groups[0]["lr"]
        epoch_times.append(epoch_seconds)
        history.append(row)
        if runtime.is_main:
            if logger is not None:
                for name, value in row.items():
                    logger.log_metric(name, value)
                logger.next_step()
            if improved:
                save_checkpoint(checkpoint_dir / "best.pt", model,
                                {**checkpoint_meta, "epoch": epoch, "val_score": val.score})
        if recipe.patience and epochs_without_gain >= recipe.patience:
            stopped_early = True
            break

    if runtime.is_main:
        save_checkpoint(checkpoint_dir / "last.pt", model,
                        {**checkpoint_meta, "epoch": epoch, "val_score": last_val_score})
    return FitResult(
        best_epoch=best_epoch,
        score_name="mAP" if multilabel else "top1",
        best_val_score=best_score,
        last_epoch=epoch,
        last_val_score=last_val_score,
        stopped_early=stopped_early,
        train_seconds=train_seconds,
        images_per_second=seen / max(train_seconds, 1e-9),
        history=history,
        epoch_seconds=epoch_times,
    )


def _float32(output: Any) -> Any:
    """A Student/TeacherOutput with every tensor in float32."""
    return output._replace(**{k: v.float() for k, v in output._asdict().items() if v is not None})


def recipe_from_dict(values: dict[str, Any]) -> Recipe:
    known = set(Recipe.__dataclass_fields__)
    return Recipe(**{k: v for k, v in values.items() if k in known})
