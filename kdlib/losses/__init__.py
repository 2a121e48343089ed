"""Training objectives: one file per method, each a pure function plus a thin module.

``build_objective(name, **kwargs)`` returns the module registered under ``name``. Every module
in this package is imported here, so adding a method is adding one file.
"""
from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from kdlib.losses.kd import kd_loss, soft_kl
from kdlib.losses.registry import METHODS, LossOutput, register_method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_objective(name: str, **kwargs: float) -> nn.Module:
    return METHODS.get(name)(**kwargs)


__all__ = ["METHODS", "LossOutput", "build_objective", "kd_loss", "register_method", "soft_kl"]
