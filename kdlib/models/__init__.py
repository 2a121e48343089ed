"""Every model is built by one call, :func:`build_model`, through timm's registry.

The project's own architectures (``cnn_small``, ``rescnn``; one file each in this package)
register themselves with ``timm.models.register_model``; every module here is imported with the
package, so adding an architecture is adding one file, and timm names (``resnet18``,
``mobilenetv2_100``, ``convnext_atto``, ``deit_tiny_distilled_patch16_224``…) and ours are
built the same way. :class:`ModelSpec` is the architecture half of a model preset (the other
half is its training recipe, :class:`kdlib.train.Recipe`).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from kdlib.models.pretrained import PretrainedUnavailable, pretrained_kwargs
from kdlib.schema import is_float, is_int, is_mapping, is_str, optional, setting

for _module in pkgutil.iter_modules(__path__):  # timm registration of our architectures
    importlib.import_module(f"{__name__}.{_module.name}")


def is_pretrained(v: Any) -> str | None:
    return None if isinstance(v, (bool, str)) and v != "" else "false, true, or a path to a weights file"


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """An architecture and how to build it: ``arch`` (a timm name), ``pretrained`` (false, true
    for timm's default weights, or a weights file), ``input_size`` (None: the data set's image
    size), ``kwargs`` for timm's entry point, and ``drop_path`` (stochastic depth rate)."""

    arch: str = setting(is_str)
    pretrained: bool | str = setting(is_pretrained, False)
    input_size: int | None = setting(optional(is_int(8)), None, required=True)
    kwargs: dict[str, Any] = setting(is_mapping, {})
    drop_path: float = setting(is_float(0, 1, hi_open=True), 0.0)

    def problems(self) -> list[tuple[str | None, str]]:
        if self.arch not in known_architectures():
            return [("arch", "not a timm architecture (see timm.list_models())")]
        return []

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of timm's entry point (``drop_path`` as ``drop_path_rate``)."""
        return {**self.kwargs, **({"drop_path_rate": self.drop_path} if self.drop_path else {})}

    def build(self, num_classes: int, in_chans: int) -> nn.Module:
        return build_model(self.arch, num_classes, in_chans, self.pretrained, **self.model_kwargs)


_ARCHITECTURES: set[str] = set()


def known_architectures() -> set[str]:
    if not _ARCHITECTURES:  # timm.list_models() takes ~50 ms; presets ask once each
        _ARCHITECTURES.update(timm.list_models())
    return _ARCHITECTURES


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


__all__ = ["ModelSpec", "PretrainedUnavailable", "build_model", "count_parameters", "known_architectures"]
