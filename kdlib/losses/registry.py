"""Registry of training objectives (distillation methods and plain CE)."""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from kdlib.registry import Registry


class LossOutput(NamedTuple):
    """The scalar to back-propagate and its named, detached terms for logging."""

    total: Tensor
    terms: dict[str, Tensor]


METHODS: Registry[type] = Registry("distillation method")
register_method = METHODS.register
