"""Data-set layouts: one file each in this package, registered by name in :data:`LAYOUTS`.

A layout reads a data set as it is distributed, from ``root``, and returns a
:class:`LayoutScan`: class names and one :class:`ScannedImage` per image, whose ``split`` is the
data set's official one (``train`` / ``val`` / ``test``) or ``None`` where it defines none.
Readers are called as ``reader(root, staging=..., **options)``: layouts whose images are packed
(MNIST idx, CIFAR pickles) write them as image files under ``staging`` and return a scan rooted
there; file-based layouts ignore it. A layout declares, when it registers, its ``task``
(``multiclass`` or ``multilabel``: known before any file is read) and whether it draws a
subset itself (``seeded``: then it takes the data split seed as ``seed``). Every module in this
package is imported on first use of the package, so adding a layout is adding one file.
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


OptionsCheck = Callable[[dict], "list[tuple[str, str]]"]


def register_layout(name: str, *, task: str = "multiclass", seeded: bool = False,
                    check_options: OptionsCheck | None = None) -> Callable[[LayoutReader], LayoutReader]:
    """Register a reader as layout ``name`` (see the module docstring for ``task`` and ``seeded``).
    ``check_options`` returns ``(option, "expected ...")`` per bad value among the reader's options,
    so a data-set preset is checked before any file is read."""
    if task not in ("multiclass", "multilabel"):
        raise ValueError(f"layout {name!r}: task must be multiclass or multilabel, got {task!r}")

    def decorator(reader: LayoutReader) -> LayoutReader:
        reader.task = task  # type: ignore[attr-defined]
        reader.seeded = seeded  # type: ignore[attr-defined]
        reader.check_options = check_options  # type: ignore[attr-defined]
        return LAYOUTS.register(name)(reader)

    return decorator


def option_problems(name: str, options: dict) -> list[tuple[str, str]]:
    """What is wrong with ``options`` for layout ``name``: keys its reader does not take (the
    split seed of a seeded layout is the run's, not an option), then the layout's own checks."""
    import inspect

    reader = LAYOUTS.get(name)
    taken = [p for p in inspect.signature(reader).parameters if p not in ("root", "staging")
             and not (p == "seed" and reader.seeded)]  # type: ignore[attr-defined]
    unknown = [k for k in options if k not in taken]
    if unknown:
        return [(k, f"unknown option of the {name} layout; it takes: {', '.join(taken) or 'none'}") for k in unknown]
    return reader.check_options(options) if reader.check_options else []  # type: ignore[attr-defined]


def layout_task(name: str) -> str:
    """``multiclass`` or ``multilabel``: the task of registered layout ``name``."""
    return LAYOUTS.get(name).task  # type: ignore[attr-defined]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
