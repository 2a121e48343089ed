"""Training objectives: one file per method, each pure functions plus a thin module.

``build_objective(name, **kwargs)`` returns the module registered under ``name``; every module
of this package is imported here, so adding a method is adding one file: a
:class:`~kdlib.losses.base.Method` subclass (``method(StudentOutput, targets, TeacherOutput)``
→ ``LossOutput``; declared capabilities ``needs_teacher``, ``needs_features``,
``uses_distillation_token``, ``tasks``, ``soft_targets``, ``uses_progress``; an optional ``setup``
hook that fits state from the teacher; parameters of its own, which train with the student)
decorated with ``@register_method("name")``.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from kdlib.losses.base import Method, MethodSpec, SetupContext, distillation_methods
from kdlib.losses.registry import (
    METHODS,
    MULTICLASS,
    MULTILABEL,
    LossOutput,
    StudentOutput,
    TeacherOutput,
    register_method,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from kdlib.losses.bce import bce_loss  # noqa: E402
from kdlib.losses.ce import ce_loss, hard_loss  # noqa: E402
from kdlib.losses.deit_hard import deit_hard_loss, hard_teacher_ce  # noqa: E402
from kdlib.losses.deit_soft import deit_soft_loss  # noqa: E402
from kdlib.losses.dkd import dkd_terms  # noqa: E402
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

def build_objective(name: str, **kwargs: Any) -> Method:
    """Build the method registered as ``name`` with ``kwargs`` (its knobs and context arguments).

    Unknown names raise ``KeyError`` listing the registered ones; unknown or invalid knobs raise
    ``ValueError`` naming them."""
    cls = METHODS.get(name)
    knobs = cls.arguments()
    unknown = sorted(set(kwargs) - set(knobs))
    if unknown:
        raise ValueError(
            f"method {name!r} has no argument {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(knobs) or 'none'}"
        )
    return cls(**kwargs)


__all__ = [
    "METHODS",
    "MULTICLASS",
    "MULTILABEL",
    "LSHHyperplanes",
    "LossOutput",
    "Method",
    "MethodSpec",
    "SetupContext",
    "StudentOutput",
    "TeacherOutput",
    "bce_loss",
    "build_objective",
    "ce_loss",
    "deit_hard_loss",
    "deit_soft_loss",
    "dkd_terms",
    "distillation_methods",
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
    "register_method",
    "sigmoid_kd_loss",
    "sigmoid_kl",
    "soft_kl",
    "teacher_correct_mask",
]
