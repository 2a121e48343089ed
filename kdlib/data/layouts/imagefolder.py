"""Generic class-per-folder layout (``imagefolder``), as torchvision's ``ImageFolder``.

Either ``root/{train,val,test}/<class>/<image>`` (any of val/test may be absent; classes are the
sorted union of class folders) or ``root/<class>/<image>`` with no split, which ``prepare``
then splits with a seeded, stratified split. Images are the files under a class folder (at any
depth) with an image extension, hidden files left out.

Symbolic links: a split folder, class folder, sub-folder or image that is a link whose target
(fully resolved) lies outside ``root`` is refused with a ``ValueError`` naming the link and its
target, so a data set never silently reads files from elsewhere; option
``follow_symlinks: true`` allows such links. Links whose target lies inside ``root`` are read
like any file or folder. Linked sub-folders of a class folder are descended only with
``follow_symlinks`` (a folder reached twice through links is read once).
"""
from __future__ import annotations

import os
from pathlib import Path

from kdlib.data.layouts import LayoutScan, ScannedImage, register_layout, require_root

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
SPLIT_DIRS = ("train", "val", "test")


def check_link(path: Path, root: Path, follow_symlinks: bool, layout: str) -> None:
    """Refuse ``path`` when it is a symbolic link resolving outside ``root`` (unless ``follow_symlinks``).

    ``root`` must be resolved already. The ``ValueError`` names the link, its target and the option."""
    if follow_symlinks or not path.is_symlink():
        return
    target = path.resolve()
    if not target.is_relative_to(root):
        raise ValueError(
            f"{layout}: {path} is a symbolic link to {target}, outside the data set root {root}; "
            "expected every file and folder of the data set inside its root (set the layout option "
            "follow_symlinks: true to read links that leave it)"
        )


def image_files(directory: Path, root: Path, extensions: set[str], follow_symlinks: bool, layout: str,
                skip_hidden_dirs: bool) -> list[Path]:
    """The image files under ``directory`` at any depth, sorted, with every link checked by
    :func:`check_link` against the resolved ``root``. Hidden files are left out; hidden folders
    too when ``skip_hidden_dirs``. Linked folders are descended only when ``follow_symlinks``."""
    found: list[Path] = []
    seen: set[str] = set()
    for folder, dirs, files in os.walk(directory, followlinks=follow_symlinks):
        if follow_symlinks:  # a link cycle would otherwise walk forever
            real = os.path.realpath(folder)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
        base = Path(folder)
        kept = []
        for name in sorted(dirs):
            if skip_hidden_dirs and name.startswith("."):
                continue
            check_link(base / name, root, follow_symlinks, layout)
            kept.append(name)
        dirs[:] = kept
        for name in files:
            path = base / name
            if name.startswith(".") or path.suffix.lower() not in extensions:
                continue
            check_link(path, root, follow_symlinks, layout)
            if path.is_file():  # not a broken link
                found.append(path)
    return sorted(found)


def _class_dirs(directory: Path, root: Path, follow_symlinks: bool) -> list[Path]:
    dirs = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    for path in dirs:
        check_link(path, root, follow_symlinks, "imagefolder")
    return dirs


def check_imagefolder_options(options: dict) -> list[tuple[str, str]]:
    value = options.get("follow_symlinks", False)
    return [] if isinstance(value, bool) else [("follow_symlinks", "expected true or false")]


@register_layout("imagefolder", check_options=check_imagefolder_options)
def scan_imagefolder(root: Path, staging: Path | None = None, follow_symlinks: bool = False) -> LayoutScan:
    """Scan an ImageFolder tree at ``root`` (see the module docstring; ``staging`` is unused)."""
    root = require_root(root, "imagefolder")
    real_root = root.resolve()
    split_dirs = [root / s for s in SPLIT_DIRS if (root / s).is_dir()]
    for split_dir in split_dirs:
        check_link(split_dir, real_root, follow_symlinks, "imagefolder")
    sources: list[tuple[Path, str | None]] = (
        [(d, d.name) for d in split_dirs] if split_dirs else [(root, None)]
    )
    class_dirs = {source: _class_dirs(source, real_root, follow_symlinks) for source, _ in sources}
    classes = sorted({c.name for dirs in class_dirs.values() for c in dirs})
    if not classes:
        raise ValueError(f"{root}: no class folders found (expected <class>/<image> under it)")
    label_of = {name: i for i, name in enumerate(classes)}
    images = [
        ScannedImage(path.relative_to(root).as_posix(), label_of[class_dir.name], split)
        for source, split in sources
        for class_dir in class_dirs[source]
        for path in image_files(class_dir, real_root, IMAGE_EXTENSIONS, follow_symlinks, "imagefolder",
                                skip_hidden_dirs=False)
    ]
    if not images:
        raise ValueError(f"{root}: class folders hold no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return LayoutScan(root, classes, images)
