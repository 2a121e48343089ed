"""Image transforms built from torchvision ``transforms.v2``, registered by preset name.

Per-sample transforms work on ``uint8`` CHW tensors and end at ``uint8``; scaling to [0, 1] and
mean/std normalization happen once per batch in :class:`BatchNormalizer` (on the training
device), which on small images costs as much per sample as the augmentation itself.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from kdlib.registry import Registry

TransformFactory = Callable[..., v2.Transform]
TRAIN_PRESETS: Registry[TransformFactory] = Registry("augmentation preset")


@TRAIN_PRESETS.register("none")
def no_augmentation(image_size: int) -> v2.Transform:
    return v2.Identity()


@TRAIN_PRESETS.register("shift")
def random_shift(image_size: int, shift_px: int = 2, hflip: bool = False) -> v2.Transform:
    """Random translation by up to ``shift_px`` pixels (zero padding), as Hinton et al.'s ±2 px
    jitter on MNIST; optional horizontal flip (never for digits)."""
    steps: list[v2.Transform] = [v2.RandomCrop(image_size, padding=shift_px)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def build_transform(
    preset: str,
    image_size: int,
    source_size: int | None,
    train: bool,
    options: dict[str, Any] | None = None,
) -> v2.Transform:
    """The per-sample transform: resize when the stored size differs from the model's input
    size, then the augmentation preset (training only)."""
    steps: list[v2.Transform] = []
    if source_size != image_size:
        steps += [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    if train:
        steps.append(TRAIN_PRESETS.get(preset)(image_size, **(options or {})))
    return v2.Compose(steps) if steps else v2.Identity()


class BatchNormalizer(nn.Module):
    """``uint8`` batch → float ``(x/255 − mean) / std``, optionally channels_last."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool = False):
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, -1, 1, 1)))
        self.register_buffer("shift", torch.tensor(mean).view(1, -1, 1, 1) / torch.tensor(std).view(1, -1, 1, 1))
        self.channels_last = channels_last

    def forward(self, images: Tensor) -> Tensor:
        out = images.float() * self.scale - self.shift
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out
