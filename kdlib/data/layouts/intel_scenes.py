"""Intel Image Classification (``intel_scenes``): 150x150 natural scenes in 6 classes.

On-disk layout under ``root``, each split folder in one of two forms, detected per folder::

    seg_train/seg_train/<class>/<image>   nested, as on Kaggle (and in the residual-CNN precision study)
    seg_train/<class>/<image>             flat
    seg_test/seg_test/<class>/<image>     nested
    seg_test/<class>/<image>              flat
    seg_pred/...                          unlabelled images, ignored

A split folder is nested when it holds a sub-folder of its own name (``seg_train/seg_train``);
it must then hold nothing else but hidden entries. ``seg_train`` gives split ``"train"`` and
``seg_test`` split ``"test"``; there is no official validation set (that study used the test set for
checkpoint selection and early stopping; our validation is carved from train by the prepare
stage). Classes are the sorted class folder names, which must be the same in train and test:
buildings, forest, glacier, mountain, sea, street in the real set, which holds 14,034 train and
3,000 test images. Images are the files under a class folder (at any depth) ending in
.jpg/.jpeg/.png, case-insensitive; hidden files and folders are ignored. Paths are sorted.

Symbolic links leaving ``root`` (split, nested, class or sub-folders, images) are refused with
an error naming the link and its target unless option ``follow_symlinks: true`` allows them;
links inside ``root`` are read (see :mod:`kdlib.data.layouts.imagefolder`).
"""
from __future__ import annotations

from pathlib import Path

from kdlib.data.layouts import LayoutScan, ScannedImage, register_layout, require_root
from kdlib.data.layouts.imagefolder import check_imagefolder_options, check_link, image_files

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}
SPLIT_DIRS: tuple[tuple[str, str], ...] = (("seg_train", "train"), ("seg_test", "test"))


def _visible(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if not p.name.startswith("."))


def _class_parent(split_dir: Path, root: Path, follow_symlinks: bool) -> Path:
    """The folder whose sub-folders are the classes: ``split_dir`` itself, or its nested twin."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"intel_scenes: split folder {str(split_dir)!r} not found")
    check_link(split_dir, root, follow_symlinks, "intel_scenes")
    nested = split_dir / split_dir.name
    if not nested.is_dir():
        return split_dir
    check_link(nested, root, follow_symlinks, "intel_scenes")
    others = [p.name for p in _visible(split_dir) if p.name != split_dir.name]
    if others:
        raise ValueError(
            f"{split_dir}: holds the nested folder {split_dir.name!r} and also {others}; "
            f"expected either {split_dir.name}/{split_dir.name}/<class>/ or {split_dir.name}/<class>/"
        )
    return nested


@register_layout("intel_scenes", check_options=check_imagefolder_options, root_marker=("seg_train", "seg_test"))
def scan_intel_scenes(root: Path, staging: Path | None = None, follow_symlinks: bool = False) -> LayoutScan:
    """Read the Intel scenes set from ``root``; ``staging`` is unused (the images are plain files)."""
    root = require_root(root, "intel_scenes")
    real_root = root.resolve()
    class_dirs: dict[str, dict[str, Path]] = {}
    for dir_name, split in SPLIT_DIRS:
        parent = _class_parent(root / dir_name, real_root, follow_symlinks)
        found = {p.name: p for p in _visible(parent) if p.is_dir()}
        for path in found.values():
            check_link(path, real_root, follow_symlinks, "intel_scenes")
        if not found:
            raise ValueError(f"{parent}: no class folders found (expected <class>/<image> under it)")
        class_dirs[split] = found
    train_classes, test_classes = set(class_dirs["train"]), set(class_dirs["test"])
    if train_classes != test_classes:
        raise ValueError(
            f"{root}: train and test class folders differ; only in seg_train: "
            f"{sorted(train_classes - test_classes)}, only in seg_test: "
            f"{sorted(test_classes - train_classes)}"
        )
    classes = sorted(train_classes)
    images: list[ScannedImage] = []
    for _, split in SPLIT_DIRS:
        for label, name in enumerate(classes):
            class_dir = class_dirs[split][name]
            paths = image_files(class_dir, real_root, IMAGE_EXTENSIONS, follow_symlinks, "intel_scenes",
                                skip_hidden_dirs=True)
            if not paths:
                raise ValueError(
                    f"{class_dir}: class folder holds no images "
                    f"({', '.join(sorted(IMAGE_EXTENSIONS))}, any case)"
                )
            images.extend(ScannedImage(p.relative_to(root).as_posix(), label, split) for p in paths)
    return LayoutScan(root, classes, images)
