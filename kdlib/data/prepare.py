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
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from kdlib.data.index import DatasetIndex, DatasetMeta, Record, validate_index
from kdlib.data.layouts import LayoutScan, ScannedImage
from kdlib.data.splits import stratified_split
from kdlib.logline import PhaseLog
from kdlib.outputs import swap_into_place

if TYPE_CHECKING:
    from kdlib.data.spec import DatasetSpec

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
    phase = PhaseLog("prepare (checking every image)", len(scan.images))
    inspected: list[tuple[str, str | None]] = []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL decodes without the GIL
        for result in pool.map(lambda im: inspect_image(root / im.path), scan.images):
            inspected.append(result)
            phase.update()
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
    try:
        validate_index(index)
    except ValueError as err:  # the index's paths are relative: say what they are relative to
        raise ValueError(f"data set root {root}: {err}") from None
    return index


def dataset_root(spec: "DatasetSpec", name: str, downloads_dir: Path = Path("data/downloads")) -> Path:
    """Where data set ``name`` lies on disk: ``spec.root``; or, for a preset with ``url`` or
    ``downloads``, the layout's root inside the downloaded (checksum-verified, idempotent) and
    extracted archive(s), found by :func:`kdlib.data.layouts.find_layout_root` (``archive_subdir``
    names it explicitly).

    One ``url`` is extracted into ``<download_dir>/<archive name without suffix>``; a
    ``downloads`` list into ``<download_dir>/<name>``, each archive into its ``into`` sub-folder.
    The preset's ``max_*`` keys bound every download and extraction."""
    from kdlib.data.fetch import Download, fetch, fetch_all
    from kdlib.data.layouts import find_layout_root

    if not (spec.url or spec.downloads):
        return Path(spec.root or "")
    folder = Path(spec.download_dir) if spec.download_dir else Path(downloads_dir)
    if spec.url:
        tree = fetch(spec.url, folder, sha256=spec.sha256, md5=spec.md5, limits=spec.limits)
    else:
        tree = fetch_all([Download(**entry) for entry in spec.downloads], folder, name, limits=spec.limits)
    return find_layout_root(spec.layout, tree, spec.archive_subdir)


def prepare_dataset(spec: "DatasetSpec", name: str, out_dir: Path, split_seed: int,
                    downloads_dir: Path = Path("data/downloads")) -> DatasetIndex:
    """Read data set ``name`` as ``spec`` describes it (downloading, verifying and extracting it
    first when it has a ``url`` or ``downloads``: :func:`dataset_root`) and write the prepared
    index into ``out_dir``.

    Everything is built in the hidden folder ``.<out_dir name>.<pid>.partial`` beside
    ``out_dir`` and renamed into place when complete (an older ``out_dir`` is swapped out first
    and deleted after), so a failure leaves no ``out_dir`` behind and ``out_dir`` is never half
    written. A run killed before that leaves its staging folder, which the next prepare into
    the same ``out_dir`` removes once that pid is dead (as it does the ``out_dir.partial`` of
    older versions). Layouts whose images are packed (MNIST idx, CIFAR pickles) write them as
    image files there, so every data set goes through the same loading code.
    """
    from kdlib.data.fetch import remove_dead_leftovers, tagged_path
    from kdlib.data.index import write_index
    from kdlib.data.layouts import LAYOUTS

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".partial", ".old"):
        remove_dead_leftovers(out_dir.parent, f".{out_dir.name}", suffix)
    shutil.rmtree(out_dir.with_name(out_dir.name + ".partial"), ignore_errors=True)  # older versions' staging
    staging = tagged_path(out_dir.parent, f".{out_dir.name}", ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        root = dataset_root(spec, name, downloads_dir)
        reader = LAYOUTS.get(spec.layout)
        options = {**spec.options, **({"seed": split_seed} if reader.seeded else {})}  # type: ignore[attr-defined]
        staging.mkdir()
        scan = reader(root, staging=staging, **options)
        # packed layouts write their images under staging, which becomes out_dir below
        final_root = (out_dir / scan.root.relative_to(staging)) if scan.root.is_relative_to(staging) else scan.root
        meta = DatasetMeta(name, str(final_root), scan.classes, spec.channels, spec.image_size, spec.mean, spec.std,
                           task=scan.task, extra={"layout": spec.layout}, stored_size=scan.stored_size)
        index = index_from_scan(scan, meta, spec.val_fraction, spec.test_fraction, split_seed, spec.on_bad_image)
        write_index(index, staging)
        swap_into_place(staging, out_dir)  # out_dir is the old data set or the new one, never a mix
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return index
