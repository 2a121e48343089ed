"""Registry of training objectives (distillation methods, plain CE/BCE) and what they exchange.

The method base class is :class:`kdlib.losses.base.Method` (capabilities, knobs, setup hook);
this module holds the registry and the tuples a method exchanges with the training loop: it
gets a :class:`StudentOutput`, the batch's targets and a :class:`TeacherOutput` (``None`` for
methods without a teacher), and returns a :class:`LossOutput`.
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from kdlib.registry import Registry

MULTICLASS, MULTILABEL = "multiclass", "multilabel"


class Progress(NamedTuple):
    """Where training stands at a step, for methods with ``uses_progress`` (warm-ups, schedules):
    ``epoch`` of ``epochs`` and ``step`` of ``steps_per_epoch``, both counted from 1."""

    epoch: int
    epochs: int
    step: int
    steps_per_epoch: int

    @property
    def global_step(self) -> int:
        """Steps taken so far, this one included (1 at the first step)."""
        return (self.epoch - 1) * self.steps_per_epoch + self.step

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


class LossOutput(NamedTuple):
    """The scalar to back-propagate and its named, detached terms for logging."""

    total: Tensor
    terms: dict[str, Tensor]


class StudentOutput(NamedTuple):
    """What one student forward pass produced.

    ``logits``: ``(B, C)`` class logits (the class head for DeiT token distillation);
    ``dist_logits``: the distillation head's ``(B, C)`` logits, only for methods with
    ``uses_distillation_token``; ``features``: ``(B, D_t)`` pooled features after ``feat_fc``,
    only for methods with ``needs_features``; ``layers``: the outputs of the layers a method with
    ``uses_layers`` reads (:mod:`kdlib.taps`), in the order of its plan.
    """

    logits: Tensor
    dist_logits: Tensor | None = None
    features: Tensor | None = None
    layers: tuple[Tensor, ...] | None = None


class TeacherOutput(NamedTuple):
    """The teacher's ``(B, C)`` logits and, for feature methods, its ``(B, D_t)`` pooled features.
    Both come from the frozen teacher (online or from the cache) and never carry a gradient. ``layers``:
    its intermediate outputs for a method with ``uses_layers`` (online, or from the teacher cache)."""

    logits: Tensor
    features: Tensor | None = None
    layers: tuple[Tensor, ...] | None = None


METHODS: Registry[type] = Registry("distillation method")  # of kdlib.losses.base.Method subclasses
register_method = METHODS.register
