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
import inspect
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from kdlib.models.adapt import LoadReport, PretrainedMismatch, load_pretrained
from kdlib.models.adapt import read_state_dict as _read_state_dict
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
        # whether a `pretrained` file exists is checked for the presets a run uses only
        # (stages.params.Params.problems): a preset naming weights this machine lacks must not
        # make the whole params.yaml invalid while it is unused
        return kwargs_problems(self.arch, self.kwargs, drop_path=bool(self.drop_path))

    def missing_weights(self) -> str | None:
        """Why ``pretrained`` cannot be loaded on this machine (a path that is not a file), or None."""
        if isinstance(self.pretrained, str) and not Path(self.pretrained).is_file():
            return ("no such file; expected false, true (timm's default weights) or the path of an existing "
                    ".safetensors / .pth / .bin state dict (relative to the repository root)")
        return None

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of timm's entry point (``drop_path`` as ``drop_path_rate``)."""
        return {**self.kwargs, **({"drop_path_rate": self.drop_path} if self.drop_path else {})}

    def build(self, num_classes: int, in_chans: int) -> nn.Module:
        return build_model(self.arch, num_classes, in_chans, self.pretrained, **self.model_kwargs)


_ARCHITECTURES: set[str] = set()
# keyword arguments the caller sets through other keys, never through `kwargs`
_SET_ELSEWHERE = {"num_classes": "the data set's classes", "in_chans": "the data set's channels",
                  "pretrained": "the preset's `pretrained`"}


class _Captured(Exception):
    """Raised in place of timm's model builder: the model class and kwargs an entry point chose."""

    def __init__(self, model_cls: Any, kwargs: dict[str, Any]) -> None:
        super().__init__("captured")
        self.model_cls, self.kwargs = model_cls, kwargs


def _init_keywords(model_cls: Any) -> set[str] | None:
    """The keyword arguments ``model_cls(...)`` accepts: its ``__init__``'s named parameters and,
    while an ``__init__`` forwards ``**kwargs``, those of the next class in the MRO (as
    ``super().__init__(*args, **kwargs)`` does). ``None`` when the chain ends in a ``**kwargs``
    that is not forwarded to a class with named parameters (then anything may be accepted)."""
    if not inspect.isclass(model_cls):
        return None
    names: set[str] = set()
    for klass in model_cls.__mro__:
        if klass in (nn.Module, object):
            return None  # reached nn.Module's (*args, **kwargs): the chain swallows keywords
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None


