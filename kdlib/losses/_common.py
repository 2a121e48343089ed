"""Shared validation for the methods' knobs and inputs (no method is registered here).

Every knob is checked in the method's ``__init__`` so a bad setting fails when the objective
is built, not after the first epoch; the messages name the knob, the bad value and what is
allowed, e.g. ``"temperature must be a finite number > 0, got 0"``.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

from torch import Tensor

from kdlib.losses.registry import StudentOutput, TeacherOutput


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive(name: str, value: Any) -> float:
    """``value`` must be a finite real number > 0."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value: Any) -> float:
    """``value`` must be a finite real number >= 0 (a loss weight)."""
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_unit_interval(name: str, value: Any) -> float:
    """``value`` must be a real number in ``[0, 1]`` (NaN is refused)."""
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_optional_int(name: str, value: Any, minimum: int, none_means: str) -> int | None:
    """``None`` (meaning ``none_means``) or an integer >= ``minimum``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} or null ({none_means}), got {value!r}")
    return int(value)


def check_optional_positive(name: str, value: Any, none_means: str) -> float | None:
    """``None`` (meaning ``none_means``) or a finite number > 0."""
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0 or null ({none_means}), got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_smoothing(label_smoothing: Any, multilabel: bool = False) -> float:
    """Label smoothing of the multiclass CE term, in ``[0, 1]``; it has no meaning for BCE."""
    value = check_unit_interval("label_smoothing", label_smoothing)
    if multilabel and value != 0.0:
        raise ValueError(
            f"label_smoothing applies to the multiclass CE term only; got {value!r} with multilabel=True"
        )
    return value


def require_teacher(method: str, teacher: TeacherOutput | None) -> TeacherOutput:
    if teacher is None:
        raise ValueError(f"the {method!r} method needs the teacher's output (teacher logits), got None")
    return teacher


def require_features(
    method: str, student: StudentOutput, teacher: TeacherOutput | None
) -> tuple[Tensor, Tensor]:
    """The student's and the (detached) teacher's pooled features, checked to be ``(B, D)`` alike."""
    teacher = require_teacher(method, teacher)
    if student.features is None:
        raise ValueError(f"the {method!r} method needs StudentOutput.features (pooled, after feat_fc), got None")
    if teacher.features is None:
        raise ValueError(f"the {method!r} method needs TeacherOutput.features, got None")
    f_s, f_t = student.features, teacher.features
    if f_s.ndim != 2 or f_s.shape != f_t.shape:
        raise ValueError(
            f"the {method!r} method needs student and teacher features of the same shape (B, D); got "
            f"student {tuple(f_s.shape)} and teacher {tuple(f_t.shape)} (a student narrower than the "
            "teacher needs a feat_fc projection to the teacher's width)"
        )
    return f_s.float(), f_t.detach().float()
