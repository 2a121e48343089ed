"""Loading a weights file (ImageNet-pretrained, or another task's) into a model built for a new task.

Fine-tuning an ImageNet checkpoint on CUB, Dogs or VOC changes the model in three known ways,
and each is adapted here the way the source projects (and timm) do it:

* **classifier(s)**: 1000 -> C classes. The file's head is dropped and the model keeps its own
  fresh initialization (timm's init, so ConvNeXt's ``head_init_scale`` still applies). DeiT's
  distilled models have two heads, ``head`` and ``head_dist``; both go, as DeiT's ``--finetune``
  drops every head whose shape differs. The classifier names come from the model's
  ``pretrained_cfg["classifier"]``.
* **stem**: 3 -> ``in_chans`` input channels (e.g. a 1-channel data set). timm's
  :func:`~timm.models.adapt_input_conv`: for one channel the RGB filters are summed (the response
  to a grey image equals the RGB model's response to that image repeated over R, G, B); for more,
  the RGB filters are repeated and scaled by 3 / in_chans. The stem is
  ``pretrained_cfg["first_conv"]``.
* **ViT absolute position embeddings**: the checkpoint's patch grid -> the model's (DeiT-B at
  224 px has 14x14 patches, at 384 px 24x24). The prefix tokens (class, and DeiT's distillation
  token) are kept in front unchanged and the grid is resampled bicubically with
  ``align_corners=False`` and **no antialiasing**, exactly as DeiT's ``main.py --finetune`` does
  it, through timm's :func:`~timm.layers.resample_abs_pos_embed` (``antialias=False``; timm's own
  loader uses antialias=True, which for upsampling uses PIL's cubic kernel, a=-0.5 instead of
  a=-0.75, and gives different numbers).

Anything else whose shape differs is an error naming the key and both shapes, raised before any
training: loading it partially (LSHFM's ``strict=False``) silently trains a different model.
Files are ``.safetensors`` or torch files (``.pth`` / ``.pth.tar`` / ``.bin`` / ``.pt``);
a ``{"model": ...}`` (DeiT, ConvNeXt) or ``{"state_dict": ...}`` (ours, the LS–KD study's,
torchvision-style trainers) wrapper is unwrapped, and DDP's ``module.`` (or torch.compile's
``_orig_mod.``) prefix stripped. A file in an original repository's key layout (Facebook's
ConvNeXt: ``downsample_layers.*``, ``dwconv``…) is converted by the architecture's timm
``checkpoint_filter_fn`` first.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

LOG = logging.getLogger("kdlib.models")

# wrappers of a state dict inside a training checkpoint, tried in this order
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
# key prefixes added by DDP (``module.``) and torch.compile (``_orig_mod.``)
_PREFIXES = ("module.", "_orig_mod.")


class PretrainedMismatch(ValueError):
    """A weights file does not fit the model in a way that can be adapted."""


@dataclass(frozen=True)
class Resized:
    """A tensor resampled to the model's shape (ViT position embeddings)."""

    key: str
    file_shape: tuple[int, ...]
    model_shape: tuple[int, ...]
    file_grid: tuple[int, int]
    model_grid: tuple[int, int]
    prefix_tokens: int


