"""A map-style dataset over a prepared index; the one loading path for every data set."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from kdlib.data.index import Record


def load_image(path: Path, channels: int) -> Tensor:
    """Decode an image file to a ``uint8`` CHW tensor with ``channels`` (1 or 3) channels.

    Palette, grayscale, CMYK, RGBA and 16-bit images are converted; a corrupt file raises
    ``ValueError`` naming it.
    """
    try:
        with Image.open(path) as img:
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float64)
                img = Image.fromarray((arr * (255.0 / max(arr.max(), 1.0))).astype(np.uint8))
            img = img.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"image listed in the index is missing: {path}") from None
    except (OSError, SyntaxError) as err:
        raise ValueError(f"cannot decode image {path}: {err}") from None
    tensor = torch.from_numpy(arr.copy())
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


class IndexedImageDataset(Dataset):
    """Yields ``(image uint8 CHW, target, position)``: the class index, or a multi-hot float
    vector for multi-label records; the position lets a distillation method
    look up per-sample data (e.g. cached teacher outputs).

    With ``preload=True`` every image is decoded once at construction and kept in memory,
    which removes decoding from the training loop for data sets that fit in RAM.
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
    ) -> None:
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
        self._cache: list[Tensor] | None = None
        if preload:
            self._cache = [load_image(self.root / r.path, channels) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def image(self, i: int) -> Tensor:
        if self._cache is not None:
            return self._cache[i]
        return load_image(self.root / self.records[i].path, self.channels)

    def target(self, i: int) -> Tensor | int:
        return self.multi_hot[i] if self.multi_hot is not None else self.labels[i]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor | int, int]:
        image = self.image(i)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.target(i), i
