"""MS-COCO 2014 as a multi-label classification set (``coco2014``, 80 classes).

On-disk layout, as the official ``train2014.zip``, ``val2014.zip`` and
``annotations_trainval2014.zip`` extract under ``root``::

    annotations/instances_train2014.json   -> split "train", images in train2014/
    annotations/instances_val2014.json     -> split "test",  images in val2014/
    train2014/<file_name>                  (e.g. COCO_train2014_000000000009.jpg)
    val2014/<file_name>

Each json holds ``images`` (``id``, ``file_name``), ``annotations`` (``image_id``,
``category_id``; crowd annotations count like any other) and ``categories`` (``id``, ``name``).
Classes are the categories sorted by category id (ids run 1..90 with gaps); a class index is the
position in that order and names come from the json. Both files must list the same categories.

Labels (task ``multilabel``, ``label = -1``): an image's ``positives`` are the classes of its
annotations; ``difficult`` is always empty. **Only images with at least one annotation are kept**
(as in LSHFM, Wang et al., TPAMI 2021, which lists the images of pycocotools' ``imgToAnns``):
of 82,783 train / 40,504 val images, 82,081 / 40,137 are annotated, and those are what the scan
lists; unannotated images are dropped silently. Images keep the json's ``images`` order; paths
are ``train2014/<file_name>`` and ``val2014/<file_name>``, relative to ``root``.

An annotation whose ``category_id`` is not among the categories, or whose ``image_id`` is not
among the images, raises ``ValueError`` naming the file and the id; so do duplicate image or
category ids and missing keys. The real train json is about 450 MB and is read whole with ``json``
(a few GB of memory).
"""
from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from kdlib.data.layouts import LayoutScan, ScannedImage, register_layout, require_root

SPLITS: tuple[tuple[str, str, str], ...] = (
    ("instances_train2014.json", "train2014", "train"),
    ("instances_val2014.json", "val2014", "test"),
)


def _load(path: Path) -> dict[str, list[Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"coco2014: missing annotation file {str(path)!r}")
    try:
        with path.open("r", encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # json runs no code; a
        # crafted file can still nest past the recursion limit or not be UTF-8
        raise ValueError(f"{path}: not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    for key in ("images", "annotations", "categories"):
        if not isinstance(obj.get(key), list):
            raise ValueError(f"{path}: expected a list under {key!r}")
    return obj


def _field(item: Any, key: str, kind: type, path: Path, what: str, position: int) -> Any:
    value = item.get(key) if isinstance(item, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(
            f"{path}: {what} number {position} needs {key!r} of type {kind.__name__}, got {value!r}"
        )
    return value


def _categories(data: dict[str, list[Any]], path: Path) -> list[tuple[int, str]]:
    seen: dict[int, str] = {}
    for position, cat in enumerate(data["categories"], start=1):
        cat_id = _field(cat, "id", int, path, "category", position)
        name = _field(cat, "name", str, path, "category", position)
        if cat_id in seen:
            raise ValueError(f"{path}: category id {cat_id} is listed twice")
        seen[cat_id] = name
    if not seen:
        raise ValueError(f"{path}: no categories")
    return sorted(seen.items())


def _images(
    data: dict[str, list[Any]], path: Path, category_index: dict[int, int], image_dir: str, split: str
) -> list[ScannedImage]:
    file_names: dict[int, str] = {}
    for position, image in enumerate(data["images"], start=1):
        image_id = _field(image, "id", int, path, "image", position)
        file_name = _field(image, "file_name", str, path, "image", position)
        parts = PurePosixPath(file_name).parts
        if not parts or file_name.startswith("/") or "\\" in file_name or ".." in parts:
            raise ValueError(f"{path}: image id {image_id} has an unusable file_name {file_name!r}")
        if image_id in file_names:
            raise ValueError(f"{path}: image id {image_id} is listed twice")
        file_names[image_id] = file_name
    positives: dict[int, set[int]] = {}
    for position, ann in enumerate(data["annotations"], start=1):
        image_id = _field(ann, "image_id", int, path, "annotation", position)
        category_id = _field(ann, "category_id", int, path, "annotation", position)
        if category_id not in category_index:
            raise ValueError(
                f"{path}: annotation number {position} (id {ann.get('id')!r}) has category_id "
                f"{category_id}, which is not among the categories"
            )
        if image_id not in file_names:
            raise ValueError(
                f"{path}: annotation number {position} (id {ann.get('id')!r}) has image_id "
                f"{image_id}, which is not among the images"
            )
        positives.setdefault(image_id, set()).add(category_index[category_id])
    return [
        ScannedImage(f"{image_dir}/{file_name}", -1, split, tuple(sorted(positives[image_id])))
        for image_id, file_name in file_names.items()
        if image_id in positives
    ]


@register_layout("coco2014", task="multilabel",
                 root_marker=("annotations/instances_train2014.json", "train2014", "val2014"))
def scan_coco2014(root: Path, staging: Path | None = None) -> LayoutScan:
    """MS-COCO 2014 multi-label scan (annotated images only); see the module docstring."""
    root = require_root(root, "coco2014")
    classes: list[tuple[int, str]] | None = None
    first_path: Path | None = None
    images: list[ScannedImage] = []
    for json_name, image_dir, split in SPLITS:
        path = root / "annotations" / json_name
        data = _load(path)
        categories = _categories(data, path)
        if classes is None:
            classes, first_path = categories, path
        elif categories != classes:
            raise ValueError(f"{path}: its categories differ from those of {first_path}")
        category_index = {cat_id: i for i, (cat_id, _) in enumerate(categories)}
        images.extend(_images(data, path, category_index, image_dir, split))
        del data
    assert classes is not None
    return LayoutScan(root, [name for _, name in classes], images, task="multilabel")
