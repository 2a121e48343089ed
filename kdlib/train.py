"""The one training loop: teacher, baseline, feature alignment and distillation all run a :class:`Trainer`
(:func:`fit` builds one and runs it).

The objective decides what is learned (:mod:`kdlib.losses`) and what each step computes: the
student's pooled features or its distillation head when the method needs them, and the
teacher's output from an optional ``teacher`` callable (:class:`kdlib.teacher.OnlineTeacher`
or :class:`kdlib.teacher_cache.CachedTeacher`: the loop does not know which). Training images
are replayable views (:mod:`kdlib.data.views`), so a cached teacher output belongs to exactly
the view the student sees. Logging and checkpointing happen only on the main process
(:class:`kdlib.runtime.Runtime`), so running under ``torchrun`` needs only a DDP wrapper.
"""
from __future__ import annotations

import logging
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from kdlib import distributed

from kdlib.checkpoint import ModelRecord, save_checkpoint
from kdlib.data.dataset import IndexedImageDataset
from kdlib.data.transforms import BatchNormalizer
from kdlib.data.views import AugmentedViews, make_view_seeds
from kdlib.features import prediction_logits
from kdlib.logline import PhaseLog, on_terminal
from kdlib.losses.base import Method
from kdlib.losses.registry import Progress, TeacherOutput
from kdlib.machine import describe as describe_machine
from kdlib.machine import label as machine_label
from kdlib.metrics import EvalResult, evaluate
from kdlib.resume import ResumeStore, ResumeWarning, restore_file, restore_rng
from kdlib.runtime import Runtime, has_native_kernels, make_loader
from kdlib.schema import is_bool, is_float, is_int, one_of, setting

# (normalized images, image positions, view indices) -> the teacher's output on those views
TeacherFn = Callable[[Tensor, Tensor, Tensor], TeacherOutput]
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
log = logging.getLogger(__name__)
# Steps between two looks at the losses for NaN/inf: each look waits for the device (one sync), and a
# diverged run wastes at most this many steps before it stops.
FINITE_CHECK_EVERY = 20


class NonFiniteError(FloatingPointError):
    """Training diverged: a loss term, the gradient norm or the validation loss is NaN or infinite.

    A diverged run is never a result: the stage stops, and its staged outputs (checkpoints of the
    epochs before, logs) are discarded, so DVC caches nothing (DeiT's main.py exits on a non-finite
    loss for the same reason). The resume state of the last finished epoch is kept: it was finite."""


