"""The prepared-data contract between ``prepare`` and every later stage.

Whatever the source layout, ``prepare`` writes one directory holding

* ``index.csv``: one row per image: ``path`` (relative to ``root``), ``label``, ``split``
  (train / val / test) and ``md5`` of the file's bytes;
* ``dataset.json``: name, ``root``, class names, channels, image size, mean/std, task;

and a manifest (counts per split and class, checksums) that DVC tracks as a metric, so
``dvc metrics diff`` shows when the data changed.
"""
from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kdlib.data.splits import assert_disjoint

SPLITS = ("train", "val", "test")
INDEX_FILE = "index.csv"
META_FILE = "dataset.json"


@dataclass(frozen=True)
class Record:
    path: str
    label: int  # class index; -1 for multi-label data sets
    split: str
    md5: str = ""
    positives: tuple[int, ...] = ()  # multi-label: classes present
    difficult: tuple[int, ...] = ()  # multi-label: present only as difficult objects (not scored)

    def classes_present(self) -> tuple[int, ...]:
        return self.positives if self.label < 0 else (self.label,)


@dataclass
class DatasetMeta:
    name: str
    root: str
    classes: list[str]
    channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    task: str = "multiclass"
    extra: dict = field(default_factory=dict)
    stored_size: int | None = None  # side of every stored image when all are square and equal
    #                                 (the embedded MNIST export); None: sizes vary, always resize

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class DatasetIndex:
    meta: DatasetMeta
    records: list[Record]

    def split(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def validate_index(index: DatasetIndex) -> None:
    """Check labels, split names, that train/val/test are non-empty and disjoint (by path and
    by content), and that every class has a training image."""
    num_classes = index.meta.num_classes
    multilabel = index.meta.task == "multilabel"
    for r in index.records:
        if r.split not in SPLITS:
            raise ValueError(f"{r.path}: split {r.split!r} is not one of {SPLITS}")
        labels = r.positives + r.difficult if multilabel else (r.label,)
        if any(not 0 <= c < num_classes for c in labels):
            raise ValueError(f"{r.path}: label {labels} outside 0..{num_classes - 1}")
    for split in SPLITS:
        if not index.split(split):
            raise ValueError(f"the {split!r} split is empty")
    assert_disjoint({s: [r.path for r in index.split(s)] for s in SPLITS})
    assert_disjoint({s: [r.md5 for r in index.split(s) if r.md5] for s in SPLITS})
    train_classes = {c for r in index.split("train") for c in r.classes_present()}
    missing = [index.meta.classes[c] for c in range(num_classes) if c not in train_classes]
    if missing:
        raise ValueError(f"classes with no training image: {', '.join(missing[:10])}")


def write_index(index: DatasetIndex, out_dir: Path) -> None:
    validate_index(index)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / INDEX_FILE, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label", "split", "md5", "positives", "difficult"])
        for r in index.records:
            writer.writerow([r.path, r.label, r.split, r.md5, _ints(r.positives), _ints(r.difficult)])
    (out_dir / META_FILE).write_text(json.dumps(asdict(index.meta), indent=2) + "\n")


def _ints(values: tuple[int, ...]) -> str:
    return " ".join(map(str, values))


def _parse_ints(text: str | None) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split()) if text else ()


def read_index(directory: Path) -> DatasetIndex:
    directory = Path(directory)
    meta_path, index_path = directory / META_FILE, directory / INDEX_FILE
    for path in (meta_path, index_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the prepare stage first")
    meta = DatasetMeta(**json.loads(meta_path.read_text()))
    records = []
    with open(index_path, newline="") as handle:
        reader = csv.DictReader(handle)
        for line_no, row in enumerate(reader, start=2):
            try:
                records.append(Record(row["path"], int(row["label"]), row["split"], row.get("md5", ""),
                                      _parse_ints(row.get("positives")), _parse_ints(row.get("difficult"))))
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{index_path}:{line_no}: malformed row ({err})") from None
    return DatasetIndex(meta, records)


def build_manifest(index: DatasetIndex) -> dict:
    """Counts per split and per class, and an md5 per split over its sorted (path, label, md5)."""
    manifest: dict = {"num_classes": index.meta.num_classes, "splits": {}}
    for split in SPLITS:
        records = sorted(index.split(split), key=lambda r: r.path)
        per_class = Counter(c for r in records for c in r.classes_present())
        digest = hashlib.md5()
        for r in records:
            extra = f"\t{_ints(r.positives)}\t{_ints(r.difficult)}" if r.label < 0 else ""
            digest.update(f"{r.path}\t{r.label}\t{r.md5}{extra}\n".encode())
        manifest["splits"][split] = {
            "count": len(records),
            "per_class": {index.meta.classes[c]: per_class.get(c, 0) for c in range(index.meta.num_classes)},
            "md5": digest.hexdigest(),
        }
    manifest["total"] = len(index.records)
    skipped = index.meta.extra.get("skipped", [])
    manifest["skipped_count"] = len(skipped)
    manifest["skipped"] = skipped
    return manifest
