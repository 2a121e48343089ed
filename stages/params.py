"""``params.yaml`` → one frozen, typed, fully resolved :class:`Run`, built once per stage.

``dvc exp run -S key=value`` does no type checking, so everything is checked here before any
work: unknown keys, wrong types, unknown names and impossible values stop the stage with one
message per problem naming the key, the value and what is allowed. Each key is declared once,
in the settings class that uses it (:mod:`kdlib.schema`): a model preset is a
:class:`~kdlib.models.ModelSpec` and a :class:`~kdlib.train.Recipe`, a data-set preset a
:class:`~kdlib.data.spec.DatasetSpec`, a method's knobs its constructor's arguments.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

from kdlib import yamlfile
from kdlib.data.index import DatasetIndex
from kdlib.data.spec import DatasetSpec
from kdlib.data.transforms import augment_option_problems
from kdlib.distill import AlignSettings, CacheSettings, plan_layers, teacher_cache_key
from kdlib.losses import METHODS, Method, MethodSpec, build_objective, distillation_methods
from kdlib.features import feature_width
from kdlib.models import ModelSpec, input_problem, meta_model
from kdlib.quantize import EvalSettings
from kdlib.runtime import RuntimeSettings
from kdlib.schema import SchemaError, is_float, is_int, is_seed, is_str, optional, parse, parse_merged, setting
from kdlib.teacher_cache import layer_table_bytes
from kdlib.train import Recipe
from kdlib.transfer import TransferSettings, transfer_index
from stages.guard import PARAMS_FILE

ROLES = ("teacher", "baseline", "distill")


class ParamError(SchemaError):
    pass


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.3g} MiB"


def _models(values: Any, where: str, problems: list[str]) -> dict[str, tuple[ModelSpec, Recipe]] | None:
    if not isinstance(values, dict) or not values:
        problems.append(f"{where}: expected a mapping of named presets")
        return None
    presets = {name: parse_merged((ModelSpec, Recipe), preset, f"{where}.{name}.", problems)
               for name, preset in values.items()}
    return presets if all(p is not None for p in presets.values()) else None


def _methods(values: Any, where: str, problems: list[str]) -> dict[str, Any] | None:
    """``method`` names a registered distillation method, ``transfer`` the transfer set
    (:class:`kdlib.transfer.TransferSettings`, parsed into that class here); every other key is one
    method's knob section, checked by building the method (its constructor checks each value), so a new
    method file needs no edit here."""
    if not isinstance(values, dict):
        problems.append(f"{where}: expected a mapping")
        return None
    before, names = len(problems), distillation_methods()
    if values.get("method") not in names:
        problems.append(f"{where}.method = {values.get('method')!r}: expected one of: {', '.join(names)}")
    elif values["method"] not in values:
        problems.append(f"{where}.{values['method']}: missing (the knobs of the chosen method; may be {{}})")
    values = dict(values)
    if "transfer" not in values:
        problems.append(f"{where}.transfer: missing section (the transfer set: exclude_classes: [], only_classes: "
                        "null, bias_shift: null for every training image)")
    else:
        values["transfer"] = parse(TransferSettings, values["transfer"], f"{where}.transfer.", problems)
    for name, knobs in values.items():
        if name in ("method", "transfer"):
            continue
        if name not in names:
            problems.append(f"{where}.{name}: unknown key; expected `method`, `transfer` or a method name: "
                            f"{', '.join(names)}")
        elif not isinstance(knobs, dict):
            problems.append(f"{where}.{name} = {knobs!r}: expected a mapping of the method's knobs")
        else:
            allowed = METHODS.get(name).knobs()
            unknown = [k for k in knobs if k not in allowed]
            problems.extend(f"{where}.{name}.{k}: unknown knob; {name} takes: {', '.join(allowed)}" for k in unknown)
            if not unknown:
                try:
                    METHODS.get(name)(**knobs)
                except (TypeError, ValueError) as err:
                    problems.append(f"{where}.{name}: {err}")
    return values if len(problems) == before else None


@dataclass(frozen=True, kw_only=True)
class DataSettings:
    split_seed: int = setting(is_seed)  # subsets and drawn splits (separate from `seed`)
    num_workers: int = setting(is_int(0))  # DataLoader worker processes


@dataclass(frozen=True, kw_only=True)
class Params:
    """``params.yaml`` as declared (every preset parsed, used or not)."""

    seed: int = setting(is_seed)
    teacher_seed: int = setting(is_seed)
    dataset: str = setting(is_str)
    teacher: str = setting(is_str)
    student: str = setting(is_str)
    data: DataSettings = setting(section=DataSettings)
    runtime: RuntimeSettings = setting(section=RuntimeSettings)
    datasets: dict[str, DatasetSpec] = setting(presets=DatasetSpec)
    teacher_ls: float | None = setting(optional(is_float(0, 1, hi_open=True)), None, required=True)
    distill: dict[str, Any] = setting(parser=_methods)
    align: AlignSettings = setting(section=AlignSettings)
    teacher_cache: CacheSettings = setting(section=CacheSettings)
    eval: EvalSettings = setting(section=EvalSettings)
    models: dict[str, tuple[ModelSpec, Recipe]] = setting(parser=_models)

    @property
    def transfer(self) -> TransferSettings:
        return self.distill["transfer"]

    def problems(self) -> list[tuple[str | None, str]]:
        found: list[tuple[str | None, str]] = []
        for role in ("teacher", "student"):
            preset = getattr(self, role)
            if preset not in self.models:
                found.append((role, f"expected one of the models presets: {', '.join(self.models)}"))
                continue
            # only the presets this run uses: one naming weights another machine has stays valid here
            missing = self.models[preset][0].missing_weights()
            if missing and (role == "teacher" or preset != self.teacher):  # one message for teacher == student
                weights = self.models[preset][0].pretrained
                found.append((None, f"models.{preset}.pretrained = {weights!r}: {missing} (the {role} preset "
                                    f"{preset!r}); put the file there, or -S models.{preset}.pretrained=<path> or "
                                    "=false"))
        if self.dataset not in self.datasets:
            found.append(("dataset", f"expected one of: {', '.join(self.datasets)}"))
            return found
        task, method = self.datasets[self.dataset].task, self.distill["method"]
        if not METHODS.get(method).fits(task):
            found.append((None, f"distill.method = {method!r} does not fit a {task} data set; use one of: "
                                f"{', '.join(distillation_methods(task))}"))
        if self.transfer.restricted and task == "multilabel":
            found.append((None, f"distill.transfer: leaving classes out is for single-label data sets ({self.dataset!r} "
                                "is multi-label); expected exclude_classes: [] and only_classes: null"))
        cls = METHODS.get(method)
        mixing = [f"{k} = {v}" for k, v in (("mixup", self.datasets[self.dataset].mixup),
                                            ("cutmix", self.datasets[self.dataset].cutmix)) if v]
        if mixing and cls.soft_targets == "refused":
            found.append((None, f"distill.method = {method!r} needs integer labels, and datasets.{self.dataset}."
                                f"{' and '.join(mixing)} give soft targets; set them to 0 or pick another method"))
        if cls.needs_features and self.align.epochs and cls.alignment_knobs(self.align.beta) is None:
            found.append((None, f"distill.method = {method!r} mimics features but cannot be aligned (its "
                                "alignment_knobs() is None: no gamma/beta knobs); set -S align.epochs=0"))
        data = self.datasets[self.dataset]
        for role in ("teacher", "student"):
            spec = self.models[getattr(self, role)][0] if getattr(self, role) in self.models else None
            size = (spec.input_size or data.image_size) if spec is not None else None
            if data.preload_size is not None and size is not None and data.preload_size < size:
                found.append((None, f"datasets.{self.dataset}.preload_size = {data.preload_size}: expected at least "
                                    f"{size}, the input size of the {role} preset {getattr(self, role)!r} (or null); "
                                    f"e.g. -S datasets.{self.dataset}.preload_size={size}"))
        for role in ("teacher", "student"):
            preset = getattr(self, role)
            augmentation = self.models[preset][1].augmentation if preset in self.models else None
            if augmentation is not None:  # ranges that depend on the image size (shift_px < image_size)
                name, options = augmentation
                found += [(None, f"models.{preset}.augment.{name}.{key.removeprefix('augment_options.')} = "
                                 f"{options.get(key.removeprefix('augment_options.'))!r}: {text} (the "
                                 f"{self.dataset!r} data set's images are {data.image_size} px)")
                          for key, text in augment_option_problems(name, options, data.image_size)]
        if self.teacher_cache.enabled and data.mixes:
            found.append((None, f"datasets.{self.dataset}: MixUp/CutMix mix pairs of images per batch, and the "
                                "teacher must see the mixed batch, so its outputs cannot be cached per view; set "
                                "-S teacher_cache.enabled=false"))
        return found


@dataclass(frozen=True)
class ModelRun:
    """One role's model: its preset name, architecture, recipe and input size."""

    preset: str
    spec: ModelSpec
    recipe: Recipe
    input_size: int