@dataclass(frozen=True)
class AdaptedStem:
    """The first convolution's weight changed from the file's input channels to the model's."""

    key: str
    file_channels: int
    model_channels: int


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained` did with each tensor of the file.

    ``loaded``: keys copied as they are; ``dropped``: classifier keys left at the model's fresh
    initialization because the class count differs (``file_classes`` -> ``model_classes``);
    ``resized`` / ``adapted``: tensors transformed to fit; ``missing``: model keys the file does
    not have (left at initialization); ``unexpected``: file keys the model does not have
    (ignored); ``converted_by``: the timm filter that remapped an original-repository layout.
    """

    source: str
    loaded: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    file_classes: int | None = None
    model_classes: int | None = None
    resized: tuple[Resized, ...] = ()
    adapted: tuple[AdaptedStem, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    stripped_prefix: str | None = None
    converted_by: str | None = None
    file_tensors: int = 0

    def lines(self) -> list[tuple[int, str]]:
        """(logging level, message) per category that happened, one line each."""
        out: list[tuple[int, str]] = []
        how = [f"stripped the {self.stripped_prefix!r} prefix"] if self.stripped_prefix else []
        how += [f"converted to timm's layout by {self.converted_by}"] if self.converted_by else []
        out.append((logging.INFO, f"pretrained weights {self.source}: loaded {len(self.loaded)} of "
                                  f"{self.file_tensors} tensors as is" + (f" ({'; '.join(how)})" if how else "")))
        if self.dropped:
            out.append((logging.INFO, f"pretrained weights: dropped {', '.join(self.dropped)} ({self.file_classes} -> "
                                      f"{self.model_classes} classes; re-initialized)"))
        for r in self.resized:
            out.append((logging.INFO, f"pretrained weights: resized {r.key} {r.file_shape} -> {r.model_shape} "
                                      f"({r.file_grid[0]}x{r.file_grid[1]} -> {r.model_grid[0]}x{r.model_grid[1]} "
                                      f"patches, bicubic; {r.prefix_tokens} prefix token(s) kept)"))
        for a in self.adapted:
            how_ = "summed over RGB" if a.model_channels == 1 else f"repeated, scaled by {a.file_channels}/{a.model_channels}"
            out.append((logging.INFO, f"pretrained weights: adapted {a.key} {a.file_channels} -> {a.model_channels} "
                                      f"channels ({how_})"))
        if self.missing:
            out.append((logging.WARNING, f"pretrained weights: not in the file, left at initialization: "
                                         f"{', '.join(self.missing)}"))
        if self.unexpected:
            out.append((logging.WARNING, f"pretrained weights: in the file but not in the model, ignored: "
                                         f"{', '.join(self.unexpected)}"))
        return out

    def log(self, logger: logging.Logger = LOG) -> None:
        for level, message in self.lines():
            logger.log(level, message)


def read_state_dict(path: Path) -> tuple[dict[str, Tensor], str | None]:
    """The tensors of a weights file and the DDP/compile prefix stripped from them (or None).

    ``.safetensors`` is read with safetensors; anything else with ``torch.load(weights_only=True)``
    (so a pickled file cannot run code), then unwrapped from ``{"state_dict": …}`` /
    ``{"model": …}`` checkpoints."""
    path = Path(path)
    if not path.is_file():
        from kdlib.models.pretrained import PretrainedUnavailable

        raise PretrainedUnavailable(f"pretrained weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            # DeiT's and ConvNeXt's training checkpoints pickle their argparse.Namespace of arguments:
            # plain data, allowed; anything else that needs code to unpickle is refused
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, or a pickle needing arbitrary classes
        raise PretrainedMismatch(f"pretrained weights file {str(path)!r} cannot be read as a state dict "
                                 f"(.safetensors, or a torch file of tensors): {err}") from None
    while isinstance(state, Mapping) and not _is_tensor_dict(state):
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            raise PretrainedMismatch(
                f"pretrained weights file {str(path)!r}: expected a state dict (name -> tensor) or a checkpoint "
                f"holding one under one of {', '.join(_WRAPPER_KEYS)}; its top-level keys are "
                f"{', '.join(map(str, list(state)[:10]))}")
        state = inner
    if not isinstance(state, Mapping) or not state:
        raise PretrainedMismatch(f"pretrained weights file {str(path)!r} holds no tensors")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, Tensor)}
    for prefix in _PREFIXES:
        if tensors and all(k.startswith(prefix) for k in tensors):
            return {k[len(prefix):]: v for k, v in tensors.items()}, prefix
    return tensors, None


def _is_tensor_dict(state: Mapping[Any, Any]) -> bool:
    values = list(state.values())
    return bool(values) and sum(isinstance(v, Tensor) for v in values) * 2 > len(values)


def _module_names(cfg_value: Any) -> tuple[str, ...]:
    if not cfg_value:
        return ()
    return (cfg_value,) if isinstance(cfg_value, str) else tuple(cfg_value)


def _classifiers(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier(s): timm's ``pretrained_cfg["classifier"]``, or, for a model
    without one (ours), the module ``get_classifier()`` returns."""
    names = _module_names((getattr(model, "pretrained_cfg", None) or {}).get("classifier"))
    if names:
        return names
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    return tuple(name for name, module in model.named_modules() if head is not None and module is head)


def _stems(model: nn.Module) -> tuple[str, ...]:
    """Module names of the input convolution: ``pretrained_cfg["first_conv"]``, or the first Conv2d."""
    names = _module_names((getattr(model, "pretrained_cfg", None) or {}).get("first_conv"))
    if names:
        return names
    return next(((name,) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)), ())


def _under(key: str, modules: tuple[str, ...]) -> bool:
    return any(key == m or key.startswith(m + ".") for m in modules)


def _square_side(count: int) -> int | None:
    side = math.isqrt(count) if count > 0 else 0
    return side if side * side == count else None


def _convert_layout(state: dict[str, Tensor], model: nn.Module, own: Mapping[str, Tensor]
                    ) -> tuple[dict[str, Tensor], str | None]:
    """The file in timm's key layout: unchanged when most of its keys are the model's already;
    otherwise passed through the architecture's timm ``checkpoint_filter_fn`` (which remaps e.g.
    Facebook's ConvNeXt checkpoints), kept when that makes more keys match."""
    def matching(s: Mapping[str, Tensor]) -> int:
        return sum(k in own for k in s)

    if matching(state) * 2 >= len(state):
        return state, None
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state, None
    try:
        converted = filter_fn(dict(state), model)
    except Exception:  # the filter does not know this layout either: report the keys as they are
        return state, None
    if not isinstance(converted, Mapping) or matching(converted) <= matching(state):
        return state, None
    return dict(converted), f"{module.__name__}.checkpoint_filter_fn"


def adapt_state_dict(
    state: Mapping[str, Tensor],
    model: nn.Module,
    source: str = "<state dict>",
    stripped_prefix: str | None = None,
) -> tuple[dict[str, Tensor], LoadReport]:
    """The tensors to load into ``model`` (each with the model's shape) and the report.

    Raises :class:`PretrainedMismatch` naming every key whose shape differs in a way that is not
    a class count, an input-channel count or a ViT position-embedding grid, and when no tensor of
    the file belongs to the model at all."""
    own = model.state_dict()
    state, converted_by = _convert_layout(dict(state), model, own)
    classifiers, stems = _classifiers(model), _stems(model)
    stem_weights = {f"{s}.weight" for s in stems}
    loadable: dict[str, Tensor] = {}
    loaded, dropped, unexpected, problems = [], [], [], []
    resized: list[Resized] = []
    adapted: list[AdaptedStem] = []
    classes: tuple[int | None, int | None] = (None, None)
    order = {key: i for i, key in enumerate(own)}  # report in the model's order (safetensors sorts keys)
    for key, value in sorted(state.items(), key=lambda item: order.get(item[0], len(order))):
        if key not in own:
            unexpected.append(key)
            continue
        target = own[key]
        file_shape, model_shape = tuple(value.shape), tuple(target.shape)
        if file_shape == model_shape:
            loadable[key] = value
            loaded.append(key)
        elif _under(key, classifiers) and value.ndim >= 1 and file_shape[1:] == model_shape[1:]:
            dropped.append(key)  # 1000 -> C classes: the model's fresh head stays
            classes = (file_shape[0], model_shape[0])
        elif (key in stem_weights and value.ndim == 4 and file_shape[0] == model_shape[0]
              and file_shape[2:] == model_shape[2:]):
            from timm.models import adapt_input_conv

            try:
                loadable[key] = adapt_input_conv(model_shape[1], value, base_chans=file_shape[1])
            except (NotImplementedError, ValueError) as err:
                problems.append(f"{key}: file {file_shape} vs model {model_shape} ({err})")
                continue
            adapted.append(AdaptedStem(key, file_shape[1], model_shape[1]))
        elif key.rsplit(".", 1)[-1] == "pos_embed" and value.ndim == 3 and file_shape[2] == model_shape[2]:
            done = _resample_pos_embed(key, value, model, model_shape)
            if isinstance(done, str):
                problems.append(done)
                continue
            loadable[key], entry = done
            resized.append(entry)
        else:
            problems.append(f"{key}: file {file_shape} vs model {model_shape}")
    if problems:
        raise PretrainedMismatch(
            f"pretrained weights {source} do not fit {type(model).__name__}: shapes differ in a way that is "
            "not a class count (classifier), an input-channel count (first conv) or a ViT position-embedding "
            "grid:\n  " + "\n  ".join(problems) + _other_architecture_hint(len(unexpected), len(state)))
    if not loadable:
        raise PretrainedMismatch(
            f"pretrained weights {source}: none of the file's {len(state)} tensors belong to "
            f"{type(model).__name__} (file keys start {', '.join(list(state)[:4])}; the model's "
            f"{', '.join(list(own)[:4])}): is it the weights of another architecture?")
    missing = [k for k in own if k not in state]
    report = LoadReport(source=source, loaded=tuple(loaded), dropped=tuple(dropped), file_classes=classes[0],
                        model_classes=classes[1], resized=tuple(resized), adapted=tuple(adapted),
                        missing=tuple(missing), unexpected=tuple(unexpected), stripped_prefix=stripped_prefix,
                        converted_by=converted_by, file_tensors=len(state))
    return loadable, report


def _other_architecture_hint(unexpected: int, total: int) -> str:
    if unexpected * 2 <= total:
        return ""
    return (f"\n({unexpected} of the file's {total} tensors are not in the model at all: is it the weights of "
            "another architecture?)")


def _resample_pos_embed(key: str, value: Tensor, model: nn.Module, model_shape: tuple[int, ...]
                        ) -> tuple[Tensor, Resized] | str:
    """DeiT ``--finetune``'s resampling through timm's function, or the reason it does not apply."""
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    file_side = _square_side(value.shape[1] - prefix)
    if grid is None or file_side is None or tuple(grid)[0] * tuple(grid)[1] + prefix != model_shape[1]:
        return (f"{key}: file {tuple(value.shape)} vs model {model_shape} (not a square patch grid after "
                f"{prefix} prefix token(s); cannot be resampled)")
    new = resample_abs_pos_embed(value, new_size=list(grid), old_size=[file_side, file_side],
                                 num_prefix_tokens=prefix, interpolation="bicubic", antialias=False,
                                 align_corners=False)
    return new, Resized(key, tuple(value.shape), tuple(new.shape), (file_side, file_side),
                        (int(grid[0]), int(grid[1])), prefix)


def load_pretrained(model: nn.Module, path: str | Path, logger: logging.Logger | None = LOG) -> LoadReport:
    """Load the weights file at ``path`` into ``model`` (adapting heads, stem and position
    embeddings as the module docstring says), log the report at INFO (missing / unexpected keys
    at WARNING) on ``logger`` and return it."""
    state, prefix = read_state_dict(Path(path))
    loadable, report = adapt_state_dict(state, model, source=repr(str(path)), stripped_prefix=prefix)
    model.load_state_dict(loadable, strict=False)
    if logger is not None:
        report.log(logger)
    return report


__all__ = ["AdaptedStem", "LoadReport", "PretrainedMismatch", "Resized", "adapt_state_dict", "load_pretrained",
           "read_state_dict"]
