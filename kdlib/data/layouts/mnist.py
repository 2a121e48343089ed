"""The embedded MNIST default (``mnist``): the four gzip idx files, md5-verified, written out as
PNGs in the ImageFolder layout under ``staging`` (train / val / test folders), then read back by
the ``imagefolder`` reader, so MNIST takes the same loading path as every file-based data set.

Options: ``train_per_class`` and ``val_per_class`` (a stratified, seeded subset of the MNIST
training set; val disjoint from train), ``test_per_class`` (None: the full 10,000-image test
set) and ``seed``.
"""
from __future__ import annotations

from pathlib import Path

from kdlib.data.layouts import LayoutScan, register_layout
from kdlib.data.layouts.imagefolder import scan_imagefolder
from kdlib.data.mnist import MNIST_SIZE, export_imagefolder, load_mnist
from kdlib.schema import is_int, optional


def check_mnist_options(options: dict) -> list[tuple[str, str]]:
    checks = {"train_per_class": is_int(1), "val_per_class": is_int(1), "test_per_class": optional(is_int(1))}
    found = []
    for key, check in checks.items():
        expected = check(options[key]) if key in options else None
        if expected:
            found.append((key, f"expected {expected}"))
    return found


@register_layout("mnist", seeded=True, check_options=check_mnist_options)
def scan_mnist(
    root: Path,
    staging: Path | None = None,
    train_per_class: int = 100,
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
