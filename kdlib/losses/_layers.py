"""What the feature-map methods (FitNet, AT, NST, SP, PKT, RKD) share: ``ce_weight·CE + feat_weight·L_feat``
over pairs of layers read by forward hooks (:mod:`kdlib.taps`); no method is registered here.

Knobs every such method takes: ``ce_weight`` and ``feat_weight`` (mdistiller's ``LOSS.CE_WEIGHT`` and
``LOSS.FEAT_WEIGHT``, with its defaults per method), ``student_layers`` and ``teacher_layers`` (lists of
stage indices, module paths or ``"pre_logits"``; ``null``: the method's default, :meth:`default_layers`).
Context: ``label_smoothing`` of the CE term. Soft (MixUp/CutMix) targets only enter the CE term.
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

from torch import Tensor

from kdlib.losses._common import check_nonnegative, check_smoothing, require_teacher
from kdlib.losses.base import Method, SetupContext
from kdlib.losses.ce import ce_loss
from kdlib.losses.registry import LossOutput, StudentOutput, TeacherOutput
from kdlib.taps import Layer, LayerPlan


def check_layers(name: str, value: Any) -> tuple[Layer, ...] | None:
    """``None`` (the method's default) or a non-empty list of stage indices and module paths."""
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) for v in value)):
        raise ValueError(f"{name} must be null (the method's default) or a non-empty list of stage indices and "
                         f"module paths, e.g. [2] or [layer2]; got {value!r}")
    return tuple(value)


def last_stages(student_stages: int, teacher_stages: int) -> tuple[list[Layer], list[Layer]]:
    """Every stage after the stem, paired from the deepest down: mdistiller's ``feats[1:]`` when both nets
    have as many stages (ResNet to ResNet); a shallower net's stages meet the teacher's last ones."""
    k = max(min(student_stages, teacher_stages) - 1, 1)
    return list(range(-k, 0)), list(range(-k, 0))


class LayerMethod(Method):
    """``ce_weight·CE_ε + feat_weight·Σ_pairs pair_loss(student layer, teacher layer)``; subclasses define
    :meth:`pair_loss` and, when theirs differ from every stage after the stem, :meth:`default_layers`."""

    needs_teacher: ClassVar[bool] = True
    uses_layers: ClassVar[bool] = True
    method_name: ClassVar[str] = ""
    feat_term: ClassVar[str] = "feat"  # the logged name of the feature term

    def __init__(self, ce_weight: float = 1.0, feat_weight: float = 1.0, student_layers: Sequence[Layer] | None = None,
                 teacher_layers: Sequence[Layer] | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.ce_weight = check_nonnegative("ce_weight", ce_weight)
        self.feat_weight = check_nonnegative("feat_weight", feat_weight)
        self.student_layers = check_layers("student_layers", student_layers)
        self.teacher_layers = check_layers("teacher_layers", teacher_layers)
        self.label_smoothing = check_smoothing(label_smoothing)
        self.plan: LayerPlan | None = None

    def default_layers(self, student_stages: int, teacher_stages: int) -> tuple[list[Layer], list[Layer]]:
        return last_stages(student_stages, teacher_stages)

    def layer_request(self, student_stages: int, teacher_stages: int) -> tuple[Sequence[Layer], Sequence[Layer]]:
        default_s, default_t = self.default_layers(student_stages, teacher_stages)
        return (self.student_layers if self.student_layers is not None else default_s,
                self.teacher_layers if self.teacher_layers is not None else default_t)

    def setup(self, context: SetupContext) -> None:
        if context.layers is None:
            raise ValueError(f"the {self.method_name!r} method needs its layers resolved (SetupContext.layers)")
        problem = self.layer_problem(context.layers)
        if problem is not None:
            raise ValueError(f"distill.{self.method_name}: {problem}")
        self.plan = context.layers
        self.build_adapters(context.layers)

    def build_adapters(self, plan: LayerPlan) -> None:
        """Modules of the method's own that the plan's shapes decide (FitNet's regressor); none by default."""

    def student_layer_paths(self) -> tuple[str, ...]:
        if self.plan is None:
            raise RuntimeError(f"the {self.method_name!r} method was not set up: its layers are not resolved")
        return self.plan.student

    def pair_loss(self, index: int, f_s: Tensor, f_t: Tensor) -> Tensor:  # pragma: no cover
        """The feature term of pair ``index`` (student output ``f_s``, detached teacher output ``f_t``)."""
        raise NotImplementedError

    def feature_loss(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        """Σ over the pairs of :meth:`pair_loss` (mdistiller sums its per-stage terms so)."""
        return sum((self.pair_loss(i, f_s, f_t) for i, (f_s, f_t) in enumerate(zip(student, teacher))),
                   student[0].new_zeros(()))

    def forward(self, student: StudentOutput, targets: Tensor, teacher: TeacherOutput | None = None) -> LossOutput:
        teacher = require_teacher(self.method_name, teacher)
        if student.layers is None or teacher.layers is None or len(student.layers) != len(teacher.layers):
            raise ValueError(f"the {self.method_name!r} method needs the student's and the teacher's layer outputs "
                             "in pairs (StudentOutput.layers, TeacherOutput.layers)")
        feat = self.feature_loss([t.float() for t in student.layers], [t.detach().float() for t in teacher.layers])
        total, terms = self.feat_weight * feat, {self.feat_term: feat.detach()}
        # a zero-weighted CE (a hint stage) is left out, not multiplied by 0: the classifier and the layers after
        # the hint then get no gradient at all, so the optimizer (and its weight decay) leaves them as they are
        if self.ce_weight:
            hard = ce_loss(student.logits, targets, self.label_smoothing)
            total, terms = total + self.ce_weight * hard, {"ce": hard.detach(), **terms}
        total, terms = self.extra_terms(student, targets, teacher, total, terms)
        return LossOutput(total, terms)

    def extra_terms(self, student: StudentOutput, targets: Tensor, teacher: TeacherOutput, total: Tensor,
                    terms: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Terms a method adds beside CE and its layer term (FitNet's KD of its second stage); none here."""
        return total, terms


def spatial_maps(method: str, plan: LayerPlan) -> str | None:
    """Why a method over ``(C, H, W)`` feature maps with square, poolable sizes cannot use ``plan``."""
    for i, (s, t) in enumerate(zip(plan.student_shapes, plan.teacher_shapes)):
        if len(s) != 3 or len(t) != 3:
            return (f"{method} compares (C, H, W) feature maps; pair {i} ({plan.student[i]} → {plan.teacher[i]}) "
                    f"has shapes {s} and {t}; choose convolutional layers (student_layers / teacher_layers)")
    return None
