"""The embedded default data set: the four canonical MNIST idx files, gzip-compressed.

LeCun, Cortes, Burges, "The MNIST database of handwritten digits" (CC BY-SA 3.0; see
``data/mnist/README.md``). The files are verified against the canonical md5 sums of their
*decompressed* content before use.
"""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

MNIST_FILES = {
    "train_images": ("train-images.idx3-ubyte.gz", "6bbc9ace898e44ae57da46a324031adb"),
    "train_labels": ("train-labels.idx1-ubyte.gz", "a25bea736e30d166cdddb491f175f624"),
    "test_images": ("t10k-images.idx3-ubyte.gz", "2646ac647ad5339dbf082846283269ea"),
    "test_labels": ("t10k-labels.idx1-ubyte.gz", "27ae3e4e09519cfbb04c329615203637"),
}
MNIST_CLASSES = [str(d) for d in range(10)]
MNIST_SIZE = 28


class ChecksumError(ValueError):
    pass


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (bad magic number)")
    ndim = raw[3]
    header_end = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims)) + header_end
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, the header promises {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_end).reshape(dims)


def read_idx_gz(path: Path, md5: str | None = None) -> np.ndarray:
    """Read a gzip-compressed idx file; check the md5 of the decompressed bytes if given."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"MNIST file missing: {path}") from None
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: not a valid gzip file ({err})") from None
    if md5 is not None:
        actual = hashlib.md5(raw).hexdigest()
        if actual != md5:
            raise ChecksumError(
                f"{path}: md5 of the decompressed file is {actual}, expected {md5} "
                "(the file is corrupt or not the canonical MNIST file)"
            )
    return _parse_idx(raw, path)


def load_mnist(directory: Path) -> dict[str, np.ndarray]:
    """Load and verify the four MNIST arrays from ``directory``.

    Returns ``train_images (60000, 28, 28)``, ``train_labels``, ``test_images (10000, 28, 28)``,
    ``test_labels``, all uint8.
    """
    arrays = {key: read_idx_gz(Path(directory) / name, md5) for key, (name, md5) in MNIST_FILES.items()}
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise ValueError(f"MNIST {split}: {n_img} images but {n_lab} labels")
    return arrays


def _write_pngs(images: list[np.ndarray], paths: list[Path]) -> None:
    """Save each 28×28 uint8 array as a grayscale PNG (zlib level 6) at its path."""
    from PIL import Image

    from kdlib.logline import PhaseLog

    phase = PhaseLog("prepare (writing MNIST PNGs)", len(paths))
    for image, path in zip(images, paths):
        Image.fromarray(image, mode="L").save(path, compress_level=6)
        phase.update()


def export_imagefolder(
    arrays: dict[str, np.ndarray],
    out_root: Path,
    train_per_class: int | None,
    val_per_class: int,
    seed: int,
    test_per_class: int | None = None,
) -> dict[str, int]:
    """Write a stratified, seeded MNIST subset (or all of MNIST) as PNG files in the ImageFolder layout.

    ``val/`` gets ``val_per_class`` images of each digit drawn from the MNIST training set, and
    ``train/`` either ``train_per_class`` other images of each digit or, with ``train_per_class=None``,
    every training image not drawn for ``val/`` (60,000 − 10·``val_per_class``: 55,000 with 500 per
    class). With a number, train is drawn first and val from the rest; with None, val is drawn first
    (from the same seeded generator) and train is the complement, so val stays disjoint from train
    either way. ``test/`` gets the full 10,000-image test set, or a stratified ``test_per_class``
    subset of it (for tiny smoke runs).
    File names keep the source split and index (``mnist-train-01234.png``), so an image's origin
    is visible and the same source image can never appear under two names.
    """
    from kdlib.data.splits import stratified_take

    rng = np.random.default_rng(seed)
    labels = arrays["train_labels"]
    if train_per_class is None:
        val_idx = stratified_take(labels, val_per_class, rng)
        train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    else:
        train_idx = stratified_take(labels, train_per_class, rng)
        val_idx = stratified_take(labels, val_per_class, rng, exclude=set(train_idx.tolist()))
    plan = [
        ("train", "train", train_idx),
        ("val", "train", val_idx),
        ("test", "test", np.arange(len(arrays["test_labels"])) if test_per_class is None
         else stratified_take(arrays["test_labels"], test_per_class, rng)),
    ]
    counts = {}
    for split, source, indices in plan:
        images, labels_of = arrays[f"{source}_images"], arrays[f"{source}_labels"]
        for digit in MNIST_CLASSES:
            (out_root / split / digit).mkdir(parents=True, exist_ok=True)
        paths = [out_root / split / str(int(labels_of[i])) / f"mnist-{source}-{int(i):05d}.png" for i in indices]
        _write_pngs([images[i] for i in indices], paths)
        counts[split] = len(indices)
    return counts
