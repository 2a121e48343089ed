"""Data-set layouts: one file each in this package, registered by name in :data:`LAYOUTS`.

A layout reads a data set as it is distributed, from ``root``, and returns a
:class:`LayoutScan`: class names and one :class:`ScannedImage` per image, whose ``split`` is the
data set's official one (``train`` / ``val`` / ``test``) or ``None`` where it defines none.
Readers are called as ``reader(root, staging=..., **options)``: layouts whose images are packed
(MNIST idx, CIFAR pickles) write them as image files under ``staging`` and return a scan rooted
there; file-based layouts ignore it. Every module in this package is imported on first use of
the package, so adding a layout is adding one file.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kdlib.registry import Registry


@dataclass(frozen=True)
class ScannedImage:
    path: str  # relative to the scan's root, with forward slashes
    label: int  # class index; -1 for multi-label data sets
    split: str | None
    positives: tuple[int, ...] = ()  # multi-label: classes present in the image
    difficult: tuple[int, ...] = ()  # multi-label: classes present only as "difficult" objects
    #                                  (VOC): positive for training, ignored when scoring AP


@dataclass
class LayoutScan:
    root: Path
    classes: list[str]
    images: list[ScannedImage]
    task: str = "multiclass"  # or "multilabel"
    stored_size: int | None = None  # side of every image when all are square and equal (MNIST,
    #                                 CIFAR): then nothing needs resizing to that size


def require_root(root: Path | str, layout: str) -> Path:
    """``Path(root)`` when it is a directory, else FileNotFoundError naming the layout and path."""
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"{layout} root {str(path)!r} is not a directory")
    return path


LayoutReader = Callable[..., LayoutScan]
LAYOUTS: Registry[LayoutReader] = Registry("dataset layout")
register_layout = LAYOUTS.register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
