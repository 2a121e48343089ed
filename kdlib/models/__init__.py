"""Every model is built by one call, :func:`build_model`, through timm's registry.

The project's own architectures (``cnn_small``, ``rescnn``) register themselves with
``timm.models.register_model`` when this package is imported, so timm names (``resnet18``,
``mobilenetv2_100``, ``convnext_atto``, ``deit_tiny_distilled_patch16_224``…) and ours are
built the same way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
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
    if isinstance(pretrained, str):
        model = timm.create_model(arch, num_classes=num_classes, in_chans=in_chans, pretrained=False, **kwargs)
        state = read_state_dict(Path(pretrained))
        own = model.state_dict()
        if state.keys() == own.keys() and all(state[k].shape == own[k].shape for k in own):
            model.load_state_dict(state)  # the file fits this task exactly: keep every weight
            return model
        # otherwise timm adapts it (new classifier, stem summed/repeated for other channels)
    return timm.create_model(
        arch,
        num_classes=num_classes,
        in_chans=in_chans,
        **pretrained_kwargs(arch, pretrained),
        **kwargs,
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file; unwraps our checkpoints
    (``state_dict``) and DeiT/ConvNeXt-style ones (``model``)."""
    if not path.is_file():
        raise PretrainedUnavailable(f"pretrained weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["PretrainedUnavailable", "build_model", "count_parameters", "known_architectures"]
