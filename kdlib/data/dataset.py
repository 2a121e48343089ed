"""A map-style dataset over a prepared index; the one loading path for every data set."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdlib.data.decode import decode_at_short_side, decode_image
from kdlib.data.index import Record
from kdlib.data.pixel_cache import PixelCache, open_or_build


def load_image(path: Path, channels: int) -> Tensor:
    """Decode an image file at full size to a ``uint8`` CHW tensor with ``channels`` (1 or 3)
    channels (:func:`kdlib.data.decode.decode_image` without a size: palette, grayscale, CMYK,
    RGBA and 16-bit images are converted; a corrupt file raises ``ValueError`` naming it)."""
    return decode_image(path, channels)


class IndexedImageDataset(Dataset):
    """Yields ``(image uint8 CHW, target, position)``: the class index, or a multi-hot float
    vector for multi-label records; the position lets a distillation method
    look up per-sample data (e.g. cached teacher outputs).

    ``preload_size`` decides the pixels: ``None``, each image at full size; ``S``, each image
    at short side ``S`` (:func:`kdlib.data.decode.decode_at_short_side`: a reduced JPEG decode,
    then an antialiased resize so the shorter side is ``S``; a smaller image keeps its size).
    ``preload`` decides where they are kept: decoded per item (``False``); decoded once at
    construction (``True``), into memory, or, with ``preload_size`` and ``cache_dir``, into the
    memory-mapped pixel cache (:mod:`kdlib.data.pixel_cache`) that every process shares through
    the page cache (``cache_workers`` decoding processes build it). All paths give the same
    tensor for the same image.
    ``batch_transform`` is applied by the training loop to each ``uint8`` batch, on its device.
    """

    def __init__(
        self,
        root: Path,
        records: Sequence[Record],
        channels: int,
        transform: Callable[[Tensor], Tensor] | None = None,
        preload: bool = False,
        batch_transform: Callable[[Tensor], Tensor] | None = None,
        num_classes: int | None = None,
        preload_size: int | None = None,
        cache_dir: Path | None = None,
        cache_workers: int = 0,
    ) -> None:
        if preload_size is not None and preload_size < 1:
            raise ValueError(f"preload_size must be a positive number of pixels or None, got {preload_size}")
        self.root = Path(root)
        self.records = list(records)
        self.channels = channels
        self.transform = transform
        self.batch_transform = batch_transform
        self.labels = [r.label for r in self.records]  # plain ints: indexing a tensor costs more per item
        self.targets = torch.tensor(self.labels, dtype=torch.long)
        # multi-label records (label -1) yield multi-hot float targets; `ignore` marks the
        # difficult-only classes that scoring leaves out
        self.multi_hot: Tensor | None = None
        self.ignore: Tensor | None = None
        if self.records and all(r.label < 0 for r in self.records):
            if num_classes is None:
                raise ValueError("multi-label records need num_classes")
            self.multi_hot = torch.zeros(len(self.records), num_classes)
            self.ignore = torch.zeros(len(self.records), num_classes, dtype=torch.bool)
            for i, r in enumerate(self.records):
                self.multi_hot[i, list(r.positives)] = 1.0
                self.ignore[i, list(r.difficult)] = True
        self.preload_size = preload_size
        self._cache: list[Tensor] | None = None
        self.pixel_cache: PixelCache | None = None
        if preload and preload_size is not None and cache_dir is not None:
            self.pixel_cache = open_or_build(Path(cache_dir), self.root, self.records, preload_size, channels,
                                             cache_workers)
        elif preload:
            self._cache = [self._decode(i) for i in range(len(self.records))]

    def __len__(self) -> int:
        return len(self.records)

    def _decode(self, i: int) -> Tensor:
        path = self.root / self.records[i].path
        if self.preload_size is None:
            return load_image(path, self.channels)
        return decode_at_short_side(path, self.channels, self.preload_size)

    def image(self, i: int) -> Tensor:
        if self._cache is not None:
            return self._cache[i]
        if self.pixel_cache is not None:
            return self.pixel_cache.image(i)
        return self._decode(i)

    def target(self, i: int) -> Tensor | int:
        return self.multi_hot[i] if self.multi_hot is not None else self.labels[i]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor | int, int]:
        image = self.image(i)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.target(i), i
