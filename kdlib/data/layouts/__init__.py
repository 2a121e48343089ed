"""Data-set layouts: one file each, registered by name in :data:`LAYOUTS`.

A layout reads a data set as it is distributed, from ``root``, and returns a
:class:`LayoutScan`: class names and records whose ``split`` is the data set's official one
(``train`` / ``val`` / ``test``) or ``None`` where the data set defines none.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kdlib.registry import Registry


@dataclass(frozen=True)
class ScannedImage:
    path: str  # relative to the scan's root
    label: int
    split: str | None


@dataclass
class LayoutScan:
    root: Path
    classes: list[str]
    images: list[ScannedImage]


LayoutReader = Callable[..., LayoutScan]
LAYOUTS: Registry[LayoutReader] = Registry("dataset layout")
register_layout = LAYOUTS.register

from kdlib.data.layouts import imagefolder  # noqa: E402,F401  (registration)
