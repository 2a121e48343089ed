"""Decoding image files to ``uint8`` CHW tensors, at full size or at a reduced JPEG scale.

A JPEG stores 8×8 blocks of DCT coefficients; libjpeg can run its inverse DCT at 1/2, 1/4 or
1/8 scale (an 8×8 block becomes 4×4, 2×2 or 1×1 pixels), skipping most of the decoding work.
Pillow exposes this as :meth:`PIL.Image.Image.draft`. :func:`decode_image` uses it only when
the caller says how large the result must be (``min_short_side``), and picks the largest
reduction whose result is still at least that large, never smaller.

:func:`decode_at_short_side` is the one definition of the pixels of an image "at short side S"
(``DatasetSpec.preload_size``): reduced decode, then an antialiased bilinear resize so the
shorter side is exactly S. The pixel cache (:mod:`kdlib.data.pixel_cache`), the in-memory
preload and the per-item path all call it, so the three give the same tensor.

:func:`decode_jpeg_views` is the GPU path: nvJPEG decodes a batch of files at once
(``torchvision.io.decode_jpeg(list, device="cuda")``), and the crop and flip of each image come
from its (image, view) seed exactly as the CPU ``imagenet`` preset draws them.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from kdlib.data.views import seeded

DRAFT_SCALES = (8, 4, 2, 1)  # the inverse-DCT reductions libjpeg offers through Pillow's draft
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")


def draft_scale(width: int, height: int, min_short_side: int | None) -> int:
    """The reduction ``s`` in {8, 4, 2, 1} that Pillow's ``draft(mode, (m, m))`` picks for a
    ``width × height`` JPEG and ``m = min_short_side``: the largest with ``s · m <= short side``.

    The decoded size is ``ceil(width / s) × ceil(height / s)``, so its shorter side is at least
    ``short / s >= m``: the result is never below the size asked for. (libjpeg's rounding up
    would sometimes allow the next scale too, e.g. 375 px at 1/2 is 188 px; Pillow's rule forgoes
    those cases rather than depend on rounding.) ``None`` or a size above the short side: 1.
    """
    if min_short_side is None:
        return 1
    if min_short_side < 1:
        raise ValueError(f"min_short_side must be a positive number of pixels, got {min_short_side}")
    ratio = min(width, height) // min_short_side
    return next(s for s in DRAFT_SCALES if ratio >= s or s == 1)


def decode_image(path: Path, channels: int, min_short_side: int | None = None) -> Tensor:
    """Decode an image file to a ``uint8`` CHW tensor with ``channels`` (1 or 3) channels.

    Palette, grayscale, CMYK, RGBA and 16-bit images are converted; a missing file raises
    ``FileNotFoundError`` and a corrupt one ``ValueError``, each naming the file.

    ``min_short_side``: the result's shorter side must be at least this many pixels; a JPEG is
    then decoded at the smallest DCT scale that still gives that (:func:`draft_scale`). Other
    formats, and ``None``, decode at full size. Only the scale changes: the colour conversion is
    the same as at full size (a grayscale result is still ``convert("L")`` of the RGB decode,
    not libjpeg's own luma, so the two paths agree except for the scaling).
    """
    return _decode(path, channels, min_short_side)[0]


def _decode(path: Path, channels: int, min_short_side: int | None) -> tuple[Tensor, tuple[int, int]]:
    """:func:`decode_image`, and the file's full ``(height, width)``."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    try:
        with Image.open(path) as img:
            width, height = img.size
            if min_short_side is not None and img.format == "JPEG":
                # draft with the file's own mode: scale only, no change of colour conversion
                img.draft(img.mode, (min_short_side, min_short_side))
            if img.mode in _SIXTEEN_BIT:
                arr = np.asarray(img, dtype=np.float64)
                img = Image.fromarray((arr * (255.0 / max(arr.max(), 1.0))).astype(np.uint8))
            img = img.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"image listed in the index is missing: {path}") from None
    except (OSError, SyntaxError) as err:
        raise ValueError(f"cannot decode image {path}: {err}") from None
    tensor = torch.from_numpy(arr.copy())
    image = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()
    return image, (height, width)


def short_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """``(height, width)`` of a ``height × width`` image at short side ``size``: the shorter side
    becomes ``size``, the longer ``int(size · long / short)`` (``v2.Resize(size)``'s rounding);
    one whose shorter side is already ``<= size`` keeps its shape."""
    short, long = min(height, width), max(height, width)
    if short <= size:
        return height, width
    return (size, int(size * long / short)) if height <= width else (int(size * long / short), size)


