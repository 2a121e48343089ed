"""Image transforms, registered by augmentation preset name.

Per-sample transforms (torchvision ``transforms.v2``) work on ``uint8`` CHW tensors in the
DataLoader and end at ``uint8``. What is cheaper on a whole batch runs once per batch on the
training device: mean/std normalization (:class:`BatchNormalizer`) always, and a preset's
``batch`` part. On 28-px images a per-sample v2 op costs as much as the student's whole
training step, so the MNIST ``shift`` preset translates the batch in one gather.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2

from kdlib.registry import Registry
from kdlib.schema import Check, is_bool, is_float, is_int


@dataclass(frozen=True)
class Augmentation:
    sample: v2.Transform | None  # per image, in the DataLoader (None: nothing per image)
    batch: nn.Module | None = None  # per uint8 batch, on the training device
    sizes_itself: bool = False  # the sample transform already outputs image_size × image_size


AugmentationFactory = Callable[..., Augmentation]
TRAIN_PRESETS: Registry[AugmentationFactory] = Registry("augmentation preset")


class RandomShift(nn.Module):
    """Translate every image of a ``uint8`` batch by its own random offset in
    ``[-max_px, max_px]²``, filling with zeros.

    Per image this is exactly ``v2.RandomCrop(size, padding=max_px)``; here one padded copy and
    one gather serve the whole batch. Offsets come from ``seeds`` (one per image, see
    :mod:`kdlib.data.views`) when given, so a view can be replayed; otherwise from torch's
    global generator.
    """

    def __init__(self, max_px: int) -> None:
        super().__init__()
        self.max_px = max_px

    def offsets(self, seeds: Tensor) -> tuple[Tensor, Tensor]:
        """``(top, left)`` in ``[0, 2·max_px]`` from bits 8-23 and 32-47 of each seed (a seeded
        per-image transform never sees the seed's bits directly: it draws from a generator)."""
        span = 2 * self.max_px + 1
        return (seeds >> 8) % 65536 % span, (seeds >> 32) % 65536 % span

    def forward(self, images: Tensor, seeds: Tensor | None = None) -> Tensor:
        b, c, h, w = images.shape
        p, dev = self.max_px, images.device
        padded = F.pad(images, (p, p, p, p))
        if seeds is None:
            top, left = torch.randint(0, 2 * p + 1, (2, b)).to(dev)
        else:
            top, left = (t.to(dev) for t in self.offsets(seeds))
        rows = (top[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (left[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        return padded[torch.arange(b, device=dev)[:, None, None, None],
                      torch.arange(c, device=dev)[None, :, None, None], rows, cols]


@TRAIN_PRESETS.register("none")
def no_augmentation(image_size: int) -> Augmentation:
    return Augmentation(None)


@TRAIN_PRESETS.register("shift")
def random_shift(image_size: int, shift_px: int = 2, hflip: bool = False) -> Augmentation:
    """Random translation by up to ``shift_px`` pixels (zero fill), as Hinton et al.'s ±2 px
    jitter on MNIST, done per batch; optional horizontal flip (never for digits)."""
    return Augmentation(v2.RandomHorizontalFlip() if hflip else None, RandomShift(shift_px))


@TRAIN_PRESETS.register("imagenet")
def imagenet(image_size: int, scale: tuple[float, float] = (0.08, 1.0)) -> Augmentation:
    """The standard ImageNet recipe: RandomResizedCrop + horizontal flip."""
    return Augmentation(v2.Compose([v2.RandomResizedCrop(image_size, scale=tuple(scale), antialias=True),
                                    v2.RandomHorizontalFlip()]), sizes_itself=True)


@TRAIN_PRESETS.register("deit")
def deit(image_size: int, magnitude: int = 9, erase_prob: float = 0.25) -> Augmentation:
    """The DeiT+ConvNeXt FGVC project (DeiT's main.py): bicubic RandomResizedCrop, flip,
    RandAugment (2 ops, magnitude 9; DeiT's timm ``rand-m9-mstd0.5-inc1`` varies the magnitude,
    v2's does not) and random erasing with probability 0.25 (zero fill on uint8; DeiT fills with
    noise after normalization). As in timm, RandAugment replaces colour jitter. Mixup/CutMix are
    batch-level and not part of this preset."""
    return Augmentation(v2.Compose([
        v2.RandomResizedCrop(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandAugment(num_ops=2, magnitude=magnitude),
        v2.RandomErasing(p=erase_prob, value=0),
    ]), sizes_itself=True)


@TRAIN_PRESETS.register("cub_ls")
def cub_ls(image_size: int) -> Augmentation:
    """The LS–KD compatibility study (Chandrasegaran et al., ICML 2022) on CUB: RandomResizedCrop
    (scale 0.2–1, ratio 0.8–1.25), flip, rotation up to 45°, grayscale with probability 0.2,
    brightness/contrast jitter 0.2."""
    return Augmentation(v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), ratio=(0.8, 1.25), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(45),
        v2.RandomGrayscale(p=0.2),
        v2.ColorJitter(brightness=0.2, contrast=0.2),
    ]), sizes_itself=True)


@TRAIN_PRESETS.register("lshfm")
def lshfm(image_size: int) -> Augmentation:
    """LSHFM (Wang et al., TPAMI 2021; LSH feature mimicking, VOC/COCO): resize straight to
    image_size² (448 there), flip, colour jitter 0.3 (brightness, contrast, saturation)."""
    return Augmentation(v2.Compose([
        v2.Resize((image_size, image_size), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),
    ]), sizes_itself=True)


def _is_scale_range(v: Any) -> str | None:
    ok = (isinstance(v, (list, tuple)) and len(v) == 2
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
          and 0 < v[0] <= v[1] <= 1)
    return None if ok else "two numbers [lo, hi] with 0 < lo <= hi <= 1 (fractions of the image area)"


def _option_checks(image_size: int | None) -> dict[str, dict[str, Check]]:
    """preset → option → check, for every keyword option of every :data:`TRAIN_PRESETS` factory."""
    # a shift of image_size pixels or more leaves only fill: the image is gone
    max_shift = image_size - 1 if image_size else None
    return {
        "shift": {"shift_px": is_int(0, max_shift), "hflip": is_bool},
        "imagenet": {"scale": _is_scale_range},
        # v2.RandAugment has 31 magnitude bins: magnitude 0..30
        "deit": {"magnitude": is_int(0, 30), "erase_prob": is_float(0, 1)},
    }


def augment_option_problems(augment: str, options: dict[str, Any],
                            image_size: int | None = None) -> list[tuple[str, str]]:
    """``("augment_options.<key>", expected)`` for each option that preset ``augment`` does not
    take (listing those it takes) or whose value is out of range; ``[]`` for an unknown preset
    (reported on ``augment`` itself). ``image_size`` bounds ``shift_px`` (at most image_size − 1).

    Options are a factory's keyword parameters other than ``image_size``, so a new preset's
    options are known without an edit here; their ranges are declared in :func:`_option_checks`.
    """
    if augment not in TRAIN_PRESETS:
        return []
    taken = [p for p in inspect.signature(TRAIN_PRESETS.get(augment)).parameters if p != "image_size"]
    unknown = [k for k in options if k not in taken]
    if unknown:
        return [(f"augment_options.{k}", f"unknown option of the {augment!r} augmentation; it takes: "
                                         f"{', '.join(taken) or 'none'}") for k in unknown]
    checks = _option_checks(image_size).get(augment, {})
    found: list[tuple[str, str]] = []
    for key, value in options.items():
        check = checks.get(key)
        if check is None:  # a preset option without a declared range: refuse rather than guess
            found.append((f"augment_options.{key}", f"cannot be checked: {augment!r} declares no range for it "
                                                    "(kdlib/data/transforms.py _option_checks)"))
        elif (expected := check(value)) is not None:
            found.append((f"augment_options.{key}", f"expected {expected}"))
    return found


def build_transforms(
    preset: str,
    image_size: int,
    source_size: int | None,
    train: bool,
    options: dict[str, Any] | None = None,
    eval_crop_pct: float = 0.875,
) -> Augmentation:
    """Per-sample and per-batch transforms of one split.

    Images already stored at ``image_size`` (``source_size``) are not resized. Otherwise
    evaluation resizes the shorter side to ``image_size / eval_crop_pct`` and center-crops
    (timm's convention), and training uses the preset, preceded by that same resize when the
    preset does not produce ``image_size`` itself. A step that does nothing is left out: even
    ``v2.Identity`` costs microseconds per image.
    """
    resize: list[v2.Transform] = []
    if source_size != image_size:
        resize = [v2.Resize(int(round(image_size / eval_crop_pct)), antialias=True), v2.CenterCrop(image_size)]
    steps, batch = list(resize), None
    if train:
        augmentation = TRAIN_PRESETS.get(preset)(image_size, **(options or {}))
        if augmentation.sizes_itself:
            steps = []
        if augmentation.sample is not None:
            steps.append(augmentation.sample)
        batch = augmentation.batch
    return Augmentation(v2.Compose(steps) if steps else None, batch)


def build_mix(num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0) -> v2.Transform | None:
    """Batch-level MixUp (Zhang et al., ICLR 2018) and/or CutMix (Yun et al., ICCV 2019), one of
    them per batch when both are on, as DeiT does; ``None`` when both alphas are 0.

    Called as ``images, soft_targets = mix(images, labels)`` on a normalized float batch; the
    targets become mixed one-hot rows, which cross-entropy (and the KD hard term) accept.
    """
    choices: list[v2.Transform] = []
    if mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)


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
