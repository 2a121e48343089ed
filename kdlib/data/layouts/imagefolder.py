"""Generic class-per-folder layout (``imagefolder``), as torchvision's ``ImageFolder``.

Either ``root/{train,val,test}/<class>/<image>`` (any of val/test may be absent; classes are the
sorted union of class folders) or ``root/<class>/<image>`` with no split, which ``prepare``
then splits with a seeded, stratified split.
"""
from __future__ import annotations

from pathlib import Path

from kdlib.data.layouts import LayoutScan, ScannedImage, register_layout, require_root

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
SPLIT_DIRS = ("train", "val", "test")


def _class_dirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


@register_layout("imagefolder")
def scan_imagefolder(root: Path, staging: Path | None = None) -> LayoutScan:
    root = require_root(root, "imagefolder")
    split_dirs = [root / s for s in SPLIT_DIRS if (root / s).is_dir()]
    sources: list[tuple[Path, str | None]] = (
        [(d, d.name) for d in split_dirs] if split_dirs else [(root, None)]
    )
    classes = sorted({c.name for source, _ in sources for c in _class_dirs(source)})
    if not classes:
        raise ValueError(f"{root}: no class folders found (expected <class>/<image> under it)")
    label_of = {name: i for i, name in enumerate(classes)}
    images = [
        ScannedImage(path.relative_to(root).as_posix(), label_of[class_dir.name], split)
        for source, split in sources
        for class_dir in _class_dirs(source)
        for path in _images(class_dir)
    ]
    if not images:
        raise ValueError(f"{root}: class folders hold no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return LayoutScan(root, classes, images)
