"""CIFAR-10 and CIFAR-100 (``cifar10``, ``cifar100``) from the "python version" pickle batches.

On-disk layout, as distributed (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``):

- CIFAR-10: ``cifar-10-batches-py/`` holding ``data_batch_1`` … ``data_batch_5`` (train, 10,000
  images each), ``test_batch`` (test, 10,000) and ``batches.meta`` (key ``label_names``: the 10
  class names, index = label). Labels are under the key ``labels``.
- CIFAR-100: ``cifar-100-python/`` holding ``train`` (50,000), ``test`` (10,000) and ``meta``
  (key ``fine_label_names``: the 100 class names). Labels are the *fine* labels, key
  ``fine_labels`` (``coarse_labels``, the 20 super-classes, are not used).

Every file is a Python pickle whose dict keys are ``bytes`` (the files were written by Python 2),
so they are loaded with ``encoding="bytes"``; ``str`` keys are accepted as well.
Each batch's ``data`` is an ``(N, 3072)`` uint8 array, one image per row: the 1,024 red, then
1,024 green, then 1,024 blue values of a 32×32 image, each plane row-major. Labels are 0-based
class indices.

Unpickling can run code (a pickle may call any importable function), so the batches are read by
:class:`CifarUnpickler`, which resolves only the globals a CIFAR batch needs — numpy's array,
dtype and scalar reconstruction (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``,
``numpy.dtype``, ``…multiarray.scalar``, ``…numeric._frombuffer``, under numpy 1's ``numpy.core``
and numpy 2's ``numpy._core`` names) and ``_codecs.encode`` restricted to latin-1 (how Python 3
pickles ``bytes`` at protocols 0–2). Dicts, lists, tuples, strings and numbers need no global.
Any other global is refused before anything is called, with a ``ValueError`` naming the file
and the global.

``root`` may be the ``cifar-10-batches-py`` / ``cifar-100-python`` folder itself or the folder that
contains it. Official splits: 50,000 train / 10,000 test for both; 10 / 100 classes.

The images are packed, so the reader needs ``staging`` (a ``ValueError`` otherwise): it writes
every image as a 32×32 RGB PNG to
``staging/images/{train,test}/<class name>/<batch file>-<row index in that file, 5 digits>.png``
(e.g. ``train/cat/data_batch_3-00042.png``, ``test/apple/test-00007.png``), overwriting files of
the same name, and returns a scan rooted at ``staging/images`` that lists exactly the images it
wrote (files left there by earlier runs are not listed). Images keep the batch files' order.

The reader checks the files' sizes: every data row has 3,072 values in 0..255, each batch has one
label per row, labels lie within the class list of the meta file, and the class list has 10 / 100
distinct names usable as folder names; errors name the offending file.

Options:

- ``train_limit: int | None`` — keep only the first N training images (in batch order; batches past
  the limit are not read, though they must exist). ``None`` (default) keeps all.
- ``test_limit: int | None`` — the same for the test split.

They exist for tests and smoke runs; a full run leaves both at ``None``.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kdlib.data.layouts import LayoutScan, ScannedImage, register_layout

IMAGE_SIDE = 32
ROW_LENGTH = 3 * IMAGE_SIDE * IMAGE_SIDE  # 3072


@dataclass(frozen=True)
class _Variant:
    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    names_key: str
    labels_key: str
    num_classes: int


CIFAR10 = _Variant(
    name="cifar10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    names_key="label_names",
    labels_key="labels",
    num_classes=10,
)
CIFAR100 = _Variant(
    name="cifar100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    names_key="fine_label_names",
    labels_key="fine_labels",
    num_classes=100,
)


def _base_dir(root: Path, variant: _Variant) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(f"{variant.name} root {str(root)!r} is not a directory")
    nested = root / variant.folder
    return nested if nested.is_dir() else root


def _require_file(path: Path, variant: _Variant) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"{variant.name}: missing {str(path)!r} (root must be the {variant.folder!r} folder "
            "of the python-version archive, or the folder that contains it)"
        )


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 pickles ``bytes`` at protocols 0-2 (``encode(s, "latin1")``):
    any other codec is refused, so a pickle cannot reach a codec's lookup or run one."""
    # compared as text, not looked up: a codec lookup would import the module a pickle names
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError(
            f"refuses _codecs.encode({type(text).__name__}, {encoding!r}, {errors!r}): only latin-1 "
            "encoding of a str (how Python 3 pickles bytes) is allowed"
        )
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) → object for every global a CIFAR batch may reference. The objects are
    looked up here, once, so ``find_class`` never imports a module a pickle names."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]

    allowed: dict[tuple[str, str], Any] = {("_codecs", "encode"): _latin1_encode}
    for package in ("numpy.core", "numpy._core"):  # numpy 1 / Python 2 pickles, numpy 2 pickles
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that runs no code but numpy's array reconstruction.

    Guarantee: every callable a pickle can reach comes from :meth:`find_class` (the only way a
    pickle names a global; persistent ids are refused by ``pickle.Unpickler`` itself), and
    ``find_class`` returns only the objects of :func:`_allowed_globals`; anything else raises
    :class:`pickle.UnpicklingError` before it is imported or called.
    """

    _ALLOWED: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if CifarUnpickler._ALLOWED is None:
            CifarUnpickler._ALLOWED = _allowed_globals()
        found = CifarUnpickler._ALLOWED.get((module, name))
        if found is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return found


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, qualified: str) -> None:
        super().__init__(qualified)
        self.qualified = qualified


def _load_pickle(path: Path) -> dict[Any, Any]:
    try:
        with path.open("rb") as f:
            obj = CifarUnpickler(f, encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise ValueError(
            f"{path}: refuses to load {exc.qualified!r} — CIFAR batches hold only arrays, lists and "
            "dicts; this file is not a CIFAR batch (or was crafted)"
        ) from None
    except Exception as exc:  # unpickling can fail in many ways on a corrupt file
        raise ValueError(f"{path}: not a readable Python pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _get(obj: dict[Any, Any], key: str, path: Path) -> Any:
    for candidate in (key.encode("ascii"), key):
        if candidate in obj:
            return obj[candidate]
    present = ", ".join(sorted(repr(k) for k in obj))
    raise ValueError(f"{path}: missing key {key!r} (keys present: {present})")


def _class_names(path: Path, variant: _Variant) -> list[str]:
    raw = _get(_load_pickle(path), variant.names_key, path)
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"{path}: {variant.names_key!r} must be a list of names, got {type(raw).__name__}")
    names: list[str] = []
    for i, item in enumerate(raw):
        name = item.decode("utf-8") if isinstance(item, bytes) else item
        if not isinstance(name, str):
            raise ValueError(f"{path}: class name {i} is {type(item).__name__}, expected bytes or str")
        if not name or name in (".", "..") or "/" in name or "\\" in name or name != name.strip():
            raise ValueError(f"{path}: class name {i} ({name!r}) cannot be used as a folder name")
        names.append(name)
    if len(names) != variant.num_classes:
        raise ValueError(
            f"{path}: {variant.names_key!r} lists {len(names)} classes, {variant.name} has "
            f"{variant.num_classes}"
        )
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{path}: duplicate class names {duplicates}")
    return names


def _batch(path: Path, variant: _Variant) -> tuple[np.ndarray, np.ndarray]:
    """The batch's (N, 3072) uint8 data and (N,) int64 labels, checked."""
    obj = _load_pickle(path)
    data = np.asarray(_get(obj, "data", path))
    if data.ndim != 2 or data.shape[1] != ROW_LENGTH:
        raise ValueError(
            f"{path}: 'data' has shape {data.shape}, expected (N, {ROW_LENGTH}) — one 3x32x32 "
            "image per row"
        )
    if data.dtype != np.uint8:
        if not np.issubdtype(data.dtype, np.integer):
            raise ValueError(f"{path}: 'data' has dtype {data.dtype}, expected uint8")
        if data.size and (data.min() < 0 or data.max() > 255):
            raise ValueError(f"{path}: 'data' values lie outside 0..255")
        data = data.astype(np.uint8)
    labels = np.asarray(_get(obj, variant.labels_key, path))
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"{path}: {variant.labels_key!r} must be a flat list of integers")
    if len(labels) != len(data):
        raise ValueError(
            f"{path}: {len(labels)} labels under {variant.labels_key!r} for {len(data)} data rows"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= variant.num_classes))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{path}: label {int(labels[i])} of row {i} is outside 0..{variant.num_classes - 1}"
        )
    return data, labels.astype(np.int64)


