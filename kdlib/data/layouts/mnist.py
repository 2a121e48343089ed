"""The embedded MNIST default (``mnist``): the four gzip idx files, md5-verified, written out as
PNGs in the ImageFolder layout under ``staging`` (train / val / test folders), then read back by
the ``imagefolder`` reader, so MNIST takes the same loading path as every file-based data set.

Options: ``val_per_class`` (a stratified, seeded validation set drawn from the MNIST training set),
``train_per_class`` (a stratified, seeded training subset disjoint from val; None: every training
image not drawn for val, i.e. 60,000 − 10·``val_per_class``: ``datasets.mnist_full``'s 55,000 /
5,000), ``test_per_class`` (None: the full 10,000-image test set, which no checkpoint selection
ever reads) and ``seed`` (``data.split_seed``).
"""
from __future__ import annotations

from pathlib import Path

from kdlib.data.layouts import LayoutScan, register_layout
from kdlib.data.layouts.imagefolder import scan_imagefolder
from kdlib.data.mnist import MNIST_SIZE, export_imagefolder, load_mnist
from kdlib.schema import is_int, optional


def check_mnist_options(options: dict) -> list[tuple[str, str]]:
    """``(option, "expected ...")`` per bad value: counts are positive integers; ``train_per_class``
    and ``test_per_class`` may be null (all of the split)."""
    checks = {"train_per_class": (optional(is_int(1)), "null (every training image not in val) or "),
              "val_per_class": (is_int(1), ""),
              "test_per_class": (optional(is_int(1)), "null (the full 10,000-image test set) or ")}
    found = []
    for key, (check, null) in checks.items():
        expected = check(options[key]) if key in options else None
        if expected:
            found.append((key, f"expected {null}{expected}"))
    return found


@register_layout("mnist", seeded=True, check_options=check_mnist_options)
def scan_mnist(
    root: Path,
    staging: Path | None = None,
    train_per_class: int | None = 100,
    val_per_class: int = 100,
    test_per_class: int | None = None,
    seed: int = 0,
) -> LayoutScan:
    if staging is None:
        raise ValueError("the mnist layout writes PNG files and needs a staging directory")
    images = Path(staging) / "images"
    export_imagefolder(load_mnist(Path(root)), images, train_per_class, val_per_class, seed, test_per_class)
    scan = scan_imagefolder(images)
    scan.stored_size = MNIST_SIZE
    return scan
