"""The base class of every training objective, and the choice of one with its knobs.

A method is one file: a :class:`Method` subclass registered with ``@register_method("name")``.
What the training loop and the distillation setup need to know about it is declared, never
probed: the capability attributes below, its knobs (the constructor's keyword arguments, each
checked in ``__init__``), and :meth:`Method.setup`, the hook in which a method fits state from
the teacher before training (LSHFM's hyperplanes do; most methods fit nothing).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

from torch import Tensor, nn

from kdlib.taps import Layer, LayerPlan
from kdlib.losses.registry import METHODS, MULTICLASS, MULTILABEL, LossOutput, StudentOutput, TeacherOutput


@dataclass
class SetupContext:
    """What a method may fit its state from, before the first training step.

    ``teacher``: the trained teacher (eval mode, no gradient). ``first_view_features()``: the
    teacher's pooled features of view 0 of every training image, ``(N, D)`` — computed (one
    teacher pass, or read from the teacher cache) only when a method calls it. ``layers``: for a
    method with ``uses_layers``, the layers it reads resolved for these models, with their shapes
    (adapters are built from them). ``train_labels``: the class index of every training image, ``(N,)``,
    in the order of the positions ``forward`` gets (``uses_positions``): a memory bank has ``N`` rows,
    and CRD draws its negatives from the other classes; ``None`` for multi-label data.
    """

    seed: int
    teacher: nn.Module
    first_view_features: Callable[[], Tensor]
    layers: LayerPlan | None = None
    train_labels: Tensor | None = None


class Method(nn.Module):
    """``forward(StudentOutput, targets, TeacherOutput | None) -> LossOutput``.

    Capabilities (class attributes every subclass states):

    * ``needs_teacher``: teacher outputs are computed or read from the teacher cache;
    * ``needs_features``: pooled penultimate features of student and teacher (feature
      mimicking); the student gets a ``feat_fc`` projection (:mod:`kdlib.features`), which
      ``force_feat_fc`` forces even when the widths match;
    * ``uses_distillation_token``: the student must have a distillation head (timm's
      ``*_distilled_*`` models); ``StudentOutput.dist_logits`` is filled;
    * ``tasks``: ``"multiclass"`` (integer or soft targets) and/or ``"multilabel"`` (multi-hot);
    * ``soft_targets``: what the method does with MixUp/CutMix's soft ``(B, C)`` targets: ``"mixed"``
      uses them as they are, ``"argmax"`` takes each row's dominant class (documented in the method's
      file), ``"refused"`` cannot use them, and a run with MixUp or CutMix on is refused before it starts;
    * ``uses_progress``: ``forward`` also gets ``progress=`` a :class:`~kdlib.losses.registry.Progress`
      (epoch, step, their totals), for warm-ups and schedules;
    * ``uses_positions``: ``forward`` also gets ``positions=``, the ``(B,)`` indices of the batch's images
      in the training set (the same image has the same index every epoch and on every process; under
      MixUp/CutMix, the index of each row's first image), for per-image state such as CRD's memory bank;
    * ``uses_layers``: the outputs of intermediate layers of both nets, read by forward hooks
      (:mod:`kdlib.taps`): the method names them in :meth:`layer_request`, may refuse a resolved
      pairing in :meth:`layer_problem` (checked before any work), gets the resolved
      :class:`~kdlib.taps.LayerPlan` in ``setup`` and ``StudentOutput.layers`` /
      ``TeacherOutput.layers`` in ``forward``. The teacher cache stores those teacher layers when they
      fit ``teacher_cache.max_layer_mib``; otherwise the teacher runs online, and the run says why.

    ``context_args``: constructor arguments the run supplies rather than the method's knob
    section (the student's label smoothing; whether the task is multi-label).
    """

    needs_teacher: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False
    uses_distillation_token: ClassVar[bool] = False
    tasks: ClassVar[tuple[str, ...]] = (MULTICLASS,)
    soft_targets: ClassVar[str] = "mixed"
    uses_progress: ClassVar[bool] = False
    uses_positions: ClassVar[bool] = False
    uses_layers: ClassVar[bool] = False
    context_args: ClassVar[tuple[str, ...]] = ("label_smoothing", "multilabel")
    force_feat_fc: bool = False

    @classmethod
    def arguments(cls) -> dict[str, Any]:
        """The constructor's keyword arguments and their defaults (context ones included)."""
        return {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
                if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    @classmethod
    def knobs(cls) -> dict[str, Any]:
        """The knobs a ``distill.<method>`` section may set, with their defaults."""
        return {k: v for k, v in cls.arguments().items() if k not in cls.context_args}

    @classmethod
    def fits(cls, task: str) -> bool:
        return task in cls.tasks

    @classmethod
    def alignment_knobs(cls, beta: float, knobs: Mapping[str, Any] = {}) -> dict[str, Any] | None:
        """Knob overrides that make this method the objective of the ``align`` stage, or ``None`` when it
        has no such stage (given the run's ``knobs``). Two kinds: a feature method's (``needs_features``)
        is LSHFM's stage 1, the feature terms only, weighted ``beta``, training only the student's
        ``feat_fc``; a layer method's (``uses_layers``) is a hint stage (FitNets' stage 1), its layer term
        only, training the student up to its hinted layers and the method's own adapters. The default
        fits feature methods written as ``gamma·hard + beta·features``; other methods override this."""
        return {"gamma": 0.0, "beta": beta} if cls.needs_features and {"gamma", "beta"} <= set(cls.knobs()) else None

    def setup(self, context: SetupContext) -> None:
        """Fit state from the teacher before training; by default there is none."""

    def layer_request(self, student_stages: int, teacher_stages: int) -> tuple[Sequence[Layer], Sequence[Layer]]:
        """For ``uses_layers``: the student's and the teacher's layers to read, in pairs (stage indices,
        module paths or ``"pre_logits"``; :mod:`kdlib.taps`), given how many stages each model lists."""
        return (), ()

    def layer_problem(self, plan: LayerPlan) -> str | None:
        """Why this method cannot use the resolved ``plan`` (shapes it cannot pair), or ``None``."""
        return None

    def student_layer_paths(self) -> tuple[str, ...]:
        """The student's layers the training step taps (set by ``setup``; none for most methods)."""
        return ()

    def fitted_state(self) -> dict[str, Any]:
        """What :meth:`setup` fitted, small enough to store with a checkpoint (``{}``: nothing)."""
        return {}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the method itself owns and trains with the student (a regressor, a projection
        head), in a fixed order: :func:`kdlib.train.fit` puts them in the student's optimizer, averages
        their gradients over processes, clips them with the student's, saves them in the resume state
        and counts them as the distilled student's extra training parameters. Buffers (LSH's fixed
        hyperplanes) are not parameters. Most methods own none."""
        return [p for p in self.parameters() if p.requires_grad]

    def optimizer_options(self) -> dict[str, float | None]:
        """How the optimizer treats :meth:`trainable_parameters`: ``lr_scale`` (their lr over the student's,
        for a paper that trains its head at its own rate) and ``weight_decay`` (``None``: the student's rule,
        none on 1-d tensors). A method whose paper says so overrides this, from its knobs if it likes."""
        return {"lr_scale": 1.0, "weight_decay": None}

    def forward(self, student: StudentOutput, targets: Tensor, teacher: TeacherOutput | None = None
                ) -> LossOutput:  # pragma: no cover - every subclass defines it
        raise NotImplementedError


@dataclass(frozen=True)
class MethodSpec:
    """A registered method's name and the knobs set for it (checked when it is built)."""

    name: str
    knobs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def cls(self) -> type[Method]:
        return METHODS.get(self.name)

    def build(self, task: str = MULTICLASS, label_smoothing: float = 0.0, **overrides: Any) -> Method:
        """The method for a ``task`` data set, its knobs overridden by ``overrides`` (the
        alignment stage's ``gamma=0, beta=...``). Raises ``ValueError`` naming a bad knob or a
        method that does not fit the task."""
        cls = self.cls
        if not cls.fits(task):
            fitting = [m for m in METHODS.names() if METHODS.get(m).needs_teacher and METHODS.get(m).fits(task)]
            raise ValueError(f"method {self.name!r} does not fit a {task} data set; use one of: {', '.join(fitting)}")
        knobs = {**self.knobs, **overrides}
        unknown = sorted(set(knobs) - set(cls.knobs()))
        if unknown:
            raise ValueError(f"method {self.name!r} has no knob {', '.join(map(repr, unknown))}; "
                             f"it takes: {', '.join(cls.knobs()) or 'none'}")
        context: dict[str, Any] = {}
        accepted = cls.arguments()
        if "label_smoothing" in accepted and task != MULTILABEL:
            context["label_smoothing"] = label_smoothing
        if "multilabel" in accepted:
            context["multilabel"] = task == MULTILABEL
        return cls(**knobs, **context)


def distillation_methods(task: str | None = None) -> list[str]:
    """Names of the registered methods that learn from a teacher (fitting ``task`` if given)."""
    return [m for m in METHODS.names() if METHODS.get(m).needs_teacher and (task is None or METHODS.get(m).fits(task))]
