"""Intermediate features of a model by module path, read with forward hooks.

Feature-map methods (FitNet, AT, NST, SP, ...) compare what named layers of the student and the teacher
output. The models are never edited for it (mdistiller rewrites every model's ``forward`` to return a
``feats`` list): a forward hook on each named module keeps its output during the pass, as torchdistill's
``ForwardHookManager`` does.

A layer is named either by its **module path** (``"layer2"``, ``"blocks.4"``, anything in
``model.named_modules()``) or by an **integer**, the index of one of the model's stages as timm's
``feature_info`` lists them (``features_only`` uses the same list): for a ResNet ``0`` is the stem
(``act1``) and ``1`` … ``4`` are ``layer1`` … ``layer4``, exactly mdistiller's ``feats[0]`` … ``feats[4]``,
so its hint-layer numbers carry over. Negative integers count from the last stage. :data:`PRE_LOGITS`
names the pooled pre-logits features (``forward_head(x, pre_logits=True)``: PKT and RKD read them).

Two more names read what a module's output does not show:

* ``"<module path>:input"`` (:func:`module_input`) is the **input** of that module, kept by a forward
  pre-hook (cloned: an in-place activation overwrites its input after the hook). A ReLU module's input
  is the feature before the ReLU.
* ``"pre_relu:<i>"`` (:func:`pre_relu`) is **the pre-ReLU output of stage i** (same indices as above,
  negative from the last): the stage's output before its final ReLU, which OFD and ReviewKD distill. Each
  model says where that is in :func:`kdlib.models.pre_relu.pre_relu_stages` (a ``pre_relu_stages()``
  method of our own models, a rule per timm family: ResNet, MobileNetV2/V3), as a module path or a
  ``":input"`` name, with the BatchNorm whose affine parameters give the feature's distribution (OFD's
  margin). It resolves to that path; a model without them is refused naming the models that have them.

Shapes are known before training (:func:`layer_shapes`, one pass on a zero image, which also works on
torch's ``meta`` device), so a method builds its adapters (FitNet's regressor) in ``setup`` and the
``check`` stage refuses a layer that does not exist, or a pairing a method cannot use, before any work.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

PRE_LOGITS = "pre_logits"
INPUT_SUFFIX = ":input"
PRE_RELU_PREFIX = "pre_relu:"
Layer = int | str


def module_input(path: str) -> str:
    """The layer name of the input of the module at ``path`` (``"layer4.1.act2"`` → ``"layer4.1.act2:input"``)."""
    return path + INPUT_SUFFIX


def pre_relu(stage: int) -> str:
    """The layer name of stage ``stage``'s pre-ReLU output (``-1``: the last stage's)."""
    return f"{PRE_RELU_PREFIX}{stage}"


def split_input(path: str) -> tuple[str, bool]:
    """``(module path, whether the layer is that module's input)`` of a resolved layer path."""
    return (path[:-len(INPUT_SUFFIX)], True) if path.endswith(INPUT_SUFFIX) else (path, False)


def stage_modules(model: nn.Module) -> list[str]:
    """The module paths of ``model``'s stages, from timm's ``feature_info`` (our own models list theirs
    the same way); ``[]`` when it lists none."""
    info = getattr(model, "feature_info", None)
    if info is None:
        return []
    entries = info.info if hasattr(info, "info") else info  # timm's FeatureInfo object or a plain list
    return [str(entry["module"]) for entry in entries]


def resolve_layers(model: nn.Module, layers: Sequence[Layer], role: str, arch: str = "") -> tuple[str, ...]:
    """Module paths (or :data:`PRE_LOGITS`, or ``"<path>:input"`` names) for ``layers``; a ``"pre_relu:<i>"``
    resolves to where that stage's pre-ReLU output is. Raises ``ValueError`` naming the layer, the ``role``
    model and what it has: a stage index out of range, a model without stages, a module path that does not
    exist, a model without known pre-ReLU stages (naming those that have them)."""
    name = f"the {role}" + (f" ({arch})" if arch else "")
    stages = stage_modules(model)
    modules = dict(model.named_modules())
    out: list[str] = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, str)):
            raise ValueError(f"{role}_layers: expected stage indices or module paths, got {layer!r}")
        if isinstance(layer, int):
            if not stages:
                raise ValueError(f"{role}_layers: {name} lists no stages (no timm feature_info); name its layers by "
                                 f"module path instead, e.g. one of {', '.join(list(modules)[1:6]) or 'none'}")
            if not -len(stages) <= layer < len(stages):
                raise ValueError(f"{role}_layers: stage {layer} of {name}, which has {len(stages)} "
                                 f"(0-{len(stages) - 1}: {', '.join(stages)})")
            out.append(stages[layer])
        elif layer.startswith(PRE_RELU_PREFIX):
            out.append(_resolve_pre_relu(model, layer, role, name if arch else f"{name} ({type(model).__name__})"))
        elif layer == PRE_LOGITS:
            if not hasattr(model, "forward_head"):
                raise ValueError(f"{role}_layers: {PRE_LOGITS!r}: {name} has no timm forward_head")
            out.append(layer)
        elif split_input(layer)[0] not in modules or split_input(layer)[0] == "":
            close = [m for m in modules if m and (split_input(layer)[0] in m or m in layer)][:5]
            raise ValueError(f"{role}_layers: {name} has no module {layer!r}"
                             + (f"; similar: {', '.join(close)}" if close else "")
                             + (f"; its stages: {', '.join(stages)}" if stages else ""))
        else:
            out.append(layer)
    return tuple(out)


