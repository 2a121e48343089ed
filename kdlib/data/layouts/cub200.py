"""Caltech-UCSD Birds-200-2011 (``cub200``), read from its official annotation files.

On-disk layout under ``root`` (the extracted ``CUB_200_2011/`` folder)::

    images.txt               <image_id> <relpath>      relpath under images/, e.g.
                                                       001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg
    image_class_labels.txt   <image_id> <class_id>     class_id is 1-based (1..200)
    train_test_split.txt     <image_id> <1|0>          1 = train, 0 = test
    classes.txt              <class_id> <name>         e.g. "1 001.Black_footed_Albatross"
    images/<relpath>

Fields are separated by whitespace; blank lines are ignored. The three per-image files are
joined on ``image_id``: every id must occur exactly once in each of them. Classes are listed by
``classes.txt``, whose ids must be exactly 1..K, and are named as written there
(``001.Black_footed_Albatross``). Label = ``class_id - 1``. Images are listed in
``images.txt`` order, with paths ``images/<relpath>`` relative to ``root``. The official split
is kept: the real data set has 11,788 images in 200 classes, 5,994 train / 5,794 test.

Source-project bug avoided: the DeiT+ConvNeXt FGVC project runs an ImageFolder over ``images/``
and takes the label from the sorted folder index, never reading ``image_class_labels.txt``. That
only agrees with the official labels while the folder names sort in class-id order; here labels
always come from ``image_class_labels.txt`` (as the LS–KD compatibility study, Chandrasegaran et
al., ICML 2022, does).
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from kdlib.data.layouts import LayoutScan, ScannedImage, register_layout

IMAGES_FILE = "images.txt"
LABELS_FILE = "image_class_labels.txt"
SPLIT_FILE = "train_test_split.txt"
CLASSES_FILE = "classes.txt"
IMAGES_DIR = "images"
SPLIT_FLAGS = {"1": "train", "0": "test"}


def require_dir(root: Path | str, what: str) -> Path:
    """``Path(root)`` if it is a directory; otherwise FileNotFoundError naming it."""
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} root {str(path)!r} is not a directory")
    return path


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {str(path)!r} not found")
    return path


def safe_relpath(text: str) -> PurePosixPath | None:
    """``text`` as a relative POSIX path that stays inside its folder, else None."""
    rel = PurePosixPath(text)
    if not text or rel.is_absolute() or ".." in rel.parts or not rel.parts:
        return None
    return rel


def _is_uint(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _read_id_table(path: Path, columns: str, value_has_spaces: bool) -> list[tuple[int, str, int]]:
    """Rows ``(id, value, line_number)`` of a two-column ``<int id> <value>`` file.

    ``columns`` describes the expected line for error messages. The value may contain spaces
    when ``value_has_spaces`` (everything after the id, stripped). Duplicate ids are an error.
    """
    rows: list[tuple[int, str, int]] = []
    seen: dict[int, int] = {}
    with open(require_file(path), encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            fields = text.split(None, 1) if value_has_spaces else text.split()
            if len(fields) != 2 or not _is_uint(fields[0]):
                raise ValueError(f"{path}, line {number}: expected '{columns}', got {text!r}")
            key = int(fields[0])
            if key in seen:
                raise ValueError(f"{path}, line {number}: duplicate id {key} (first on line {seen[key]})")
            seen[key] = number
            rows.append((key, fields[1].strip(), number))
    return rows


def read_classes(path: Path) -> list[str]:
    """Class names from ``classes.txt``, in class-id order; the ids must be exactly 1..K."""
    rows = _read_id_table(path, "<class_id> <name>", value_has_spaces=True)
    if not rows:
        raise ValueError(f"{path}: lists no classes")
    names = {key: name for key, name, _ in rows}
    for key, _, number in rows:
        if not 1 <= key <= len(rows):
            raise ValueError(
                f"{path}, line {number}: class id {key} is out of range; with {len(rows)} classes "
                f"the ids must be 1..{len(rows)}"
            )
    return [names[key] for key in range(1, len(rows) + 1)]


@register_layout("cub200", root_marker=("images.txt", "images"))
def scan_cub200(root: Path | str, staging: Path | None = None) -> LayoutScan:
    """Scan CUB-200-2011 at ``root``; labels from ``image_class_labels.txt`` (class_id - 1)."""
    root = require_dir(root, "cub200")
    images_path, labels_path, split_path = root / IMAGES_FILE, root / LABELS_FILE, root / SPLIT_FILE
    for path in (images_path, labels_path, split_path, root / CLASSES_FILE):
        require_file(path)
    classes = read_classes(root / CLASSES_FILE)
    image_rows = _read_id_table(images_path, "<image_id> <relpath>", value_has_spaces=True)
    if not image_rows:
        raise ValueError(f"{images_path}: lists no images")
    listed = {key: number for key, _, number in image_rows}

    label_of: dict[int, int] = {}
    for key, value, number in _read_id_table(labels_path, "<image_id> <class_id>", value_has_spaces=False):
        if not _is_uint(value):
            raise ValueError(f"{labels_path}, line {number}: expected '<image_id> <class_id>', got class id {value!r}")
        if not 1 <= int(value) <= len(classes):
            raise ValueError(
                f"{labels_path}, line {number}: class id {int(value)} is out of range; "
                f"allowed 1..{len(classes)} (from {CLASSES_FILE})"
            )
        if key not in listed:
            raise ValueError(f"{labels_path}, line {number}: image id {key} is not in {images_path}")
        label_of[key] = int(value) - 1

    split_of: dict[int, str] = {}
    for key, value, number in _read_id_table(split_path, "<image_id> <1|0>", value_has_spaces=False):
        if value not in SPLIT_FLAGS:
            raise ValueError(
                f"{split_path}, line {number}: expected '<image_id> <1|0>' (1 = train, 0 = test), got flag {value!r}"
            )
        if key not in listed:
            raise ValueError(f"{split_path}, line {number}: image id {key} is not in {images_path}")
        split_of[key] = SPLIT_FLAGS[value]

    images: list[ScannedImage] = []
    line_of_path: dict[str, int] = {}
    for key, relpath, number in image_rows:
        for source, table in ((labels_path, label_of), (split_path, split_of)):
            if key not in table:
                raise ValueError(f"{source}: no line for image id {key} (listed in {images_path}, line {number})")
        rel = safe_relpath(relpath)
        if rel is None:
            raise ValueError(
                f"{images_path}, line {number}: expected a relative path under {IMAGES_DIR}/, got {relpath!r}"
            )
        path = (PurePosixPath(IMAGES_DIR) / rel).as_posix()
        if path in line_of_path:
            raise ValueError(f"{images_path}, line {number}: path {relpath!r} is already listed on line {line_of_path[path]}")
        line_of_path[path] = number
        images.append(ScannedImage(path, label_of[key], split_of[key]))
    return LayoutScan(root, classes, images)
