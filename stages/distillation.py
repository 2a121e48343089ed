"""What the align, teacher_cache and distill stages share: the method, the student, the teacher
and the training views, all resolved from params.yaml in one place."""
from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdlib.checkpoint import model_from_checkpoint
from kdlib.data.dataset import IndexedImageDataset
from kdlib.data.index import DatasetIndex
from kdlib.data.views import AugmentedViews, make_view_seeds
from kdlib.features import FeatureStudent, feature_width, make_feature_student
from kdlib.losses import METHODS, MULTILABEL, method_fits_task
from kdlib.models import build_model
from kdlib.runtime import Runtime
from kdlib.teacher import OnlineTeacher
from kdlib.teacher_cache import TeacherCache, build_teacher_cache, cache_key
from kdlib.train import Recipe, recipe_from_dict
from stages.common import Workspace, load_split, normalizer_for
from stages.params import model_spec


def fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def method_name(params: dict[str, Any]) -> str:
    return params["distill"]["method"]


def method_class(params: dict[str, Any]) -> type:
    return METHODS.get(method_name(params))


def student_recipe(params: dict[str, Any]) -> Recipe:
    return recipe_from_dict({**params["models"][params["student"]], "eval_batch_size": params["eval"]["batch_size"],
                             "num_workers": params["data"]["num_workers"]})


def align_recipe(params: dict[str, Any]) -> Recipe:
    """The student's recipe (batch size, amp, memory format) with the ``align`` optimizer."""
    a = params["align"]
    return replace(student_recipe(params), epochs=a["epochs"], optimizer=a["optimizer"], lr=a["lr"],
                   momentum=a.get("momentum", 0.9), weight_decay=a.get("weight_decay", 0.0), warmup_epochs=0,
                   patience=0)


def checkpoint_meta(params: dict[str, Any], index: DatasetIndex, role: str, model: nn.Module) -> dict[str, Any]:
    """What :func:`kdlib.checkpoint.model_from_checkpoint` needs, and where the model came from."""
    spec = model_spec(params, params["teacher" if role == "teacher" else "student"])
    meta = index.meta
    return {
        "role": role, "preset": spec.name, "arch": spec.arch, "model_kwargs": spec.kwargs,
        "num_classes": meta.num_classes, "in_chans": meta.channels, "classes": meta.classes,
        "input_size": spec.input_size or meta.image_size, "mean": meta.mean, "std": meta.std,
        "dataset": meta.name, "seed": params["seed"],
        "feature_student": model.config() if isinstance(model, FeatureStudent) else None,
    }


def build_method(params: dict[str, Any], task: str, recipe: Recipe, **overrides: float) -> nn.Module:
    """The chosen method with its knobs, and the context its constructor takes (the student's
    label smoothing for a multiclass hard term, the task for methods that fit both)."""
    name, cls = method_name(params), method_class(params)
    if not method_fits_task(cls, task):
        fits = [m for m in METHODS.names() if method_fits_task(METHODS.get(m), task)
                and getattr(METHODS.get(m), "needs_teacher", False)]
        fail(f"distill.method = {name!r} does not fit a {task} data set; use one of: {', '.join(fits)}")
    accepted = inspect.signature(cls).parameters
    context: dict[str, Any] = {}
    if "label_smoothing" in accepted and task != MULTILABEL:
        context["label_smoothing"] = recipe.label_smoothing
    if "multilabel" in accepted:
        context["multilabel"] = task == MULTILABEL
    return cls(**{**params["distill"][name], **overrides}, **context)


def train_sets(params: dict[str, Any], index: DatasetIndex) -> tuple[IndexedImageDataset, IndexedImageDataset]:
    preset = params["datasets"][params["dataset"]]
    input_size = model_spec(params, params["student"]).input_size
    return load_split(index, "train", preset, input_size, True), load_split(index, "val", preset, input_size, False)


def num_views(params: dict[str, Any]) -> int:
    """K: the cache's views per image; by default one per student epoch (a fresh view each epoch)."""
    return params["teacher_cache"]["views"] or params["models"][params["student"]]["epochs"]


def training_view_seeds(params: dict[str, Any], num_images: int) -> Tensor:
    """The views the student trains on; the teacher cache is built on exactly these."""
    views = num_views(params) if params["teacher_cache"]["enabled"] else params["models"][params["student"]]["epochs"]
    return make_view_seeds(params["seed"], num_images, views)