def _timm_model_class(arch: str, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
    """(model class, final constructor kwargs) that timm's entry point for ``arch`` would pass to
    ``build_model_with_cfg``, found by calling the entry point with that builder replaced by one
    that records its arguments and stops (so nothing is built); ``None`` if the entry point does
    not go through the builder or fails first. The swap is process-wide for the call's duration:
    call it while no other thread builds a timm model (parameter checks run before any work)."""
    from timm.models import _builder

    original = _builder.build_model_with_cfg

    def capture(model_cls: Any, variant: str, pretrained: bool, *args: Any, **kw: Any) -> Any:
        raise _Captured(model_cls, kw)

    # timm's model modules import the builder by name, so each module's reference is swapped
    patched = [m for name, m in list(sys.modules.items())
               if name.startswith("timm.models") and getattr(m, "build_model_with_cfg", None) is original]
    for module in patched:
        module.build_model_with_cfg = capture
    try:
        timm.models.model_entrypoint(arch)(pretrained=False, **kwargs)
    except _Captured as found:
        return found.model_cls, found.kwargs
    except Exception:  # the entry point refused something before building: not ours to judge here
        return None
    finally:
        for module in patched:
            module.build_model_with_cfg = original
    return None


def accepted_kwargs(arch: str, kwargs: dict[str, Any] | None = None) -> set[str] | None:
    """The keyword arguments ``arch``'s model constructor accepts, or ``None`` when that cannot be
    told from signatures (the check is then skipped, never guessed).

    Our architectures name their class (:func:`kdlib.models.base.own_model`); for timm's, the
    class is the one the entry point hands ``build_model_with_cfg`` (ResNet, VisionTransformer,
    ConvNeXt, EfficientNet…). Models built from a config object whose constructor takes
    ``**kwargs`` (timm's ByobNet, RegNet, MaxxVit, NormFreeNet…) give ``None``.
    """
    entry = timm.models.model_entrypoint(arch)
    own = getattr(entry, "model_cls", None)
    if own is not None:
        return _init_keywords(own)
    found = _timm_model_class(arch, dict(kwargs or {}))
    if found is None:
        return None
    # the builder's own keys (features_only, out_indices…) are left out: they make a feature
    # extractor, not a classifier
    return _init_keywords(found[0])


def kwargs_problems(arch: str, kwargs: dict[str, Any], drop_path: bool = False) -> list[tuple[str | None, str]]:
    """``(key, expected)`` for each entry of a preset's ``kwargs`` that ``arch`` would not use as
    given: a keyword its constructor does not accept (listing those it does), one set by another
    key (``num_classes``…), or ``null`` (timm.create_model drops None values, so the default
    would be used silently); and ``drop_path`` when the model has no ``drop_path_rate``."""
    found: list[tuple[str | None, str]] = []
    for key in kwargs:
        if not isinstance(key, str) or "." in key:
            found.append((None, f"kwargs key {key!r}: expected a keyword-argument name"))
        elif key in _SET_ELSEWHERE:
            found.append((f"kwargs.{key}", f"expected no such key: it is set from {_SET_ELSEWHERE[key]}"))
        elif kwargs[key] is None:
            found.append((f"kwargs.{key}", "expected a value (timm.create_model drops null keyword arguments, so "
                                           "the default would be used; remove the key for the default)"))
        elif key == "drop_path_rate" and drop_path:
            found.append((f"kwargs.{key}", "expected no drop_path_rate when drop_path is set (drop_path sets it)"))
    if found:
        return found
    accepted = accepted_kwargs(arch, kwargs)
    if accepted is None:
        return []
    allowed = ", ".join(sorted(accepted - set(_SET_ELSEWHERE)))
    found += [(f"kwargs.{key}", f"not a keyword argument of {arch}; it accepts: {allowed}")
              for key in kwargs if key not in accepted]
    if drop_path and "drop_path_rate" not in accepted:
        found.append(("drop_path", f"{arch} has no stochastic depth (no drop_path_rate argument); expected 0"))
    return found


def meta_model(spec: ModelSpec, in_chans: int) -> nn.Module | None:
    """``spec``'s model built on torch's ``meta`` device, in eval mode: every shape is computed, no
    memory is allocated and no weights are loaded (a DeiT-B in ~0.1 s), so checks before any work can
    ask the model itself what it accepts. None when the model cannot be built there (an initializer
    that needs real values): the real build will say what is wrong."""
    try:
        with torch.device("meta"):
            model = timm.create_model(spec.arch, num_classes=2, in_chans=in_chans, pretrained=False,
                                      **spec.model_kwargs)
    except Exception:  # noqa: BLE001 - not judged here
        return None
    return model.eval()


def input_problem(model: nn.Module, arch: str, in_chans: int, size: int) -> str | None:
    """Why ``model`` (from :func:`meta_model`) refuses a ``size`` × ``size`` input, or None.

    The model is run once on a meta tensor, so every constraint it really has is found — a ViT's
    fixed grid (``Input height (64) doesn't match model (384)``), a CNN that pools a small input down
    to nothing, a Swin window — not a list of known ones. Without this a DeiT-B-384 student given
    64-px images trained its teacher first and failed an hour later."""
    try:
        with torch.no_grad():
            model(torch.empty(1, in_chans, size, size, device="meta"))
    except Exception as err:  # noqa: BLE001 - whatever the model raises is its refusal
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        return f"{arch} refuses {size}×{size} inputs ({type(err).__name__}: {reason})"
    return None


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
    ``pretrained``: ``True`` loads timm's default (hub) weights, timm adapting head and stem;
    a path loads that file through :func:`kdlib.models.adapt.load_pretrained`, which drops a
    classifier of another class count, adapts the stem to ``in_chans``, resamples ViT position
    embeddings to the model's grid, logs what it did on ``kdlib.models`` and refuses any other
    shape mismatch (:class:`PretrainedMismatch`, naming the key and both shapes).
    """
    if arch not in known_architectures():
        raise KeyError(f"unknown architecture {arch!r} (not in timm's registry)")
    if isinstance(pretrained, str):
        path = Path(pretrained)
        if not path.is_file():  # before building: a ViT-B takes seconds to initialize
            raise PretrainedUnavailable(f"pretrained weights file {str(path)!r} for {arch!r} does not exist")
        model = timm.create_model(arch, num_classes=num_classes, in_chans=in_chans, pretrained=False, **kwargs)
        load_pretrained(model, path)
        return model
    return timm.create_model(
        arch,
        num_classes=num_classes,
        in_chans=in_chans,
        **pretrained_kwargs(arch, pretrained),
        **kwargs,
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (``.safetensors`` or torch), unwrapped from our checkpoints
    (``state_dict``) and DeiT/ConvNeXt-style ones (``model``), DDP's ``module.`` prefix stripped."""
    return _read_state_dict(path)[0]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["LoadReport", "ModelSpec", "PretrainedMismatch", "PretrainedUnavailable", "accepted_kwargs", "build_model",
           "count_parameters", "input_problem", "known_architectures", "meta_model", "kwargs_problems", "load_pretrained", "read_state_dict"]
