"""Turn a layout scan into a validated :class:`DatasetIndex` with official or seeded splits.

Every listed image is read once: its bytes give the md5 recorded in the index (and used to
prove no image is in two splits), and a full decode proves it is usable. An image that is
missing, truncated or undecodable stops preparation (``on_bad_image="error"``, the default) or
is left out and listed (``"skip"``), before splits are drawn, so stratification sees only good
images.
"""
from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from kdlib.data.index import DatasetIndex, DatasetMeta, Record, validate_index
from kdlib.data.layouts import LayoutScan, ScannedImage
from kdlib.data.splits import stratified_split

BAD_IMAGE_POLICIES = ("error", "skip")


def inspect_image(path: Path) -> tuple[str, str | None]:
    """(md5 of the file's bytes, None) for a good image, or ("", why it is unusable)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "", "listed but missing"
    except OSError as err:
        return "", f"unreadable ({err})"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # a full decode: header checks alone miss truncated JPEGs
    except Exception as err:  # PIL raises many types for corrupt data
        return "", f"cannot be decoded ({type(err).__name__}: {err})"
    return hashlib.md5(data).hexdigest(), None


def index_from_scan(
    scan: LayoutScan,
    meta: DatasetMeta,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    on_bad_image: str = "error",
) -> DatasetIndex:
    """Check every image, assign splits and checksums, and validate the result.

    Official splits are kept. Images without a split are divided into train/test with
    ``test_fraction``; when there is no official ``val``, it is carved from train with
    ``val_fraction`` (both stratified, seeded). The test split is never touched to make val.
    Skipped images are listed in ``meta.extra["skipped"]`` as ``{"path", "reason"}``.
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
    root = Path(scan.root)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL decodes without the GIL
        inspected = list(pool.map(lambda im: inspect_image(root / im.path), scan.images))
    images: list[ScannedImage] = []
    md5s: list[str] = []
    skipped: list[dict[str, str]] = []
    for image, (md5, problem) in zip(scan.images, inspected):
        if problem is None:
            images.append(image)
            md5s.append(md5)
        elif on_bad_image == "skip":
            skipped.append({"path": image.path, "reason": problem})
        else:
            raise ValueError(f"{root / image.path}: {problem} (on_bad_image: skip leaves such files out)")

    rng = np.random.default_rng(seed)
    splits: list[str | None] = [im.split for im in images]
    unsplit = [i for i, s in enumerate(splits) if s is None]
    if unsplit:
        kept, held = stratified_split([images[i].label for i in unsplit], test_fraction, rng)
        for j in kept:
            splits[unsplit[j]] = "train"
        for j in held:
            splits[unsplit[j]] = "test"
    if "val" not in splits:
        train_pos = [i for i, s in enumerate(splits) if s == "train"]
        _, held = stratified_split([images[i].label for i in train_pos], val_fraction, rng)
        for j in held:
            splits[train_pos[j]] = "val"
    records = [Record(im.path, im.label, str(split), md5, im.positives, im.difficult)
               for im, split, md5 in zip(images, splits, md5s)]
    meta.extra = {**meta.extra, "skipped": skipped}
    index = DatasetIndex(meta, records)
    validate_index(index)
    return index