def expected_cache_key(params: dict[str, Any], index: DatasetIndex, ws: Workspace) -> dict[str, str]:
    """What a teacher cache must have been built from to serve this distillation run."""
    preset = params["datasets"][params["dataset"]]
    spec = model_spec(params, params["student"])
    transform = {key: preset.get(key) for key in ("augment", "augment_options", "image_size", "mean", "std",
                                                   "eval_crop_pct", "channels")}
    transform["input_size"] = spec.input_size or index.meta.image_size
    return cache_key(ws.teacher_checkpoint, [ws.prepared / "index.csv", ws.prepared / "dataset.json"], transform,
                     num_views(params), params["seed"])


def refuse_mixing_with_cache(params: dict[str, Any]) -> None:
    preset = params["datasets"][params["dataset"]]
    if params["teacher_cache"]["enabled"] and (preset.get("mixup") or preset.get("cutmix")):
        fail(f"datasets.{params['dataset']}: MixUp/CutMix mix pairs of images per batch, and the teacher must see "
             "the mixed batch, so its outputs cannot be cached per view; set -S teacher_cache.enabled=false")


def load_teacher(index: DatasetIndex, runtime: Runtime, features: bool, ws: Workspace
                 ) -> tuple[OnlineTeacher, nn.Module]:
    """The trained teacher, adapting the student's batch to its input size and statistics."""
    model, meta = model_from_checkpoint(ws.teacher_checkpoint)
    teacher = OnlineTeacher(model.to(runtime.device), meta.get("input_size"), (index.meta.mean, index.meta.std),
                            (meta["mean"], meta["std"]), features=features)
    return teacher, model


def teacher_feature_width(teacher_model: nn.Module, ws: Workspace) -> int:
    meta = torch.load(ws.teacher_checkpoint, map_location="cpu", weights_only=True)["meta"]
    return feature_width(teacher_model, meta["in_chans"], meta["input_size"])


def build_student(params: dict[str, Any], index: DatasetIndex, objective: nn.Module) -> nn.Module:
    """The student preset, built right after seeding and before the teacher is loaded, so its
    initial weights are the baseline's (paired comparison)."""
    spec = model_spec(params, params["student"])
    meta = index.meta
    model = build_model(spec.arch, meta.num_classes, meta.channels, spec.pretrained, **spec.kwargs)
    if getattr(objective, "uses_distillation_token", False) and not hasattr(model, "set_distilled_training"):
        fail(f"distill.method = {method_name(params)!r} needs a student with a distillation token (timm's "
             f"*_distilled_* models, e.g. -S student=deit); student {spec.name!r} ({spec.arch}) has none")
    return model


def with_feat_fc(params: dict[str, Any], index: DatasetIndex, objective: nn.Module, model: nn.Module,
                 teacher_model: nn.Module, ws: Workspace) -> nn.Module:
    """For feature methods, the student wrapped with its ``feat_fc`` projection to the teacher's
    feature width; other methods get ``model`` back."""
    if not getattr(objective, "needs_features", False):
        return model
    input_size = model_spec(params, params["student"]).input_size or index.meta.image_size
    return make_feature_student(model, teacher_feature_width(teacher_model, ws), index.meta.channels, input_size,
                                objective.force_feat_fc)


def fit_lsh(objective: nn.Module, teacher_model: nn.Module, view0_features: Tensor, seed: int) -> None:
    """Seed 004's hyperplanes for an LSH method, from the teacher's features of one view per
    training image (the first, as the seed's one pass over its training loader)."""
    classifier = teacher_model.get_classifier()
    weight = (classifier[0] if isinstance(classifier, tuple) else classifier).weight.detach().cpu()
    objective.fit_hyperplanes(view0_features.float(), weight, seed)


def first_view_features(teacher: OnlineTeacher, train_set: IndexedImageDataset, view_seeds: Tensor,
                        params: dict[str, Any], index: DatasetIndex, runtime: Runtime) -> Tensor:
    """The teacher's pooled features of view 0 of every training image (one teacher pass)."""
    once = build_teacher_cache(teacher, AugmentedViews(train_set, view_seeds[:, :1]), normalizer_for(index),
                               runtime.device, params["teacher_cache"]["batch_size"], key={}, progress=False)
    return cached_first_view_features(once)


def cached_first_view_features(cache: TeacherCache) -> Tensor:
    positions = torch.arange(cache.num_images)
    return cache.features(positions, torch.zeros_like(positions))


def read_align_checkpoint(ws: Workspace) -> Path | None:
    path = ws.align / "last.pt"
    return path if path.is_file() else None
