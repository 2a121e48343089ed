"""A data set as a run describes it: where it is, how it is read, and how its images are fed.

:class:`DatasetSpec` is one data-set preset: the layout that reads it and its options, the root
(or a checksummed download), the image size, channels and statistics, the augmentation, and
the evaluation conventions. It knows its task (from the layout, before any file is read) and
which of its fields decide what a training view looks like (what keys a teacher cache).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlib.data import fetch as _fetch
from kdlib.data.dataset import IndexedImageDataset
from kdlib.data.decode import needed_eval_short_side
from kdlib.data.index import DatasetIndex
from kdlib.data.layouts import LAYOUTS, layout_task, option_problems
from kdlib.data.transforms import TRAIN_PRESETS, augment_option_problems, build_transforms
from kdlib.schema import is_bool, is_float, is_float_list, is_int, is_mapping, is_str, one_of, setting

# the fields that decide what a training or evaluation view of an image looks like
VIEW_FIELDS = ("augment", "augment_options", "image_size", "mean", "std", "eval_crop_pct", "channels",
               "preload_size")
# view fields added later, left out of a view key while null so that keys (and the teacher caches
# they name) made before the field existed stay valid: null is what those runs did
NULL_OMITTED_VIEW_FIELDS = ("preload_size",)
DOWNLOAD_KEYS = ("url", "sha256", "md5", "filename", "into")


def is_preload_size(v: Any) -> str | None:
    ok = v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 8)
    return None if ok else "null or an integer >= 8 (the shorter side, in pixels, images are kept at)"


def is_download_list(v: Any) -> str | None:
    ok = isinstance(v, list) and all(isinstance(item, dict) for item in v)
    return None if ok else "a list of mappings with url, sha256 or md5, and optionally filename and into"


def _download_problems(entry: dict[str, Any]) -> list[str]:
    """What is wrong with one ``downloads`` entry (or the preset's own url/sums), each an "expected ..." text."""
    found = [f"unknown key {k!r}; expected only {', '.join(DOWNLOAD_KEYS)}" for k in entry if k not in DOWNLOAD_KEYS]
    url = entry.get("url")
    if not isinstance(url, str) or not url:
        return found + ["expected `url`, an http or https URL"]
    try:
        _fetch.check_url(url)
    except ValueError as err:
        found.append(str(err))
    if entry.get("sha256") is None and entry.get("md5") is None:
        found.append(f"{_fetch.mask_url(url)}: a download needs `sha256` or `md5` to verify it")
    for algorithm in ("sha256", "md5"):
        value = entry.get(algorithm)
        if value is not None and not isinstance(value, str):
            found.append(f"{algorithm} = {value!r}: expected a quoted string of hex digits")
        elif value is not None:
            try:
                _fetch.expected_sums(**{algorithm: value})
            except ValueError as err:
                found.append(f"{err} (expected hex digits)")
    try:
        name = entry.get("filename")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"filename {name!r} is not a plain file name")
        _fetch.check_filename(name if name is not None else _fetch.url_basename(url), url)
    except ValueError as err:
        found.append(str(err))
    try:
        _fetch.check_into(entry.get("into", ""))
    except ValueError as err:
        found.append(str(err))
    return found


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """One data-set preset (see ``params.yaml``'s ``datasets`` for every key in use).

    The multi-label evaluation rules, ``ap_mode`` and ``multilabel_convention``, are preset
    fields because they are facts about whose numbers a data set's results are compared with:
    LSHFM's presets (``voc2007``, ``coco2014``) score with LSHFM's code's rules
    (:mod:`kdlib.multilabel`, "Conventions") while every other preset keeps kdlib's, and a run
    reads both from the one preset it trains and evaluates on, so validation, ``evaluate``,
    ``quantize`` and ``export`` cannot disagree on them.
    """

    layout: str = setting(is_str)
    root: str | None = setting(is_str, None)  # the data set on disk; or, with `url`, downloaded and extracted
    url: str | None = setting(is_str, None)
    sha256: str | None = setting(is_str, None)
    md5: str | None = setting(is_str, None)
    download_dir: str | None = setting(is_str, None)
    # several archives (e.g. Stanford Dogs' images.tar + lists.tar), extracted into one folder
    # data/downloads/<data set name>: each {url, sha256 and/or md5, filename?, into?}
    downloads: list[dict[str, Any]] = setting(is_download_list, [])
    archive_subdir: str = setting(is_str, "")  # the layout's root inside the extracted archive(s); default: found
    # bounds of a fetch (kdlib.data.fetch.Limits): per downloaded file, and per archive
    max_download_bytes: int = setting(is_int(1), _fetch.DEFAULT_MAX_DOWNLOAD_BYTES)
    max_extracted_bytes: int = setting(is_int(1), _fetch.DEFAULT_MAX_EXTRACTED_BYTES)
    max_archive_members: int = setting(is_int(1), _fetch.DEFAULT_MAX_ARCHIVE_MEMBERS)
    max_compression_ratio: float = setting(is_float(1), _fetch.DEFAULT_MAX_COMPRESSION_RATIO)
    options: dict[str, Any] = setting(is_mapping, {})  # keyword arguments of the layout reader (e.g. dogs_root)
    on_bad_image: str = setting(one_of("error", "skip"), "error")
    preload: bool = setting(is_bool, False)  # decode every image once (in memory, or the pixel cache with preload_size)
    # training images at short side preload_size (reduced JPEG decode + resize; smaller ones kept):
    # with preload, decoded once into a memory-mapped pixel cache; null: full-size images.
    # Evaluation splits use round(input_size / eval_crop_pct), the side their resize makes.
    preload_size: int | None = setting(is_preload_size, None)
    ap_mode: str = setting(one_of("voc", "coco"), "voc")  # multi-label AP: all-point interpolated or not
    # multi-label scoring rules (kdlib.multilabel, "Conventions"; why a preset field: the class docstring):
    # `lshfm` counts a class with no positive as AP 0 in mAP and sets Np := 1 for a class never predicted
    # (OP's denominator), as LSHFM's and ML-GCN's evaluation code do; `kdlib` leaves both out
    multilabel_convention: str = setting(one_of("kdlib", "lshfm"), "kdlib")
    mixup: float = setting(is_float(0), 0.0)  # MixUp alpha (0 = off); single-label only
    cutmix: float = setting(is_float(0), 0.0)  # CutMix alpha (0 = off); one of the two per batch when both on
    eval_crop_pct: float = setting(is_float(0, 1, lo_open=True), 0.875)  # eval: resize to size/crop_pct, center crop
    image_size: int = setting(is_int(8))
    channels: int = setting(one_of(1, 3))
    mean: list[float] = setting(is_float_list)
    std: list[float] = setting(is_float_list)
    augment: str = setting(is_str)
    augment_options: dict[str, Any] = setting(is_mapping, {})
    val_fraction: float = setting(is_float(0, 1, lo_open=True, hi_open=True), 0.1)
    test_fraction: float = setting(is_float(0, 1, lo_open=True, hi_open=True), 0.2)

    @property
    def limits(self) -> "_fetch.Limits":
        """The preset's bounds on downloading and extracting."""
        return _fetch.Limits(self.max_download_bytes, self.max_extracted_bytes, self.max_archive_members,
                             self.max_compression_ratio)

    def problems(self) -> list[tuple[str | None, str]]:
        found: list[tuple[str | None, str]] = []
        if self.layout not in LAYOUTS:
            found.append(("layout", f"expected one of: {', '.join(LAYOUTS.names())}"))
        else:
            found += [(f"options.{key}", text) for key, text in option_problems(self.layout, self.options)]
        if self.augment not in TRAIN_PRESETS:
            found.append(("augment", f"expected one of: {', '.join(TRAIN_PRESETS.names())}"))
        found += augment_option_problems(self.augment, self.augment_options, self.image_size)
        if not self.root and not self.url and not self.downloads:
            found.append((None, "give `root` (a path), `url` with `sha256` or `md5`, or `downloads`"))
        if self.url and self.downloads:
            found.append(("downloads", "expected either `url` (one archive) or `downloads` (several), not both"))
        if self.url:
            if not (self.sha256 or self.md5):
                found.append(("url", "a download needs `sha256` or `md5` to verify it"))
            else:
                found += [("url", text) for text in _download_problems(
                    {k: getattr(self, k) for k in ("url", "sha256", "md5") if getattr(self, k) is not None})]
        for i, entry in enumerate(self.downloads):
            found += [(None, f"downloads[{i}] = {entry!r}: {text}")
                      for text in _download_problems(entry)]
        names = [e.get("filename") or _fetch.url_basename(str(e.get("url", ""))) for e in self.downloads]
        if len(set(names)) != len(names):
            found.append(("downloads",
                          f"file names {names} are not distinct; expected a `filename` to tell them apart"))
        if self.archive_subdir:
            if not (self.url or self.downloads):
                found.append(("archive_subdir", "only used with `url` or `downloads`; expected it unset with `root`"))
            try:
                _fetch.check_into(self.archive_subdir)
            except ValueError:
                found.append(("archive_subdir",
                              "expected a relative folder inside the extracted archive, without '..'"))
        if (self.mixup or self.cutmix) and self.layout in LAYOUTS and self.task == "multilabel":
            found.append((None, "mixup/cutmix are for single-label data sets"))
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            found.append((None, f"mean and std need {self.channels} values (channels)"))
        if any(s <= 0 for s in self.std):
            found.append(("std", "expected positive numbers"))
        if self.preload_size is not None and self.preload_size < self.image_size:
            found.append(("preload_size", f"expected null or at least image_size ({self.image_size}): images "
                                          f"cached at a shorter side of {self.preload_size} px would be enlarged "
                                          f"into every {self.image_size}-px view"))
        return found

    @property
    def task(self) -> str:
        """``multiclass`` or ``multilabel``, as the layout declares."""
        return layout_task(self.layout)

    @property
    def mixes(self) -> bool:
        """Whether training batches are mixed (MixUp/CutMix)."""
        return bool(self.mixup or self.cutmix)

    def view_key(self, input_size: int) -> dict[str, Any]:
        """The fields that decide what a view of an image looks like at ``input_size``."""
        values = {key: getattr(self, key) for key in VIEW_FIELDS}
        for key in NULL_OMITTED_VIEW_FIELDS:
            if values[key] is None:
                del values[key]
        return {**values, "input_size": input_size}

    def short_side(self, input_size: int, train: bool) -> int | None:
        """The short side images of a split are kept at (None: full size). Training:
        ``preload_size``. Evaluation: ``round(input_size / eval_crop_pct)``, the side the
        evaluation transform resizes to before its center crop, so its views are those of a
        full-size decode up to resampling (exactly those where no reduced JPEG scale applies)."""
        if self.preload_size is None:
            return None
        if not train:
            return needed_eval_short_side(input_size, self.eval_crop_pct)
        if self.preload_size < input_size:
            raise ValueError(f"preload_size {self.preload_size} is smaller than the input size {input_size}: "
                             f"expected preload_size >= {input_size} (or null) for a model trained at {input_size} px")
        return self.preload_size

    def load(self, index: DatasetIndex, split: str, input_size: int | None, train: bool,
             cache_dir: Path | None = None, cache_workers: int = 0) -> IndexedImageDataset:
        """Split ``split`` of the prepared ``index``, transformed for training or evaluation at
        ``input_size`` (None: the data set's image size). With ``preload`` and ``preload_size``,
        ``cache_dir`` holds the pixel caches (built there once, by ``cache_workers`` processes;
        None: kept in memory instead)."""
        meta = index.meta
        size = input_size or meta.image_size
        transforms = build_transforms(self.augment, size, meta.stored_size, train,
                                      self.augment_options, self.eval_crop_pct)
        return IndexedImageDataset(meta.root, index.split(split), meta.channels, transforms.sample, self.preload,
                                   transforms.batch, meta.num_classes, preload_size=self.short_side(size, train),
                                   cache_dir=cache_dir, cache_workers=cache_workers)
