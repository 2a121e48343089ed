"""Registry of training objectives (distillation methods, plain CE/BCE) and what they exchange.

A method is an ``nn.Module`` class registered with ``@register_method("name")``. The training
loop calls ``method(student, targets, teacher)`` with a :class:`StudentOutput`, the batch's
targets and a :class:`TeacherOutput` (``None`` for methods without a teacher), and gets a
:class:`LossOutput`. Class attributes tell the loop and the stages what a method needs:

* ``needs_teacher``: teacher logits (and features, below) are computed or read from the cache;
* ``needs_features``: the pooled penultimate features of student and teacher (feature
  mimicking); the student then gets a ``feat_fc`` projection (:mod:`kdlib.features`);
* ``needs_lsh``: the constructor takes ``lsh=``, the fixed hyperplanes fitted on the teacher's
  training-set features (:class:`kdlib.losses.lsh.LSHHyperplanes`);
* ``uses_distillation_token``: the student must have a distillation head (timm's
  ``*_distilled_*`` models); ``StudentOutput.dist_logits`` is then filled;
* ``tasks``: the data-set tasks it fits: ``"multiclass"`` (integer or soft targets) and/or
  ``"multilabel"`` (multi-hot targets).
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from kdlib.registry import Registry

MULTICLASS, MULTILABEL = "multiclass", "multilabel"


class LossOutput(NamedTuple):
    """The scalar to back-propagate and its named, detached terms for logging."""

    total: Tensor
    terms: dict[str, Tensor]


class StudentOutput(NamedTuple):
    """What one student forward pass produced.

    ``logits``: ``(B, C)`` class logits (the class head for DeiT token distillation);
    ``dist_logits``: the distillation head's ``(B, C)`` logits, only for methods with
    ``uses_distillation_token``; ``features``: ``(B, D_t)`` pooled features after ``feat_fc``,
    only for methods with ``needs_features``.
    """

    logits: Tensor
    dist_logits: Tensor | None = None
    features: Tensor | None = None


class TeacherOutput(NamedTuple):
    """The teacher's ``(B, C)`` logits and, for feature methods, its ``(B, D_t)`` pooled features.
    Both come from the frozen teacher (online or from the cache) and never carry a gradient."""

    logits: Tensor
    features: Tensor | None = None


METHODS: Registry[type] = Registry("distillation method")
register_method = METHODS.register


def method_fits_task(method: type, task: str) -> bool:
    return task in getattr(method, "tasks", (MULTICLASS,))