def fit_short_side(image: Tensor, size: int, full_shape: tuple[int, int] | None = None) -> Tensor:
    """``image`` (uint8 CHW) resized so its shorter side is ``size`` px, aspect kept, with the
    antialiased bilinear resize the transforms use (``v2.Resize``), contiguous.

    The output shape is :func:`short_side_shape` of ``full_shape`` (the file's full size, for an
    image decoded at a reduced scale; default: the image's own), so a reduced and a full decode
    give the same shape. An image whose shorter side is already ``<= size`` is returned
    unchanged, never enlarged: that adds no detail, costs memory, and every transform resizes its
    crop anyway (the evaluation resize then enlarges it exactly as it does a full-size decode).
    """
    height, width = image.shape[-2:]
    target = short_side_shape(*(full_shape or (height, width)), size)
    if target == (height, width):
        return image.contiguous()
    return TF.resize(image, list(target), antialias=True).contiguous()


def decode_at_short_side(path: Path, channels: int, size: int) -> Tensor:
    """The pixels of ``path`` at short side ``size`` (``DatasetSpec.preload_size``): a reduced
    decode to at least ``size`` (:func:`decode_image`), then :func:`fit_short_side` to the shape
    ``v2.Resize(size)`` gives the full-size image."""
    image, full_shape = _decode(path, channels, size)
    return fit_short_side(image, size, full_shape)


def jpeg_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header alone (nothing is decoded)."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise FileNotFoundError(f"image listed in the index is missing: {path}") from None
    except (OSError, SyntaxError) as err:
        raise ValueError(f"cannot read the header of image {path}: {err}") from None


def view_crop_flip(height: int, width: int, seed: int, size: int,
                   scale: tuple[float, float] = (0.08, 1.0),
                   ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[tuple[int, int, int, int], bool]:
    """The ``(top, left, crop height, crop width)`` box and the flip that the ``imagenet``
    preset (``v2.RandomResizedCrop(size, scale, ratio)`` then ``v2.RandomHorizontalFlip()``)
    draws for a ``height × width`` image under ``seeded(seed)``: the same torch calls in the
    same order, so a view decoded elsewhere (on the GPU) crops and flips like the CPU view."""
    crop = v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True)
    shape_only = torch.empty((1, height, width), dtype=torch.uint8)  # make_params reads the shape only
    with seeded(seed):
        box = crop.make_params([shape_only])
        flip = bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip(p=0.5) applies when rand < p
    return (box["top"], box["left"], box["height"], box["width"]), flip


def decode_jpeg_views(datas: Sequence[Tensor], seeds: Sequence[int], size: int, device: str | torch.device = "cuda",
                      scale: tuple[float, float] = (0.08, 1.0)) -> Tensor:
    """Decode a batch of JPEG files (each a 1-D ``uint8`` tensor of the file's bytes) on
    ``device`` and return the ``imagenet``-preset views ``(B, 3, size, size)`` uint8.

    nvJPEG decodes the whole list in one call on CUDA; each image is then cropped, resized
    (antialiased bilinear) and flipped with the box and flip :func:`view_crop_flip` draws from its
    seed, at the full decoded size: the same views as the CPU path over full-size decodes
    (``preload_size: null``), up to the two decoders' IDCT rounding (identical on the CPU, where
    both use libjpeg-turbo).
    """
    if len(datas) != len(seeds):
        raise ValueError(f"{len(datas)} images but {len(seeds)} seeds: expected one seed per image")
    from torchvision.io import ImageReadMode, decode_jpeg  # deprecated in 0.29 (TorchCodec); still nvJPEG

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device)
    views = []
    for image, seed in zip(decoded, seeds):
        height, width = image.shape[-2:]
        (top, left, h, w), flip = view_crop_flip(int(height), int(width), int(seed), size, scale)
        view = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
        views.append(TF.horizontal_flip(view) if flip else view)
    return torch.stack(views)


def bytes_of(path: Path) -> Tensor:
    """A file's bytes as a 1-D ``uint8`` tensor (what :func:`decode_jpeg_views` takes)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"image listed in the index is missing: {path}") from None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def needed_eval_short_side(input_size: int, eval_crop_pct: float) -> int:
    """The shorter side the evaluation transform resizes to before its center crop:
    ``round(input_size / eval_crop_pct)`` (as :func:`kdlib.data.transforms.build_transforms`)."""
    return int(round(input_size / eval_crop_pct))


__all__ = ["DRAFT_SCALES", "bytes_of", "decode_at_short_side", "decode_image", "decode_jpeg_views", "draft_scale",
           "fit_short_side", "jpeg_size", "needed_eval_short_side", "short_side_shape",
           "view_crop_flip"]

