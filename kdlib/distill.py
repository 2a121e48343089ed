"""Everything a distillation run sets up before its first step, in one place.

The align, teacher_cache and distill stages (and any script) get the same student, teacher and
training views from here: :func:`setup_distillation` builds the student (right after the
caller seeds, so its initial weights are the baseline's), loads the teacher, wraps the student
with its ``feat_fc`` for feature methods, picks the teacher's outputs (online, or the teacher
cache, checked against its key; or online, when the cache's marker says why it holds none), lets
the method fit its state (:meth:`Method.setup`) and
loads the aligned ``feat_fc``. Nothing here reads a parameter file.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from kdlib.checkpoint import Checkpoint, ModelRecord
from kdlib.data.dataset import IndexedImageDataset
from kdlib.data.index import DatasetMeta
from kdlib.data.spec import DatasetSpec
from kdlib.data.transforms import BatchNormalizer
from kdlib.data.views import AugmentedViews, make_view_seeds
from kdlib.features import FeatureStudent, feature_width, make_feature_student
from kdlib.losses.base import Method, SetupContext
from kdlib.models import ModelSpec
from kdlib.runtime import Runtime
from kdlib.schema import is_bool, is_float, is_int, one_of, optional, setting
from kdlib.taps import LayerPlan, layer_shapes, resolve_layers, stage_modules
from kdlib.teacher import OnlineTeacher
from kdlib.teacher_cache import (LAYERS_KEY, CachedTeacher, TeacherCache, _short, build_teacher_cache, cache_key,
                                 check_key, skipped_reason)
from kdlib.train import Recipe, TeacherFn

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class AlignSettings:
    """Feature alignment (LSHFM's stage 1): only the student's ``feat_fc`` is trained, with
    ``beta × (the method's feature terms)``, backbone and its BatchNorm statistics frozen."""

    epochs: int = setting(is_int(0))
    optimizer: str = setting(one_of("sgd", "adamw"))
    lr: float = setting(is_float(0, lo_open=True))
    momentum: float = setting(is_float(0, 1, hi_open=True), 0.9)
    weight_decay: float = setting(is_float(0), 0.0)
    beta: float = setting(is_float(0, lo_open=True))

    def recipe(self, student: Recipe) -> Recipe:
        """The student's recipe (batch size, amp, memory format) with this optimizer."""
        return replace(student, epochs=self.epochs, optimizer=self.optimizer, lr=self.lr, momentum=self.momentum,
                       weight_decay=self.weight_decay, warmup_epochs=0, patience=0)


@dataclass(frozen=True, kw_only=True)
class CacheSettings:
    """The teacher-output cache: ``views`` per image (None: one per student epoch), ``topk``
    logits kept per view when there are more classes (None: all), the teacher's batch size, and
    ``max_layer_mib``: the most MiB the outputs of the teacher layers a feature-map method reads
    may take in it (``N × K × Σ numel × 2`` bytes); beyond, distill runs the teacher online."""

    enabled: bool = setting(is_bool)
    views: int | None = setting(optional(is_int(1)), None, required=True)
    topk: int | None = setting(optional(is_int(1)), None, required=True)
    batch_size: int = setting(is_int(1))
    max_layer_mib: float = setting(is_float(0, lo_open=True))


@dataclass
class Distillation:
    """A student ready to train against a teacher: pass these to :func:`kdlib.train.fit`."""

    objective: Method
    student: nn.Module
    teacher: TeacherFn
    view_seeds: Tensor
    record: ModelRecord


def load_teacher(checkpoint: Checkpoint, data: DatasetMeta, runtime: Runtime, features: bool) -> OnlineTeacher:
    """The trained teacher, adapting the student's batch to its input size and statistics."""
    return OnlineTeacher(checkpoint.model().to(runtime.device), checkpoint.record.input_size,
                         (data.mean, data.std), (checkpoint.record.mean, checkpoint.record.std), features=features)


def teacher_cache_key(teacher: Path, data_files: Sequence[Path], dataset: DatasetSpec, input_size: int,
                      num_views: int, seed: int, transfer_classes: Sequence[int] | None = None,
                      teacher_layers: Sequence[str] = ()) -> dict[str, str]:
    """What a teacher cache must have been built from to serve this run. ``transfer_classes``: the classes
    of a transfer set that leaves some out (:mod:`kdlib.transfer`), whose images are the only ones cached;
    left out of the key when every class is in, so the keys of earlier caches stay valid.
    ``teacher_layers``: the teacher layer paths a feature-map method reads (its ``LayerPlan.teacher``),
    whose outputs the cache holds."""
    views = dataset.view_key(input_size)
    if transfer_classes is not None:
        views["transfer_classes"] = list(transfer_classes)
    return cache_key(teacher, data_files, views, num_views, seed, teacher_layers)


def first_view_features(teacher: OnlineTeacher, train_set: IndexedImageDataset, view_seeds: Tensor,
                        normalizer: BatchNormalizer, runtime: Runtime, batch_size: int) -> Tensor:
    """The teacher's pooled features of view 0 of every training image (one teacher pass)."""
    once = build_teacher_cache(teacher, AugmentedViews(train_set, view_seeds[:, :1]), normalizer, runtime.device,
                               batch_size, key={}, progress=False)
    return _view0_features(once)


def _view0_features(cache: TeacherCache) -> Tensor:
    positions = torch.arange(cache.num_images)
    return cache.features(positions, torch.zeros_like(positions))


def plan_layers(objective: Method, student: nn.Module, teacher: nn.Module, student_input: tuple[int, int],
                teacher_input: tuple[int, int], student_arch: str = "", teacher_arch: str = "") -> LayerPlan:
    """The layers a ``uses_layers`` method reads of ``student`` and ``teacher``, resolved to module paths,
    with their per-image shapes for ``(in_chans, input_size)`` inputs. Works on ``meta`` models (the
    check stage). Raises ``ValueError`` naming a layer that does not exist, unequal pairs, or a pairing
    the method refuses (:meth:`Method.layer_problem`)."""
    wanted_s, wanted_t = objective.layer_request(len(stage_modules(student)), len(stage_modules(teacher)))
    paths_s = resolve_layers(student, wanted_s, "student", student_arch)
    paths_t = resolve_layers(teacher, wanted_t, "teacher", teacher_arch)
    if len(paths_s) != len(paths_t) or not paths_s:
        raise ValueError(f"the student's layers pair with the teacher's one to one: got {len(paths_s)} student layers "
                         f"({', '.join(paths_s)}) and {len(paths_t)} teacher layers ({', '.join(paths_t)})")
    plan = LayerPlan(paths_s, paths_t, tuple(layer_shapes(student, paths_s, *student_input)),
                     tuple(layer_shapes(teacher, paths_t, *teacher_input)))
    problem = objective.layer_problem(plan)
    if problem is not None:
        raise ValueError(problem)
    return plan


def setup_distillation(
    objective: Method,
    student: ModelSpec,
    preset: str,
    data: DatasetMeta,
    train_set: IndexedImageDataset,
    teacher: Checkpoint,
    *,
    seed: int,
    num_views: int,
    runtime: Runtime,
    cache: Path | None = None,
    cache_key: Mapping[str, str] | None = None,
    aligned: Checkpoint | None = None,
    teacher_batch_size: int = 256,
    role: str = "distill",
) -> Distillation:
    """The student (preset ``preset`` built from ``student``), the teacher and the views to
    distill on. The caller seeds first (:func:`kdlib.runtime.seed_everything`).

    ``cache``: a teacher cache directory, checked against ``cache_key`` (which names the teacher
    layers of a feature-map method: the cache serves their outputs); without one, or when the
    directory holds the marker of a cache left unbuilt for this run (its layers did not fit:
    :func:`kdlib.teacher_cache.save_skipped`, logged with its reason), the teacher runs online on
    ``num_views`` fresh views per image. ``aligned``: a checkpoint of
    the aligned student (the align stage's) whose weights the student starts from.
    """
    model = student.build(data.num_classes, data.channels)
    if objective.uses_distillation_token and not hasattr(model, "set_distilled_training"):
        raise ValueError(f"the {type(objective).__name__} objective needs a student with a distillation token "
                         f"(timm's *_distilled_* models, e.g. the deit preset); {preset!r} ({student.arch}) has none")
    features = objective.needs_features
    online = load_teacher(teacher, data, runtime, features)
    if features:
        model = make_feature_student(model, feature_width(online.model, teacher.record.in_chans,
                                                          teacher.record.input_size),
                                     data.channels, student.input_size or data.image_size, objective.force_feat_fc)
    plan = None
    if objective.uses_layers:
        plan = plan_layers(objective, model, online.model,
                           (data.channels, student.input_size or data.image_size),
                           (teacher.record.in_chans, teacher.record.input_size or data.image_size),
                           student.arch, teacher.record.arch)
        online.tap(plan.teacher)
    if cache is not None and (reason := skipped_reason(cache, cache_key)) is not None:
        log.warning("%s: no teacher-output cache for this run (%s)", role, reason)
        cache = None
    outputs: TeacherFn
    if cache is not None and cache_key is not None and (reason := _other_layers(cache, cache_key)) is not None:
        log.warning("%s: %s", role, reason)
        cache = None
    if cache is not None:
        loaded = TeacherCache.load(cache, expected_key=cache_key)
        outputs = CachedTeacher(loaded, runtime.device, features, plan.teacher if plan is not None else None)
        view_seeds = loaded.seeds
        view0 = lambda: _view0_features(loaded)  # noqa: E731
    else:
        outputs, view_seeds = online, make_view_seeds(seed, len(train_set), num_views)
        view0 = lambda: first_view_features(online, train_set, view_seeds, BatchNormalizer(data.mean, data.std),  # noqa: E731
                                            runtime, teacher_batch_size)
    labels = train_set.targets if train_set.multi_hot is None else None
    objective.setup(SetupContext(seed, online.model, view0, plan, labels))
    if aligned is not None:
        model.load_state_dict(aligned.state_dict)
    return Distillation(objective, model, outputs, view_seeds, ModelRecord.for_model(role, preset, student, data, seed, model))


def _other_layers(cache: Path, expected: Mapping[str, str]) -> str | None:
    """Why a cache that matches this run in all but the teacher layers it holds is not used: DVC reruns
    ``teacher_cache`` when the method changes, not when only its layer knobs do, so a sweep over layers
    finds the previous layers' cache. The teacher then runs online (the same outputs, slower), and the
    message says how to rebuild; ``None`` when the layers match (any other difference still raises)."""
    built = dict(TeacherCache.load(cache).key)
    if built.get(LAYERS_KEY) == expected.get(LAYERS_KEY):
        return None
    check_key(cache, {k: v for k, v in built.items() if k != LAYERS_KEY},
              {k: v for k, v in expected.items() if k != LAYERS_KEY})
    return (f"the teacher-output cache {cache} holds the teacher layers {_short(built.get(LAYERS_KEY))}, and this run "
            f"reads {_short(expected.get(LAYERS_KEY))}: the teacher runs online (to cache these layers: "
            "dvc repro -f -s teacher_cache)")


def is_projected(model: nn.Module) -> bool:
    """Whether ``model`` is a feature student with a real ``feat_fc`` projection to align."""
    return isinstance(model, FeatureStudent) and model.projected

