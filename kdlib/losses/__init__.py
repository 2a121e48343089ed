"""Training objectives: one file per method, each a pure function plus a thin module.

``build_objective(name, **kwargs)`` returns the module registered under ``name``.
"""
from __future__ import annotations

from torch import nn

from kdlib.losses import ce, kd  # noqa: F401  (registration)
from kdlib.losses.kd import kd_loss, soft_kl
from kdlib.losses.registry import METHODS, LossOutput, register_method


def build_objective(name: str, **kwargs: float) -> nn.Module:
    return METHODS.get(name)(**kwargs)


__all__ = ["METHODS", "LossOutput", "build_objective", "kd_loss", "register_method", "soft_kl"]
