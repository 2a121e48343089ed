"""Where each stage's pre-ReLU output is, and which BatchNorm produced it (OFD's and ReviewKD's features).

A stage's pre-ReLU output is its output before its final ReLU: for a ResNet the sum of the last block's
second (third) BatchNorm and the shortcut, as mdistiller's ``preact_feats``. Models never return it, so
it is read by a forward hook (:mod:`kdlib.taps`): as the **input** of the stage's last ReLU module
(``"layer4.1.act2:input"``), or as a stage's own output where the stage ends without an activation (a
MobileNet's linear bottleneck, as mdistiller's MobileNetV2 ``preact_feats``). The BatchNorm is the one
whose affine parameters ``(γ, β)`` model that feature's per-channel distribution ``N(β, γ²)`` (OFD's
margin; mdistiller's ``get_bn_before_relu``).

:func:`pre_relu_stages` answers per model, one entry per stage of timm's ``feature_info`` (so stage
indices mean the same as elsewhere), ``None`` for a stage whose activation is not a ReLU. Our own models
answer with a ``pre_relu_stages()`` method in their own file (a new model adds one there); timm's families
are handled below. Any other model has none (``None``): a method that needs them refuses it naming
:data:`PRE_RELU_MODELS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from kdlib.taps import module_input, stage_modules

PRE_RELU_MODELS = ("timm's resnet* (ReLU activations), mobilenetv2_* and mobilenetv3_* (stages that end in a linear "
                   "bottleneck or a ReLU), cnn_small, rescnn")


@dataclass(frozen=True)
class PreReluStage:
    """``feature``: the layer (a :mod:`kdlib.taps` path: a module path, or a module's input) holding the stage's
    pre-ReLU output; ``bn``: the module path of the BatchNorm whose affine parameters model it."""

    feature: str
    bn: str


def pre_relu_stages(model: nn.Module) -> list[PreReluStage | None] | None:
    """One entry per stage (timm's ``feature_info``) of ``model``, ``None`` for a stage that does not end in a
    ReLU after a BatchNorm; ``None`` for a model whose pre-ReLU outputs are unknown."""
    own = getattr(model, "pre_relu_stages", None)
    if callable(own):
        return list(own())
    for family, rule in _timm_rules():
        if isinstance(model, family):
            return rule(model)
    return None


def pre_relu_bn(model: nn.Module, feature: str) -> str | None:
    """The module path of the BatchNorm behind the pre-ReLU layer ``feature`` of ``model``, or ``None``."""
    for stage in pre_relu_stages(model) or ():
        if stage is not None and stage.feature == feature:
            return stage.bn
    return None


def _is_relu(module: nn.Module) -> bool:
    return type(module) in (nn.ReLU, nn.ReLU6)


def _resnet(model: nn.Module) -> list[PreReluStage | None]:
    """timm's ResNet: the stem's ``act1`` after ``bn1``, then each stage's last block: its last activation
    (``act3`` of a Bottleneck, ``act2`` of a BasicBlock) after the shortcut sum, and that block's last BN."""
    out: list[PreReluStage | None] = []
    for path in stage_modules(model):
        if path == "act1":
            act, bn = "act1", "bn1"
        else:
            last = f"{path}.{len(model.get_submodule(path)) - 1}"
            n = 3 if hasattr(model.get_submodule(last), "act3") else 2
            act, bn = f"{last}.act{n}", f"{last}.bn{n}"
        relu = _is_relu(model.get_submodule(act)) and isinstance(model.get_submodule(bn), nn.BatchNorm2d)
        out.append(PreReluStage(module_input(act), bn) if relu else None)
    return out


def _efficientnet(model: nn.Module) -> list[PreReluStage | None]:
    """timm's EfficientNet / MobileNetV3 classes (mobilenetv2_*, mobilenetv3_*): a stage whose last block ends
    in a BatchNorm without activation (a linear bottleneck: ``bn3`` of an InvertedResidual, ``bn2`` of a
    DepthwiseSeparableConv) gives its own output; one whose last BatchNorm applies a ReLU (timm's
    ``BatchNormAct2d``) gives that ReLU's input; another activation (hard-swish) gives none."""
    out: list[PreReluStage | None] = []
    for path in stage_modules(model):
        stage = model.get_submodule(path)
        last = f"{path}.{len(stage) - 1}" if isinstance(stage, nn.Sequential) else path
        block = model.get_submodule(last)
        bns = [n for n, m in block.named_children() if isinstance(m, nn.BatchNorm2d)]
        if isinstance(block, nn.BatchNorm2d):  # the stem's BatchNormAct2d as a stage of its own
            bn = last
        elif bns:
            bn = f"{last}.{bns[-1]}"
        else:
            out.append(None)
            continue
        act = getattr(model.get_submodule(bn), "act", None)
        if isinstance(act, nn.Identity) and bn != last:
            out.append(PreReluStage(path, bn))  # a linear bottleneck (any residual is added after: as mdistiller)
        elif act is not None and _is_relu(act):
            out.append(PreReluStage(module_input(f"{bn}.act"), bn))
        else:
            out.append(None)
    return out


def _timm_rules() -> list[tuple[type, Callable[[nn.Module], list[PreReluStage | None]]]]:
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.resnet import ResNet

    return [(ResNet, _resnet), (EfficientNet, _efficientnet), (MobileNetV3, _efficientnet)]
