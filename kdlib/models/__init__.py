"""Every model is built by one call, :func:`build_model`, through timm's registry.

The project's own architectures (``cnn_small``, ``rescnn``) register themselves with
``timm.models.register_model`` when this package is imported, so timm names (``resnet18``,
``mobilenetv2_100``, ``convnext_atto``, ``deit_tiny_distilled_patch16_224``…) and ours are
built the same way.
"""
from __future__ import annotations

from typing import Any

import timm
from torch import nn

from kdlib.models import cnn_small, rescnn  # noqa: F401  (timm registration)
from kdlib.models.pretrained import PretrainedUnavailable, pretrained_kwargs


def known_architectures() -> set[str]:
    return set(timm.list_models())


def build_model(
    arch: str,
    num_classes: int,
    in_chans: int,
    pretrained: bool | str = False,
    **kwargs: Any,
) -> nn.Module:
    """Build ``arch`` with a ``num_classes`` head for ``in_chans`` input channels.

    ``kwargs`` go to the timm entry point (``drop_path_rate``, ``img_size``, ``depth``, …).
    Pretrained heads and stems are adapted by timm when ``num_classes`` / ``in_chans`` differ.
    """
    if arch not in known_architectures():
        raise KeyError(f"unknown architecture {arch!r} (not in timm's registry)")
    return timm.create_model(
        arch,
        num_classes=num_classes,
        in_chans=in_chans,
        **pretrained_kwargs(arch, pretrained),
        **kwargs,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["PretrainedUnavailable", "build_model", "count_parameters", "known_architectures"]