def _check_limit(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")


def _scan(
    variant: _Variant,
    root: Path,
    staging: Path | None,
    train_limit: int | None,
    test_limit: int | None,
) -> LayoutScan:
    if staging is None:
        raise ValueError(
            f"{variant.name} images are packed in pickles: the reader needs a staging folder to "
            "write them to as PNG files (staging=None)"
        )
    _check_limit("train_limit", train_limit)
    _check_limit("test_limit", test_limit)
    base = _base_dir(Path(root), variant)
    meta_path = base / variant.meta_file
    splits = (("train", variant.train_files, train_limit), ("test", variant.test_files, test_limit))
    for path in [meta_path] + [base / f for _, files, _ in splits for f in files]:
        _require_file(path, variant)
    classes = _class_names(meta_path, variant)

    images_root = Path(staging) / "images"
    images: list[ScannedImage] = []
    for split, files, limit in splits:
        remaining = limit
        for name in files:
            if remaining is not None and remaining <= 0:
                break
            data, labels = _batch(base / name, variant)
            count = len(data) if remaining is None else min(len(data), remaining)
            for index in range(count):
                label = int(labels[index])
                relative = f"{split}/{classes[label]}/{name}-{index:05d}.png"
                target = images_root / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                pixels = data[index].reshape(3, IMAGE_SIDE, IMAGE_SIDE).transpose(1, 2, 0)
                Image.fromarray(np.ascontiguousarray(pixels)).save(target, format="PNG")
                images.append(ScannedImage(relative, label, split))
            if remaining is not None:
                remaining -= count
    return LayoutScan(images_root, classes, images, stored_size=32)


@register_layout("cifar10")
def scan_cifar10(
    root: Path,
    staging: Path | None = None,
    *,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> LayoutScan:
    """CIFAR-10 (10 classes, 50,000 / 10,000); see the module docstring."""
    return _scan(CIFAR10, root, staging, train_limit, test_limit)


@register_layout("cifar100")
def scan_cifar100(
    root: Path,
    staging: Path | None = None,
    *,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> LayoutScan:
    """CIFAR-100 with fine labels (100 classes, 50,000 / 10,000); see the module docstring."""
    return _scan(CIFAR100, root, staging, train_limit, test_limit)