class _FiniteWatch:
    """The losses (and the gradient norm) of recent steps, kept on the device and checked for NaN/inf
    every :data:`FINITE_CHECK_EVERY` steps and at the end of the epoch, so a GPU run does not wait on
    every step. The error names the epoch, the first bad step and each non-finite term."""

    def __init__(self, epoch: int, steps: int) -> None:
        self.epoch, self.steps = epoch, steps
        self.pending: list[tuple[int, list[str], Tensor]] = []

    def add(self, step: int, values: dict[str, Tensor], device: torch.device) -> None:
        row = torch.stack([torch.as_tensor(v, device=device).detach().float().reshape(()) for v in values.values()])
        self.pending.append((step, list(values), row))
        if len(self.pending) >= FINITE_CHECK_EVERY:
            self.check()

    def check(self) -> None:
        if not self.pending:
            return
        shapes = {len(names) for _, names, _ in self.pending}
        rows = torch.stack([t for _, _, t in self.pending]) if len(shapes) == 1 else None
        finite = torch.isfinite(rows).all(dim=1).tolist() if rows is not None else \
            [bool(torch.isfinite(t).all()) for _, _, t in self.pending]  # one sync for the window
        pending, self.pending = self.pending, []
        for ok, (step, names, values) in zip(finite, pending):
            if not ok:
                found = [f"{name} = {float(v)}" for name, v in zip(names, values.tolist()) if not math.isfinite(v)]
                raise NonFiniteError(
                    f"training diverged at epoch {self.epoch}, step {step} of {self.steps}: {', '.join(found)} "
                    "(every term of that step: " + ", ".join(f"{n} = {float(v):.6g}" for n, v in zip(names, values.tolist()))
                    + "). Nothing was written. A too high lr (or temperature, weight decay), fp16 without loss "
                    "scaling or a bad input gives this; lower the lr, set grad_clip, or check the data")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Optimization recipe of one training run: the training half of a model preset.

    ``eval_batch_size`` and ``num_workers`` are the run's loader settings, not the preset's.
    """

    epochs: int = setting(is_int(1))
    batch_size: int = setting(is_int(1))
    lr: float = setting(is_float(0, lo_open=True))
    # how lr follows the global batch (batch_size x processes): none (lr as given), linear
    # (lr x global / lr_base_batch: Goyal et al. 2017, DeiT's lr x batch x world / 512) or sqrt
    lr_scaling: str = setting(one_of("none", "linear", "sqrt"), "none")
    lr_base_batch: int = setting(is_int(1), 256)
    optimizer: str = setting(one_of("sgd", "adamw"), "sgd", required=True)
    momentum: float = setting(is_float(0, 1, hi_open=True), 0.9)
    nesterov: bool = setting(is_bool, False)
    weight_decay: float = setting(is_float(0), 5e-4)
    schedule: str = setting(one_of("cosine", "step", "constant"), "cosine", required=True)
    warmup_epochs: int = setting(is_int(0), 0)
    min_lr: float = setting(is_float(0), 0.0)
    step_epochs: int = setting(is_int(1), 30)
    step_gamma: float = setting(is_float(0, 1, lo_open=True), 0.1)
    label_smoothing: float = setting(is_float(0, 1, hi_open=True), 0.0)
    patience: int = setting(is_int(0), 0)  # epochs without a better val score before stopping; 0 = never
    grad_clip: float = setting(is_float(0), 0.0)  # max grad norm; 0 = off
    channels_last: bool = setting(is_bool, False)
    amp: str = setting(one_of("none", "bf16", "fp16"), "none")
    # this model's training augmentation instead of the data set's: null (the data set's), a preset name
    # (`none`: Hinton et al. 2015 jitter their teacher's images but train the student on plain ones), or
    # {preset: {options}}. One key, so that dvc.yaml can name it in every preset.
    augment: str | dict[str, Any] | None = setting(lambda v: None if v is None or isinstance(v, (str, dict)) else
                                                   "null, an augmentation preset name, or {preset: {options}}",
                                                   None, required=True)
    eval_batch_size: int = setting(is_int(1), 256, context=True)
    num_workers: int = setting(is_int(0), 0, context=True)

    @property
    def augmentation(self) -> tuple[str, dict[str, Any]] | None:
        """``(preset, options)`` of ``augment``; None: the data set's."""
        if self.augment is None:
            return None
        if isinstance(self.augment, str):
            return self.augment, {}
        (name, options), = self.augment.items()
        return name, dict(options or {})

    def problems(self) -> list[tuple[str | None, str]]:
        from kdlib.data.transforms import TRAIN_PRESETS, augment_option_problems

        names = ", ".join(TRAIN_PRESETS.names())
        if isinstance(self.augment, dict) and (len(self.augment) != 1 or not isinstance(
                next(iter(self.augment.values())) or {}, dict)):
            return [("augment", f"expected one {{preset: {{options}}}} entry; presets: {names}")]
        found = self.augmentation
        if found is None:
            return []
        if found[0] not in TRAIN_PRESETS:
            return [("augment", f"expected null (the data set's augmentation) or one of: {names}")]
        return [(None, f"augment.{found[0]}.{key.removeprefix('augment_options.')}: {text}")
                for key, text in augment_option_problems(*found)]

    def scaled_lr(self, global_batch: int) -> float:
        """The base lr the optimizer gets for ``global_batch`` images per step."""
        ratio = global_batch / self.lr_base_batch
        return self.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.lr_scaling]

    def lr_rule(self, global_batch: int) -> str:
        if self.lr_scaling == "none":
            return f"lr {self.lr:g} as set (lr_scaling: none)"
        factor = f"{global_batch}/{self.lr_base_batch}" if self.lr_scaling == "linear" else \
            f"sqrt({global_batch}/{self.lr_base_batch})"
        return f"lr {self.lr:g} x {factor} = {self.scaled_lr(global_batch):.6g} ({self.lr_scaling} scaling)"


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
    world_size: int = 1
    global_batch: int = 0
    lr: float = 0.0  # the optimizer's base lr after lr_scaling
    lr_rule: str = ""
    resumed_from_epoch: int = 0  # the last epoch a killed run had finished; 0: trained from the start
    peak_cuda_memory_bytes: int | None = None
    machine: str = ""  # what rank 0 ran on: kdlib.machine.label, e.g. "AMD EPYC, 2 cores"

    def summary(self) -> dict[str, Any]:
        """The reproducible figures of the run (what a metrics file holds)."""
        return {"best_epoch": self.best_epoch, f"best_val_{self.score_name}": self.best_val_score,
                "last_epoch": self.last_epoch, f"last_val_{self.score_name}": self.last_val_score,
                "stopped_early": self.stopped_early, "world_size": self.world_size,
                "global_batch": self.global_batch, "base_lr": self.lr, "lr_rule": self.lr_rule}

    def describe(self, role: str) -> str:
        """One line for the log."""
        resumed = f"; resumed after epoch {self.resumed_from_epoch}" if self.resumed_from_epoch else ""
        return (f"{role}: best val {self.score_name} {self.best_val_score:.2f} (epoch {self.best_epoch}), last "
                f"{self.last_val_score:.2f}; {self.world_size} process(es), global batch {self.global_batch}; "
                f"{self.train_seconds:.1f} s{resumed}")

    def timing(self) -> dict[str, Any]:
        """The wall-clock figures, which vary run to run (kept apart from the metrics)."""
        out = {"train_seconds": round(self.train_seconds, 2),
               "train_images_per_second": round(self.images_per_second, 1),
               "epoch_seconds": [round(s, 3) for s in self.epoch_seconds],
               "resumed_from_epoch": self.resumed_from_epoch, "machine": self.machine}
        if self.peak_cuda_memory_bytes is not None:
            out["peak_cuda_memory_bytes"] = self.peak_cuda_memory_bytes
        return out


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


