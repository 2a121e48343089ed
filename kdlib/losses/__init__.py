"""Training objectives: one file per method, each pure functions plus a thin module.

``build_objective(name, **kwargs)`` returns the module registered under ``name``; every module
of this package is imported here, so adding a method is adding one file (see
:mod:`kdlib.losses.registry` for the interface: ``method(StudentOutput, targets, TeacherOutput)``
→ ``LossOutput``, and the class attributes ``needs_teacher``, ``needs_features``, ``needs_lsh``,
``uses_distillation_token``, ``tasks``).
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

from torch import nn

from kdlib.losses.registry import (
    METHODS,
    MULTICLASS,
    MULTILABEL,
    LossOutput,
    StudentOutput,
    TeacherOutput,
    method_fits_task,
    register_method,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from kdlib.losses.bce import bce_loss  # noqa: E402
from kdlib.losses.ce import ce_loss, hard_loss  # noqa: E402
from kdlib.losses.deit_hard import deit_hard_loss, hard_teacher_ce  # noqa: E402
from kdlib.losses.deit_soft import deit_soft_loss  # noqa: E402
from kdlib.losses.kd import kd_loss, soft_kl  # noqa: E402
from kdlib.losses.l2 import l2_loss, l2_loss_per_sample  # noqa: E402
from kdlib.losses.lsh import (  # noqa: E402
    LSHHyperplanes,
    fit_lsh_hyperplanes,
    lsh_loss,
    lsh_loss_per_sample,
)
from kdlib.losses.lshl2 import lshl2_loss  # noqa: E402
from kdlib.losses.lshl2_s import lshl2_s_loss, teacher_correct_mask  # noqa: E402
from kdlib.losses.sigmoid_kd import sigmoid_kd_loss, sigmoid_kl  # noqa: E402

#: Constructor arguments the stage supplies from context (not from the method's params block).
CONTEXT_ARGS = ("label_smoothing", "multilabel", "lsh")


def method_knobs(name_or_class: str | type) -> dict[str, Any]:
    """The keyword arguments of a method's constructor and their defaults (context ones included)."""
    cls = METHODS.get(name_or_class) if isinstance(name_or_class, str) else name_or_class
    return {
        p.name: p.default
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def build_objective(name: str, **kwargs: Any) -> nn.Module:
    """Build the method registered as ``name`` with ``kwargs`` (its knobs and context arguments).

    Unknown names raise ``KeyError`` listing the registered ones; unknown or invalid knobs raise
    ``ValueError`` naming them."""
    cls = METHODS.get(name)
    knobs = method_knobs(cls)
    unknown = sorted(set(kwargs) - set(knobs))
    if unknown:
        raise ValueError(
            f"method {name!r} has no argument {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(knobs) or 'none'}"
        )
    return cls(**kwargs)


__all__ = [
    "CONTEXT_ARGS",
    "METHODS",
    "MULTICLASS",
    "MULTILABEL",
    "LSHHyperplanes",
    "LossOutput",
    "StudentOutput",
    "TeacherOutput",
    "bce_loss",
    "build_objective",
    "ce_loss",
    "deit_hard_loss",
    "deit_soft_loss",
    "fit_lsh_hyperplanes",
    "hard_loss",
    "hard_teacher_ce",
    "kd_loss",
    "l2_loss",
    "l2_loss_per_sample",
    "lsh_loss",
    "lsh_loss_per_sample",
    "lshl2_loss",
    "lshl2_s_loss",
    "method_fits_task",
    "method_knobs",
    "register_method",
    "sigmoid_kd_loss",
    "sigmoid_kl",
    "soft_kl",
    "teacher_correct_mask",
]
