"""Helpers shared by the stage scripts: paths, datasets from the prepared index, JSON output."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlib.data import BatchNormalizer, IndexedImageDataset, build_transforms, read_index
from kdlib.data.index import DatasetIndex

PREPARED_DIR = Path("data/prepared")
MODELS_DIR = Path("models")
REPORTS_DIR = Path("reports")
ROLES = ("teacher", "baseline", "distill")


@dataclass(frozen=True)
class Workspace:
    """Where the training stages read and write, relative to ``root`` (the repository for
    ``dvc repro``; a scratch directory when tests and benchmarks call the stage functions)."""

    root: Path = Path(".")

    @property
    def prepared(self) -> Path:
        return self.root / PREPARED_DIR

    @property
    def models(self) -> Path:
        return self.root / MODELS_DIR

    @property
    def reports(self) -> Path:
        return self.root / REPORTS_DIR

    @property
    def teacher_checkpoint(self) -> Path:
        return self.models / "teacher" / "best.pt"

    @property
    def teacher_cache(self) -> Path:
        return self.models / "teacher_cache"

    @property
    def align(self) -> Path:
        return self.models / "align"


def load_split(
    index: DatasetIndex, split: str, dataset_preset: dict[str, Any], input_size: int | None, train: bool,
) -> IndexedImageDataset:
    meta = index.meta
    transforms = build_transforms(
        dataset_preset["augment"], input_size or meta.image_size, meta.stored_size, train,
        dataset_preset.get("augment_options"), dataset_preset.get("eval_crop_pct", 0.875),
    )
    return IndexedImageDataset(meta.root, index.split(split), meta.channels, transforms.sample,
                               dataset_preset.get("preload", False), transforms.batch, meta.num_classes)


def prepared_index() -> DatasetIndex:
    return read_index(PREPARED_DIR)


def normalizer_for(index: DatasetIndex, channels_last: bool = False) -> BatchNormalizer:
    return BatchNormalizer(index.meta.mean, index.meta.std, channels_last)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically so DVC never caches a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