def build_optimizer(model: nn.Module, recipe: Recipe, lr: float | None = None,
                    extra: Sequence[nn.Parameter] = (), extra_options: Mapping[str, float | None] | None = None
                    ) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``model``'s trainable parameters and ``extra`` (a method's own,
    :meth:`kdlib.losses.base.Method.trainable_parameters`), which follow the same weight-decay rule unless
    ``extra_options`` (:meth:`~kdlib.losses.base.Method.optimizer_options`) give them their own lr scale or
    weight decay: then they form groups of their own (the schedule scales every group alike)."""
    # No weight decay on biases and norm parameters (1-d tensors), nor on what the model itself
    # exempts (timm's no_weight_decay(): position embeddings, class/distillation tokens), as
    # timm and DeiT do.
    exempt = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name in exempt else decay).append(param)
    lr = recipe.lr if lr is None else lr
    options = {"lr_scale": 1.0, "weight_decay": None, **(extra_options or {})}
    own_groups = options["lr_scale"] != 1.0 or options["weight_decay"] is not None
    own_decay: list[nn.Parameter] = []
    own_no_decay: list[nn.Parameter] = []
    for param in extra:
        if own_groups:
            (own_no_decay if param.ndim <= 1 and options["weight_decay"] is None else own_decay).append(param)
        else:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if own_groups:
        own_lr = lr * float(options["lr_scale"])
        wd = recipe.weight_decay if options["weight_decay"] is None else float(options["weight_decay"])
        groups += [{"params": own_decay, "weight_decay": wd, "lr": own_lr},
                   {"params": own_no_decay, "weight_decay": 0.0, "lr": own_lr}]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, nesterov=recipe.nesterov)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}; known: sgd, adamw")


@dataclass
class TrainData:
    """What :func:`fit` trains and validates on.

    ``view_seeds`` ``(N, K)``: epoch ``e`` trains on view ``(e − 1) mod K`` of every image (a
    teacher cache's views); ``None``: a fresh view per epoch, seeded by the run's seed. ``mix``
    (:func:`kdlib.data.transforms.build_mix`) mixes each normalized training batch; ``ap_mode``
    and ``multilabel_convention`` are the multi-label scoring rules of validation.
    """

    train_set: IndexedImageDataset
    val_set: IndexedImageDataset
    normalizer: BatchNormalizer
    view_seeds: Tensor | None = None
    mix: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None
    ap_mode: str = "voc"
    multilabel_convention: str = "kdlib"


@dataclass
class Selection:
    """Checkpoint selection and early stopping, as state that can be saved and restored.

    The best epoch has the highest validation score, ties broken by the lower validation loss
    (ties in top-1 are common on small validation sets); training stops after ``patience``
    epochs without a better one (0: never).
    """

    patience: int = 0
    best_score: float = -1.0
    best_loss: float = math.inf
    best_epoch: int = 0
    epochs_without_gain: int = 0

    def update(self, epoch: int, score: float, loss: float) -> bool:
        """Record epoch ``epoch``'s validation result; True when it is the new best."""
        improved = score > self.best_score or (score == self.best_score and loss < self.best_loss)
        if improved:
            self.best_score, self.best_loss, self.best_epoch, self.epochs_without_gain = score, loss, epoch, 0
        else:
            self.epochs_without_gain += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.epochs_without_gain >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def validate(model: nn.Module, data: TrainData, loader: torch.utils.data.DataLoader, device: torch.device,
             recipe: Recipe) -> EvalResult:
    """The validation split's loss and metrics, in the training precision."""
    return evaluate(model, loader, data.normalizer, device, AMP_DTYPES[recipe.amp], data.val_set.ignore,
                    data.ap_mode, data.multilabel_convention)


def reseed(seed: int) -> None:
    """Seed torch (CPU and CUDA), NumPy and ``random`` for this process's own draws (dropout,
    drop-path, MixUp): DeiT and timm use ``seed + rank``, so processes do not drop the same units."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """One training run as explicit state: the model and the method, optimizer, lr schedule, loss scaler,
    checkpoint :class:`Selection`, history and counters, with one method per concern: :meth:`train_epoch`,
    :meth:`validate`, :meth:`end_epoch`, :meth:`save_state` (resume), :meth:`run` (all epochs) and
    :meth:`result`. :meth:`state_dict` / :meth:`load_state_dict` hold everything a resumed run needs
    besides the RNG streams (:mod:`kdlib.resume` keeps those per process), so a run killed after epoch ``k``
    and resumed ends byte-identical to one never stopped.

    Construction moves the model and the method to ``runtime.device``, builds the loaders and the optimizer
    (the student's parameters and the method's own, :meth:`Method.trainable_parameters`, in one optimizer),
    and checks what the method needs (a teacher, a distillation head) before any step. Arguments are
    :func:`fit`'s.
    """

    def __init__(self, model: nn.Module, objective: Method, recipe: Recipe, data: TrainData, out_dir: Path,
                 record: ModelRecord, seed: int, teacher: TeacherFn | None = None, logger: MetricsLogger | None = None,
                 runtime: Runtime = Runtime(), progress: bool = True, select_best: bool = True,
                 compile: bool = False, sync_bn: bool = False) -> None:
        if objective.needs_teacher and teacher is None:
            raise ValueError(f"{type(objective).__name__} needs a teacher")
        if objective.uses_distillation_token and not hasattr(model, "set_distilled_training"):
            raise ValueError(f"{type(objective).__name__} needs a student with a distillation token "
                             f"(timm's *_distilled_* models); {type(model).__name__} has none")
        self.model, self.objective, self.recipe, self.data = model, objective, recipe, data
        self.out_dir, self.record, self.seed, self.teacher = Path(out_dir), record, seed, teacher
        self.logger, self.runtime, self.select_best = logger, runtime, select_best
        self.progress = progress and runtime.is_main
        self.device = device = runtime.device
        model.to(device)
        data.normalizer.to(device)
        objective.to(device)  # buffers such as LSH hyperplanes live where the features are
        if recipe.channels_last:
            model.to(memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        view_seeds = data.view_seeds if data.view_seeds is not None else make_view_seeds(
            seed, len(data.train_set), recipe.epochs)
        self.views = AugmentedViews(data.train_set, view_seeds)
        self.train_loader = make_loader(self.views, recipe.batch_size, True, seed, runtime, recipe.num_workers)
        self.val_loader = make_loader(data.val_set, recipe.eval_batch_size, False, seed, runtime, recipe.num_workers)
        self.global_batch = recipe.batch_size * runtime.world_size
        self.base_lr = recipe.scaled_lr(self.global_batch)
        # the method's own parameters (a regressor, a head) train, clip and average with the student's; they
        # start as rank 0's on every process, as DDP does for the student's
        self.own = own_parameters(objective)
        distributed.broadcast_parameters(self.own)
        self.optimizer = build_optimizer(model, recipe, self.base_lr, self.own,
                                         objective.optimizer_options() if isinstance(objective, Method) else None)
        steps_per_epoch = len(self.train_loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, steps_per_epoch, recipe))
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
        self.scaler = torch.amp.GradScaler(device.type, enabled=recipe.amp == "fp16")
        self.amp_dtype = AMP_DTYPES[recipe.amp]
        if self.amp_dtype is not None and not has_native_kernels(self.amp_dtype, device):
            warnings.warn(f"amp: {recipe.amp} on a CPU without native {recipe.amp} kernels "
                          f"({torch.backends.cpu.get_cpu_capability()}) is emulated and several times slower than "
                          "fp32; set amp: none in the model preset", stacklevel=3)
        if objective.uses_distillation_token:
            model.set_distilled_training(True)  # training returns (class, distillation) logits
        self.multilabel = data.train_set.multi_hot is not None
        # progress: what a resumed run restores (state_dict)
        self.selection = Selection(recipe.patience if select_best else 0)
        self.history: list[dict[str, float]] = []
        self.epoch_seconds: list[float] = []
        self.seen, self.train_seconds, self.last_val_score, self.epoch, self.resumed_from = 0, 0.0, 0.0, 0, 0
        reseed(seed + runtime.rank)
        layers = objective.student_layer_paths() if isinstance(objective, Method) else ()
        self._compile, self._sync_bn, self._layers = compile, sync_bn, layers
        self.step: nn.Module | None = None  # the student as the step calls it: built by run()

    # ---- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run restores except the RNG streams: weights, optimizer, schedule, loss
        scaler, the method's state (its parameters and buffers), selection, history and counters."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "objective": self.objective.state_dict() if isinstance(self.objective, nn.Module) else None,
                "selection": self.selection.state_dict(), "history": self.history,
                "epoch_seconds": self.epoch_seconds, "seen": self.seen, "train_seconds": self.train_seconds,
                "last_val_score": self.last_val_score}

    def load_state_dict(self, state: dict[str, Any], epoch: int) -> None:
        """Continue after ``epoch``, from :meth:`state_dict`'s ``state`` of that epoch."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if state.get("objective") is not None and isinstance(self.objective, nn.Module):
            self.objective.load_state_dict(state["objective"])
        self.selection.load_state_dict(state["selection"])
        self.history, self.epoch_seconds = list(state["history"]), list(state["epoch_seconds"])
        self.seen, self.train_seconds = state["seen"], state["train_seconds"]
        self.last_val_score, self.epoch = state["last_val_score"], epoch
        self.resumed_from = epoch

    def resume(self, store: ResumeStore) -> bool:
        """Load ``store``'s state of this run, if every process has the same epoch's: the model, the
        checkpoint files written so far and the RNG streams; the logger replays the finished epochs.
        Returns whether a state was loaded."""
        saved = store.load()
        found = distributed.all_gather_objects(saved[0]["epoch"] if saved is not None else 0)
        if len(set(found)) > 1:  # e.g. a machine whose store lost a state: resuming apart would diverge
            warnings.warn(f"the processes found resume states of different epochs ({found}); training from the "
                          "start", ResumeWarning, stacklevel=2)
            return False
        if saved is None:
            return False
        state, rng, files = saved
        self.load_state_dict(state, state["epoch"])
        if self.runtime.writes_outputs:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for name, path in files.items():
                restore_file(path, self.out_dir, name)  # a bare kept name, read through no symlink
            if self.logger is not None:  # the run's log restarts empty: replay the finished epochs
                for row in self.history:
                    self._log(row)
        restore_rng(rng)
        if self.runtime.is_main:
            log.info("resuming from epoch %d of %d (state saved in %s)", self.epoch, self.recipe.epochs,
                     store.directory)
        return True

    def save_state(self, store: ResumeStore) -> None:
        """Save this epoch's whole state (and ``best.pt`` so far) in ``store``."""
        best = self.out_dir / "best.pt"
        store.save(self.epoch, self.state_dict(), {"best.pt": best} if best.is_file() else {}, distributed.barrier)

    # ---- one epoch -----------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> tuple[dict[str, float], int]:
        """Train one epoch; returns the epoch's mean loss terms (and train top-1 for single-label data)
        over every process's images, and the number of images seen by all."""
        if self.step is None:
            raise RuntimeError("Trainer.train_epoch runs inside Trainer.run (the student's step is built there)")
        model, objective, recipe, device, data = self.model, self.objective, self.recipe, self.device, self.data
        batch_transform = data.train_set.batch_transform
        loader = self.train_loader
        loader.sampler.set_epoch(epoch - 1)  # type: ignore[union-attr]
        self.step.train()
        sums: dict[str, Tensor | float] = {}
        correct: Tensor | int = 0
        count = 0
        watch = _FiniteWatch(epoch, len(loader))
        # fp16's GradScaler expects inf gradients now and then (it skips those steps and lowers its scale)
        check_grads = not self.scaler.is_enabled()
        params = [p for p in model.parameters() if p.requires_grad] + self.own
        constrain = getattr(model, "apply_constraints", None)
        uses_progress = getattr(objective, "uses_progress", False)
        uses_positions = getattr(objective, "uses_positions", False)
        # disable=None: a progress bar on a terminal, nothing in a log file
        batches = tqdm(loader, desc=f"epoch {epoch}/{recipe.epochs}", leave=False,
                       disable=None if self.progress else True)
        # where no bar draws (a batch job's log), a line every minute within a long epoch
        phase = PhaseLog(f"{self.record.role or 'train'} epoch {epoch}/{recipe.epochs}", len(loader), "steps",
                         every=60.0, enabled=self.progress and not on_terminal())
        for step, (images, targets, positions, view_ids) in enumerate(batches, start=1):
            images = images.to(device, non_blocking=True)
            if batch_transform is not None:
                images = batch_transform(images, self.views.batch_seeds(positions, view_ids))
            images = data.normalizer(images)
            targets = targets.to(device, non_blocking=True)
            if data.mix is not None:  # MixUp/CutMix: the teacher below sees the same mixed images
                images, targets = data.mix(images, targets)
            # the teacher runs in its own precision (float32), not the student's autocast: its
            # outputs are then the same online and from the cache
            teacher_out = self.teacher(images, positions, view_ids) if self.teacher is not None else None
            with torch.autocast(device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                student = self.step(images)
            student = _float32(student)  # losses in fp32 whatever the autocast dtype
            context: dict[str, Any] = {}
            if uses_progress:
                context["progress"] = Progress(epoch, recipe.epochs, step, len(loader))
            if uses_positions:
                context["positions"] = positions.to(device, non_blocking=True)
            out = objective(student, targets, _float32(teacher_out) if teacher_out is not None else None, **context)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(out.total).backward()
            if self.own:  # DDP averages the student's gradients over processes; the method's are averaged here
                distributed.average_gradients(self.own)
            grad_norm = None
            if recipe.grad_clip:
                self.scaler.unscale_(self.optimizer)
                grad_norm = nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            elif check_grads:  # a norm over the gradients, no clipping: the step is unchanged
                grad_norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            watch.add(step, {"loss": out.total, **out.terms,
                             **({"grad_norm": grad_norm} if check_grads and grad_norm is not None else {})},
                      out.total.device)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if constrain is not None:  # e.g. max-norm (kdlib.models.mlp): after every update, as Hinton et al. 2012
                constrain()
            self.scheduler.step()
            # accumulate on the device: a float() per step would wait for the GPU every step
            n = len(targets)
            count += n
            if not self.multilabel:  # with mixed soft targets, against their dominant class
                labels = targets.argmax(dim=1) if targets.ndim == 2 else targets
                correct = correct + (prediction_logits(student).detach().argmax(dim=1) == labels).sum()
            for name, value in {"loss": out.total.detach(), **out.terms}.items():
                sums[name] = sums.get(name, 0.0) + value * n
            phase.update(1, lambda: f"loss {float(sums['loss']) / count:.4f}  lr {self.optimizer.param_groups[0]['lr']:.3g}")
        watch.check()
        # one all-reduce of every sum: the logged epoch means are over all processes' images
        names = list(sums)
        totals = distributed.all_reduce_sum(torch.stack(
            [torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in names]
            + [torch.as_tensor(correct, dtype=torch.float64, device=device),
               torch.tensor(float(count), dtype=torch.float64, device=device)])).cpu()
        count_all = float(totals[-1])
        row = {f"train/{k}": float(v) / count_all for k, v in zip(names, totals[:-2])}
        if not self.multilabel:
            row["train/top1"] = 100.0 * float(totals[-2]) / count_all
        return row, int(count_all)

    def validate(self, epoch: int) -> tuple[float, float, dict[str, float]]:
        """Rank 0's validation score, loss and metrics, shared with every process. Raises
        :class:`NonFiniteError` when any is not finite."""
        result = None
        if self.runtime.is_main:
            val = validate(self.model, self.data, self.val_loader, self.device, self.recipe)
            result = (val.score, val.loss, val.metrics)
        score, loss, metrics = distributed.broadcast_object(result)
        bad = {name: value for name, value in {"loss": loss, "score": score, **metrics}.items()
               if isinstance(value, float) and not math.isfinite(value)}
        if bad:
            raise NonFiniteError(f"validation after epoch {epoch}: " + ", ".join(f"{k} = {v}" for k, v in bad.items())
                                 + ": the model's outputs are not finite; nothing was written")
        return score, loss, metrics

    def end_epoch(self, epoch: int, row: dict[str, float], count: int, seconds: float) -> None:
        """Validate (when selecting), update the selection and counters, log the epoch's row and write
        ``best.pt`` when it is the best so far."""
        self.train_seconds += seconds
        self.seen += count
        self.epoch = epoch
        improved = False
        distributed.sync_buffers(self.model)  # every process validates and saves rank 0's BatchNorm statistics
        if self.select_best:
            score, loss, metrics = self.validate(epoch)
            self.last_val_score = score
            row.update({"val/loss": loss, **{f"val/{name}": value for name, value in metrics.items()}})
            improved = self.selection.update(epoch, score, loss)
        else:
            row.pop("train/top1", None)  # the classifier is frozen: its accuracy says nothing
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        self.epoch_seconds.append(seconds)
        self.history.append(row)
        if self.progress:
            log.info("%s", self.epoch_line(epoch, row, count))
        if self.runtime.writes_outputs:
            if self.logger is not None:
                self._log(row)
            if improved:
                self._checkpoint("best.pt", {"epoch": epoch, "val_score": self.last_val_score})

    def epoch_line(self, epoch: int, row: dict[str, float], count: int) -> str:
        """The epoch in one log line, as timm and DeiT print it: in a batch job's log (``dvc queue logs``, a
        SLURM ``.out`` file) where no progress bar is drawn, each epoch still says where the run is."""
        seconds = self.epoch_seconds[-1]
        terms = {k.removeprefix("train/"): v for k, v in row.items() if k.startswith("train/") and k != "train/top1"}
        loss = terms.pop("loss", math.nan)
        parts = [f"{self.record.role or 'train'} epoch {epoch}/{self.recipe.epochs}",
                 f"loss {loss:.4f}" + (" (" + ", ".join(f"{k} {v:.4f}" for k, v in terms.items()) + ")" if terms else "")]
        if "train/top1" in row:
            parts.append(f"train top1 {row['train/top1']:.2f}")
        if self.select_best:
            name = "mAP" if self.multilabel else "top1"
            parts.append(f"val {name} {self.last_val_score:.2f} (best {self.selection.best_score:.2f} "
                         f"@ {self.selection.best_epoch})")
        left = self.recipe.epochs - epoch
        eta = sum(self.epoch_seconds[-3:]) / len(self.epoch_seconds[-3:]) * left
        parts += [f"lr {row['lr']:.3g}", f"{count / max(seconds, 1e-9):.0f} img/s", f"{seconds:.1f} s",
                  f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}"]
        return "  ".join(parts)

    def _log(self, row: dict[str, float]) -> None:
        for name, value in row.items():
            self.logger.log_metric(name, value)  # type: ignore[union-attr]
        self.logger.next_step()  # type: ignore[union-attr]

    def _checkpoint(self, name: str, meta: dict[str, Any]) -> None:
        """The student, and beside it the method's fitted state and the parameters it trained (a regressor,
        fusion modules: ``method_state["trained_parameters"]``, by name; evaluation never reads them)."""
        state = dict(self.objective.fitted_state())
        if self.own:
            state["trained_parameters"] = {name: p.detach().cpu().contiguous()
                                           for name, p in self.objective.named_parameters() if p.requires_grad}
        save_checkpoint(self.out_dir / name, self.model, {**self.record.as_meta(), **meta}, state)

    # ---- the run ---------------------------------------------------------------------------------------
    def run(self, resume: ResumeStore | None = None) -> FitResult:
        """Every epoch left (after a resumed state in ``resume``, which also gets each epoch's state), then
        ``last.pt``. Returns the :class:`FitResult`."""
        if resume is not None:
            self.resume(resume)
        step = distributed.wrap_student(self.model, self.objective.needs_features, self.device, self._sync_bn,
                                        self._layers)
        self.step = torch.compile(step) if self._compile else step
        try:
            for epoch in range(self.epoch + 1, self.recipe.epochs + 1):
                if self.selection.should_stop:  # a resumed run that had already stopped early
                    break
                start = time.perf_counter()
                row, count = self.train_epoch(epoch)
                self.end_epoch(epoch, row, count, time.perf_counter() - start)
                if resume is not None:
                    self.save_state(resume)
        finally:
            distributed.release_taps(step)
            self.step = None
        if self.runtime.writes_outputs:
            self._checkpoint("last.pt", {"epoch": self.epoch, "val_score": self.last_val_score})
        distributed.barrier()
        return self.result()

    def result(self) -> FitResult:
        return FitResult(
            best_epoch=self.selection.best_epoch,
            score_name="mAP" if self.multilabel else "top1",
            best_val_score=self.selection.best_score,
            last_epoch=self.epoch,
            last_val_score=self.last_val_score,
            stopped_early=self.selection.should_stop,
            train_seconds=self.train_seconds,
            images_per_second=self.seen / max(self.train_seconds, 1e-9),
            history=self.history,
            epoch_seconds=self.epoch_seconds,
            world_size=self.runtime.world_size,
            global_batch=self.global_batch,
            lr=self.base_lr,
            lr_rule=self.recipe.lr_rule(self.global_batch),
            resumed_from_epoch=self.resumed_from,
            peak_cuda_memory_bytes=int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None,
            machine=machine_label(describe_machine(self.device)),
        )


def fit(
    model: nn.Module,
    objective: Method,
    recipe: Recipe,
    data: TrainData,
    out_dir: Path,
    record: ModelRecord,
    seed: int,
    teacher: TeacherFn | None = None,
    logger: MetricsLogger | None = None,
    runtime: Runtime = Runtime(),
    progress: bool = True,
    select_best: bool = True,
    resume: ResumeStore | None = None,
    compile: bool = False,
    sync_bn: bool = False,
) -> FitResult:
    """Train ``model`` with ``objective`` (a :class:`Trainer`'s whole run); write ``best.pt`` (the
    :class:`Selection`'s best epoch: val top-1, or mAP for multi-hot targets) and ``last.pt`` into
    ``out_dir``, each with ``record`` and the objective's fitted state.

    With ``select_best=False`` (feature alignment, whose classifier is not being trained)
    nothing is validated and only ``last.pt`` is written. The test split never enters here:
    model selection and early stopping use ``data.val_set`` only.

    Under several processes (``runtime.distributed``) the student trains in DDP, each process on
    its shard of every global batch (``recipe.batch_size`` per process); rank 0 validates and
    every process takes its decision (:mod:`kdlib.distributed`); each machine's local rank 0
    writes ``out_dir`` and logs. ``resume``: save the whole state after every epoch there and,
    if it holds a state of this run, continue after its last epoch (:mod:`kdlib.resume`).
    ``compile``: ``torch.compile`` the training step. ``sync_bn``: SyncBatchNorm under DDP (CUDA).
    """
    return Trainer(model, objective, recipe, data, out_dir, record, seed, teacher, logger, runtime, progress,
                   select_best, compile, sync_bn).run(resume)


def own_parameters(objective: Any) -> list[nn.Parameter]:
    """The parameters a training objective trains beside the student (:meth:`Method.trainable_parameters`;
    none for an objective that is not a :class:`Method`)."""
    return objective.trainable_parameters() if isinstance(objective, Method) else []


def _float32(output: Any) -> Any:
    """A Student/TeacherOutput with every tensor in float32."""
    return output._replace(**{k: tuple(t.float() for t in v) if isinstance(v, tuple) else v.float()
                              for k, v in output._asdict().items() if v is not None})
