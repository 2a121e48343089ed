"""Stanford Dogs (``stanford_dogs``), read from its official ``.mat`` split lists.

On-disk layout under ``root``::

    Images/<wnid>-<name>/<file>.jpg        e.g. Images/n02085620-Chihuahua/n02085620_5927.jpg
    splits/train_list.mat
    splits/test_list.mat

Each list is a MATLAB file read with :func:`scipy.io.loadmat`. Key ``file_list`` is an (N, 1)
cell array (loaded as an object array whose elements are 1-element string arrays) of paths
relative to ``Images/``, ``<wnid>-<name>/<file>``. Key ``labels``, when present, is (N, 1)
numeric with the 1-based class of each row. Other keys (``annotation_list``) are ignored, as is
``splits/file_list.mat`` (the union of both lists).

Classes are the sorted folder names (``n02085620-Chihuahua``, shown as given) found in the two
lists; label = index in that list. Where ``labels`` is present it must equal that index + 1.
Images are listed in list order, train list first, with paths ``Images/<relpath>`` relative to
``root``; a path may occur once only, in one list. The real data set has 20,580 images in 120
classes: 12,000 train (100 per class) / 8,580 test.

Source-project bug avoided: the DeiT+ConvNeXt FGVC project built ``<root>splits/...`` and
``<root>Images`` by string concatenation, so the root only worked with a trailing ``/``; here any
spelling of the root (str or Path, with or without the slash) works.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import scipy.io

from kdlib.data.layouts import LayoutScan, ScannedImage, register_layout
from kdlib.data.layouts.cub200 import require_dir, require_file, safe_relpath

IMAGES_DIR = "Images"
SPLIT_LISTS = (("train", PurePosixPath("splits", "train_list.mat")), ("test", PurePosixPath("splits", "test_list.mat")))


def _column(path: Path, mat: dict[str, Any], key: str) -> np.ndarray:
    """``mat[key]`` as a flat array; it must be an (N, 1), (1, N) or (N,) array."""
    array = np.asarray(mat[key])
    if array.ndim > 2 or (array.ndim == 2 and 1 not in array.shape):
        raise ValueError(f"{path}: key {key!r} should be an (N, 1) array, got shape {array.shape}")
    return array.reshape(-1)


def _cell_text(cell: Any) -> str | None:
    """The string inside a loaded cell (a 1-element string array, possibly nested), else None."""
    while isinstance(cell, np.ndarray):
        if cell.size != 1:
            return None
        cell = cell.reshape(-1)[0]
    return str(cell) if isinstance(cell, str) else None


def _read_list(path: Path) -> tuple[list[PurePosixPath], list[int] | None]:
    """Relative paths (``<folder>/<file>``) and the optional 1-based labels of one split list."""
    try:
        mat = scipy.io.loadmat(str(require_file(path)))
    except FileNotFoundError:
        raise
    except Exception as error:  # scipy raises several types for a corrupt or non-MAT file
        raise ValueError(f"{path}: cannot be read as a MATLAB .mat file ({error})") from error
    if "file_list" not in mat:
        keys = ", ".join(sorted(k for k in mat if not k.startswith("__"))) or "none"
        raise ValueError(f"{path}: no 'file_list' key (keys: {keys})")
    paths: list[PurePosixPath] = []
    for row, cell in enumerate(_column(path, mat, "file_list"), start=1):
        text = _cell_text(cell)
        rel = safe_relpath(text) if text is not None else None
        if rel is None or len(rel.parts) != 2:
            raise ValueError(
                f"{path}, file_list row {row}: expected a path '<wnid>-<name>/<file>' relative to "
                f"{IMAGES_DIR}/, got {text if text is not None else cell!r}"
            )
        paths.append(rel)
    if not paths:
        raise ValueError(f"{path}: 'file_list' is empty")
    if "labels" not in mat:
        return paths, None
    values = _column(path, mat, "labels")
    if len(values) != len(paths):
        raise ValueError(f"{path}: 'labels' has {len(values)} rows but 'file_list' has {len(paths)}")
    labels: list[int] = []
    for row, value in enumerate(values, start=1):
        dtype = np.asarray(value).dtype
        numeric = np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
        number = float(value) if numeric else float("nan")
        if not number.is_integer():
            raise ValueError(f"{path}, labels row {row}: expected a 1-based integer class, got {value!r}")
        labels.append(int(number))
    return paths, labels


@register_layout("stanford_dogs", root_marker=("Images", "splits/train_list.mat"))
def scan_stanford_dogs(root: Path | str, staging: Path | None = None) -> LayoutScan:
    """Scan Stanford Dogs at ``root`` with its official train/test lists."""
    root = require_dir(root, "stanford_dogs")
    lists = [(split, root / rel, *_read_list(root / rel)) for split, rel in SPLIT_LISTS]
    classes = sorted({rel.parts[0] for _, _, paths, _ in lists for rel in paths})
    label_of = {name: i for i, name in enumerate(classes)}
    images: list[ScannedImage] = []
    seen: dict[str, tuple[Path, int]] = {}
    for split, list_path, paths, labels in lists:
        for row, rel in enumerate(paths, start=1):
            label = label_of[rel.parts[0]]
            if labels is not None and labels[row - 1] != label + 1:
                raise ValueError(
                    f"{list_path}, row {row}: labels says class {labels[row - 1]} but folder "
                    f"{rel.parts[0]!r} is class {label + 1} (1-based, of {len(classes)} sorted folders)"
                )
            path = (PurePosixPath(IMAGES_DIR) / rel).as_posix()
            if path in seen:
                first_list, first_row = seen[path]
                raise ValueError(f"{list_path}, row {row}: {rel} is already listed in {first_list}, row {first_row}")
            seen[path] = (list_path, row)
            images.append(ScannedImage(path, label, split))
    return LayoutScan(root, classes, images)
