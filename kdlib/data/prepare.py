"""Turn a layout scan into a validated :class:`DatasetIndex` with official or seeded splits."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kdlib.data.index import DatasetIndex, DatasetMeta, Record, file_md5, validate_index
from kdlib.data.layouts import LayoutScan
from kdlib.data.splits import stratified_split


def index_from_scan(
    scan: LayoutScan,
    meta: DatasetMeta,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> DatasetIndex:
    """Assign splits and checksums to the scanned images.

    Official splits are kept. Images without a split are divided into train/test with
    ``test_fraction``; when there is no official ``val``, it is carved from train with
    ``val_fraction`` (both stratified, seeded). The test split is never touched to make val.
    """
    rng = np.random.default_rng(seed)
    images = list(scan.images)
    splits: list[str | None] = [im.split for im in images]
    unsplit = [i for i, s in enumerate(splits) if s is None]
    if unsplit:
        labels = [images[i].label for i in unsplit]
        kept, held = stratified_split(labels, test_fraction, rng)
        for j in kept:
            splits[unsplit[j]] = "train"
        for j in held:
            splits[unsplit[j]] = "test"
    if "val" not in splits:
        train_pos = [i for i, s in enumerate(splits) if s == "train"]
        _, held = stratified_split([images[i].label for i in train_pos], val_fraction, rng)
        for j in held:
            splits[train_pos[j]] = "val"
    records = [
        Record(im.path, im.label, str(split), file_md5(Path(scan.root) / im.path))
        for im, split in zip(images, splits)
    ]
    index = DatasetIndex(meta, records)
    validate_index(index)
    return index