def _resolve_pre_relu(model: nn.Module, layer: str, role: str, name: str) -> str:
    from kdlib.models.pre_relu import PRE_RELU_MODELS, pre_relu_stages  # kdlib.models is heavier than this module

    if not re.fullmatch(r"-?\d+", layer[len(PRE_RELU_PREFIX):]):
        raise ValueError(f"{role}_layers: {layer!r}: expected {PRE_RELU_PREFIX}<stage index>, e.g. {pre_relu(-1)!r}")
    index = int(layer[len(PRE_RELU_PREFIX):])
    stages = pre_relu_stages(model)
    if stages is None:
        raise ValueError(f"{role}_layers: {name} has no known pre-ReLU stage features; the "
                         f"models that have them: {PRE_RELU_MODELS}")
    if not -len(stages) <= index < len(stages):
        raise ValueError(f"{role}_layers: {layer!r}: stage {index} of {name}, which has {len(stages)} "
                         f"(0-{len(stages) - 1})")
    stage = stages[index]
    if stage is None:
        known = [str(i) for i, s in enumerate(stages) if s is not None]
        raise ValueError(f"{role}_layers: {layer!r}: stage {index} of {name} does not end in a ReLU after a "
                         f"BatchNorm; its stages that do: {', '.join(known) or 'none'}")
    return stage.feature


@dataclass(frozen=True)
class LayerPlan:
    """The layers a method reads, resolved for this student and teacher: module paths (or
    :data:`PRE_LOGITS`, or a module's ``":input"``) in pairs, and each one's per-image output shape."""

    student: tuple[str, ...]
    teacher: tuple[str, ...]
    student_shapes: tuple[tuple[int, ...], ...]
    teacher_shapes: tuple[tuple[int, ...], ...]


class LayerTaps:
    """Forward hooks that keep the outputs of ``paths`` of ``model`` (the inputs, for ``":input"`` names)
    during each pass.

    ``forward(images)`` returns ``(logits, layers)``: the model's logits and one tensor per path, in
    order. The hooks stay registered for the life of this object; ``remove()`` takes them off."""

    def __init__(self, model: nn.Module, paths: Sequence[str]) -> None:
        self.model, self.paths = model, tuple(paths)
        self._seen: dict[str, Tensor] = {}
        modules = dict(model.named_modules())
        self._handles = []
        for p in dict.fromkeys(self.paths):
            if p == PRE_LOGITS:
                continue
            module, is_input = split_input(p)
            self._handles.append(modules[module].register_forward_pre_hook(self._input_keeper(p)) if is_input
                                 else modules[module].register_forward_hook(self._keeper(p)))

    def _keeper(self, path: str):  # noqa: ANN202 - a hook's signature is torch's
        def keep(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            # a timm stage can return a tuple (a ViT block with attention): the first item is the features
            self._seen[path] = output[0] if isinstance(output, (tuple, list)) else output
        return keep

    def _input_keeper(self, path: str):  # noqa: ANN202 - a hook's signature is torch's
        def keep(module: nn.Module, inputs: tuple) -> None:
            # a copy: an in-place module (ReLU(inplace=True)) overwrites the tensor it is given; the copy
            # keeps its place in the autograd graph, so gradients reach the layers before it
            self._seen[path] = inputs[0].clone()
        return keep

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        self._seen.clear()
        if PRE_LOGITS in self.paths:
            feature_map = self.model.forward_features(images)
            logits = self.model.forward_head(feature_map)
            self._seen[PRE_LOGITS] = self.model.forward_head(feature_map, pre_logits=True)
        else:
            logits = self.model(images)
        missing = [p for p in self.paths if p not in self._seen]
        if missing:  # a module the forward pass never called (a branch not taken)
            raise RuntimeError(f"the layers {', '.join(missing)} produced no output in the forward pass")
        layers = tuple(self._seen[p] for p in self.paths)
        self._seen.clear()
        return logits, layers

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@torch.no_grad()
def layer_shapes(model: nn.Module, paths: Sequence[str], in_chans: int, input_size: int) -> list[tuple[int, ...]]:
    """The shape of each layer's output for one image (batch dimension dropped), from one pass on a zero
    image in eval mode on the model's device (``meta`` included: no memory, no compute)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    taps = LayerTaps(model, paths)
    try:
        _, layers = taps.forward(torch.zeros(1, in_chans, input_size, input_size, device=device))
    finally:
        taps.remove()
        model.train(was_training)
    return [tuple(int(n) for n in t.shape[1:]) for t in layers]