@dataclass(frozen=True)
class Run:
    """The resolved run: what every stage reads, and the facts derived from it."""

    params: Params
    dataset: DatasetSpec
    teacher: ModelRun
    student: ModelRun
    method: MethodSpec

    @property
    def seed(self) -> int:
        return self.params.seed

    def seed_of(self, role: str) -> int:
        """The training seed of ``role``: ``teacher_seed`` for the teacher, ``seed`` for the students, so
        a sweep over student seeds trains one teacher and every seed's baseline/distill pair is paired."""
        return self.params.teacher_seed if role == "teacher" else self.params.seed

    @property
    def task(self) -> str:
        return self.dataset.task

    @property
    def score(self) -> str:
        """What picks checkpoints and headlines tables: ``top1``, or ``mAP`` for multi-label data."""
        return "mAP" if self.task == "multilabel" else "top1"

    @property
    def num_views(self) -> int:
        """Training views per image: the cache's (default one per student epoch), or the student's epochs."""
        cache = self.params.teacher_cache
        return (cache.views if cache.enabled and cache.views else None) or self.student.recipe.epochs

    @property
    def cache_used(self) -> bool:
        """Whether distill is pointed at the teacher cache (``teacher_cache.enabled``). For a method
        reading the teacher's layers the teacher_cache stage may still build none, when they do not fit
        (:meth:`cache_skip_reason`): it then leaves a marker saying why, and distill runs the teacher
        online."""
        return self.params.teacher_cache.enabled

    @cached_property
    def teacher_layers(self) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
        """``(paths, per-image shapes)`` of the teacher layers distill's method reads (its
        :class:`~kdlib.taps.LayerPlan`), each once (a teacher layer paired with several student layers is
        cached once), empty for a method that reads none. Planned on models built on
        torch's meta device, as the check stage plans them: no trained teacher, no weights, no memory."""
        if not self.method.cls.uses_layers:
            return (), ()
        channels, models = self.dataset.channels, {}
        for role in ("teacher", "student"):
            spec = self.model(role).spec
            # a model that cannot be built on meta is built for real, untrained (shapes need no weights)
            models[role] = meta_model(spec, channels) or replace(spec, pretrained=False).build(2, channels).eval()
        plan = plan_layers(self.method.build(self.task), models["student"], models["teacher"],
                           (channels, self.student.input_size), (channels, self.teacher.input_size),
                           self.student.spec.arch, self.teacher.spec.arch)
        shapes = dict(zip(plan.teacher, plan.teacher_shapes))
        return tuple(shapes), tuple(shapes.values())

    def cache_skip_reason(self, index: DatasetIndex) -> str | None:
        """Why the teacher_cache stage builds no cache for this run although it is enabled (distill then
        runs the teacher online), or ``None``: the outputs of the teacher layers the method reads,
        ``N images × K views × Σ numel × 2`` bytes (float16) with ``N`` the distilled student's training
        images in ``index``, over ``teacher_cache.max_layer_mib``. Known before any teacher pass."""
        paths, shapes = self.teacher_layers
        if not self.params.teacher_cache.enabled or not paths:
            return None
        images, views = len(self.training_index(index, "distill").split("train")), self.num_views
        size, limit = layer_table_bytes(shapes, images, views), self.params.teacher_cache.max_layer_mib
        if size <= limit * 2**20:
            return None
        values = sum(math.prod(shape) for shape in shapes)
        each = " + ".join("×".join(map(str, shape)) for shape in shapes)
        return (f"distill.method = {self.method.name!r}: the teacher's layers {', '.join(paths)} would take "
                f"{_size(size)} in the cache ({images} images × {views} views × {values} values ({each}) × 2 bytes, "
                f"float16), over teacher_cache.max_layer_mib = {limit:g}: distill runs the teacher online (raise "
                "the limit, or set teacher_cache.views lower, to cache them)")

    def model(self, role: str) -> ModelRun:
        return self.teacher if role == "teacher" else self.student

    def training_index(self, index: DatasetIndex, role: str) -> DatasetIndex:
        """The prepared index as ``role`` trains on it: the distilled student (its alignment and teacher
        cache too) on the transfer set (``distill.transfer``), the others on every training image."""
        return index if role in ("teacher", "baseline") else transfer_index(index, self.params.transfer)[0]

    def teacher_cache_key(self, teacher: Path, data_files: Sequence[Path], index: DatasetIndex) -> dict[str, str]:
        """The key of the teacher cache the distilled student reads: its views, its transfer set, the
        teacher layers its method reads."""
        kept = None
        if self.params.transfer.restricted:
            absent = transfer_index(index, self.params.transfer)[1]
            kept = [c for c in range(index.meta.num_classes) if c not in absent]
        return teacher_cache_key(teacher, data_files, self.train_dataset("distill"), self.student.input_size,
                                 self.num_views, self.seed, kept, self.teacher_layers[0])

    def train_dataset(self, role: str) -> DatasetSpec:
        """The data set as ``role`` trains on it: with the model preset's own ``augment`` when it has one
        (Hinton et al. 2015's teacher sees jittered images, its students the plain ones). Everything built
        from the training views — the teacher cache, alignment, the view key — takes it from here."""
        found = self.model(role).recipe.augmentation
        return self.dataset if found is None else replace(self.dataset, augment=found[0], augment_options=found[1])

    def model_problems(self) -> list[str]:
        """What the models themselves refuse, found by building each on torch's meta device (no
        memory, no weights; :func:`kdlib.models.meta_model`): an input size a model does not accept
        (naming the key that sets it), and an alignment asked for with nothing to align (the student's
        pooled features already as wide as the teacher's and no forced ``feat_fc``: the align stage
        would skip LSHFM's stage 1). Run by the check stage, not by every stage: it takes a few
        tenths of a second."""
        found, widths, channels = [], {}, self.dataset.channels
        models: dict[str, Any] = {}
        for role in ("teacher", "student"):
            run = self.model(role)
            model = meta_model(run.spec, channels)
            if model is None:
                continue
            problem = input_problem(model, run.spec.arch, channels, run.input_size)
            if problem is not None:
                key = (f"models.{run.preset}.input_size" if run.spec.input_size is not None
                       else f"datasets.{self.params.dataset}.image_size")
                found.append(f"{key} = {run.input_size} (the {role} preset {run.preset!r}): {problem}; expected an "
                             "input size the model accepts (a ViT's kwargs.img_size, or kwargs.dynamic_img_size: "
                             "true, builds it for another size)")
                continue
            if self.method.cls.needs_features:
                widths[role] = feature_width(model, channels, run.input_size)
            models[role] = model  # takes its input size: its layers can be planned
        if self.method.cls.uses_layers and len(models) == 2:
            try:
                plan_layers(self.method.build(self.task), models["student"], models["teacher"],
                            (channels, self.student.input_size), (channels, self.teacher.input_size),
                            self.student.spec.arch, self.teacher.spec.arch)
            except ValueError as err:
                found.append(f"distill.{self.method.name}: {err} (student {self.student.preset!r}, teacher "
                             f"{self.teacher.preset!r})")
        method, epochs = self.method.name, self.params.align.epochs
        forced = self.method.knobs.get("force_feat_fc", self.method.cls.arguments().get("force_feat_fc", False))
        if len(widths) == 2 and widths["teacher"] == widths["student"] and epochs and not forced:
            found.append(f"align.epochs = {epochs}: the {self.student.preset!r} student's pooled features are as wide "
                         f"as the {self.teacher.preset!r} teacher's ({widths['student']}) and distill.{method}."
                         "force_feat_fc is false, so the student has no feat_fc and the align stage (LSHFM's stage "
                         f"1) would have nothing to train; expected -S distill.{method}.force_feat_fc=true (LSHFM's "
                         "VOC and COCO scripts set force_2FC) or -S align.epochs=0")
        return found

    @property
    def align_skip_reason(self) -> str | None:
        """Why the align stage has nothing to train, when the parameters alone tell."""
        cls, name = self.method.cls, self.method.name
        if cls.uses_layers and cls.alignment_knobs(self.params.align.beta, self.method.knobs) is None:
            return (f"distill.method = {name!r} trains in one stage: nothing to align"
                    + (f" (distill.{name}.hint_stage is false)" if "hint_stage" in cls.knobs() else ""))
        if not cls.needs_features and not cls.uses_layers:
            return f"distill.method = {name!r} mimics no features: nothing to align"
        return "align.epochs = 0" if self.params.align.epochs == 0 else None

    @property
    def engine(self) -> dict[str, bool]:
        """:func:`kdlib.train.fit`'s ``compile`` and ``sync_bn``."""
        return {"compile": self.params.runtime.compile, "sync_bn": self.params.runtime.sync_bn}

    def single_process(self) -> "Run":
        """This run in one process (for a stage with nothing to compute in parallel)."""
        runtime = replace(self.params.runtime, nproc_per_node=1, nnodes=1, node_rank=0)
        return replace(self, params=replace(self.params, runtime=runtime))

    def objective(self, role: str, **overrides: Any) -> Method:
        """The objective ``role`` trains with (``overrides``: knobs of the distillation method)."""
        if role == "distill":
            return self.method.build(self.task, self.student.recipe.label_smoothing, **overrides)
        if self.task == "multilabel":
            return build_objective("bce")
        smoothing = self.model(role).recipe.label_smoothing
        if role == "teacher" and self.params.teacher_ls is not None:
            smoothing = self.params.teacher_ls
        return build_objective("ce", label_smoothing=smoothing)


def resolve(values: Any) -> Run:
    """The :class:`Run` described by a params mapping; :class:`ParamError` lists every problem."""
    problems: list[str] = []
    params = parse(Params, values, "", problems)
    if params is None:
        raise ParamError(problems, "invalid parameters in params.yaml")
    dataset = params.datasets[params.dataset]

    def model_run(preset: str) -> ModelRun:
        spec, recipe = params.models[preset]
        recipe = replace(recipe, eval_batch_size=params.eval.batch_size, num_workers=params.data.num_workers)
        return ModelRun(preset, spec, recipe, spec.input_size or dataset.image_size)

    name = params.distill["method"]
    return Run(params, dataset, model_run(params.teacher), model_run(params.student),
               MethodSpec(name, dict(params.distill[name])))


def validate(values: Any) -> None:
    """Raise :class:`ParamError` listing every problem in ``values``."""
    resolve(values)


def load_params(path: Path = PARAMS_FILE) -> Run:
    """Read and resolve ``params.yaml``; on error print the problems and exit with status 2."""
    try:
        return resolve(yamlfile.load(path))
    except (ParamError, yamlfile.YamlError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def read_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """The raw mapping of ``params.yaml`` (for tests and scripts that edit it)."""
    return yamlfile.load(path)
