"""FoodX-251 / iFood 2019 (``foodx251``): 251 fine-grained food classes, CSV annotations.

On-disk layout under ``root``::

    annot/class_list.txt    one "<id> <name>" per line, ids 0..250 (e.g. "0 macaron")
    annot/train_info.csv    NO header; "image_name,label" per line, 0-based label
    annot/val_info.csv      same format, the official validation set
    train_set/<image_name>  images of train_info.csv   (e.g. train_set/train_059329.jpg)
    val_set/<image_name>    images of val_info.csv     (e.g. val_set/val_005361.jpg)

``train_info.csv`` gives split ``"train"``; the official ``val_info.csv`` gives split ``"test"``
(the DeiT+ConvNeXt FGVC project uses val as its test set; the labels of the official
test set were never released). Our own validation set is carved out of ``train`` by the prepare
stage. The real set has 251 classes, 118,475 train and 11,994 val images. Images are listed in
CSV order, train first.

Class names come from ``class_list.txt`` (that project ignored it and only knew class indices); its
ids must be exactly 0..N-1, each once, and every CSV label must lie in 0..N-1. Images are
converted to RGB when loaded (that project did not convert, so an odd grayscale or CMYK JPEG would
reach the model with the wrong number of channels).
"""
from __future__ import annotations

from pathlib import Path

from kdlib.data.layouts import LayoutScan, ScannedImage, register_layout, require_root

CLASS_LIST = Path("annot") / "class_list.txt"
SPLIT_FILES: tuple[tuple[Path, str, str], ...] = (
    (Path("annot") / "train_info.csv", "train_set", "train"),
    (Path("annot") / "val_info.csv", "val_set", "test"),
)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"foodx251: annotation file {str(path)!r} not found")
    return path.read_text(encoding="utf-8-sig").splitlines()


def _read_classes(path: Path) -> list[str]:
    names: dict[int, str] = {}
    first_line: dict[int, int] = {}
    for line_no, line in enumerate(_read_lines(path), start=1):
        text = line.strip()
        if not text:
            continue
        parts = text.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise ValueError(
                f"{path}:{line_no}: expected '<id> <name>' with an integer id, got {line!r}"
            )
        class_id, name = int(parts[0]), parts[1].strip()
        if class_id in names:
            raise ValueError(
                f"{path}:{line_no}: class id {class_id} already defined on line {first_line[class_id]}"
            )
        names[class_id] = name
        first_line[class_id] = line_no
    if not names:
        raise ValueError(f"{path}: no classes listed (expected '<id> <name>' lines)")
    expected = set(range(len(names)))
    if set(names) != expected:
        missing = sorted(expected - set(names))
        extra = sorted(set(names) - expected)
        raise ValueError(
            f"{path}: class ids must be 0..{len(names) - 1}, each once; "
            f"missing {missing}, unexpected {extra}"
        )
    return [names[i] for i in range(len(names))]


def _read_split(path: Path, image_dir: str, split: str, num_classes: int) -> list[ScannedImage]:
    images: list[ScannedImage] = []
    seen: dict[str, int] = {}
    for line_no, line in enumerate(_read_lines(path), start=1):
        text = line.strip()
        if not text:
            continue
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 2 or not parts[0] or not parts[1].lstrip("-").isdigit():
            hint = " (the file has no header line)" if line_no == 1 else ""
            raise ValueError(
                f"{path}:{line_no}: expected 'image_name,label' with an integer label{hint}, "
                f"got {line!r}"
            )
        name, label = parts[0], int(parts[1])
        if not 0 <= label < num_classes:
            raise ValueError(
                f"{path}:{line_no}: label {label} out of range 0..{num_classes - 1} "
                f"({num_classes} classes in {CLASS_LIST.as_posix()})"
            )
        if name in seen:
            raise ValueError(f"{path}:{line_no}: image {name!r} already listed on line {seen[name]}")
        seen[name] = line_no
        images.append(ScannedImage(f"{image_dir}/{name}", label, split))
    return images


@register_layout("foodx251", root_marker=("annot/class_list.txt", "train_set", "val_set"))
def scan_foodx251(root: Path, staging: Path | None = None) -> LayoutScan:
    """Read FoodX-251 from ``root``; ``staging`` is unused (the images are plain files)."""
    root = require_root(root, "foodx251")
    classes = _read_classes(root / CLASS_LIST)
    images: list[ScannedImage] = []
    for csv_path, image_dir, split in SPLIT_FILES:
        images.extend(_read_split(root / csv_path, image_dir, split, len(classes)))
    return LayoutScan(root, classes, images)
