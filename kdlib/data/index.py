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
import dataclasses
import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kdlib.data.splits import assert_disjoint

SPLITS = ("train", "val", "test")
TASKS = ("multiclass", "multilabel")
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


def _content_disjoint(records: list[Record]) -> None:
    """Raise ``ValueError`` naming both paths, their splits and the md5 when two records of
    different splits have the same bytes (one image in two splits leaks it into evaluation).
    The same content twice within one split is allowed: it leaks nothing."""
    first: dict[str, Record] = {}
    for r in records:
        if not r.md5:
            continue
        seen = first.setdefault(r.md5, r)
        if seen.split != r.split:
            raise ValueError(
                f"{seen.path} ({seen.split}) and {r.path} ({r.split}) have the same content (md5 {r.md5}): "
                "an image in two splits leaks it into evaluation; remove one of the two files from the data set"
            )


def validate_index(index: DatasetIndex) -> None:
    """Check labels, split names, that train/val/test are non-empty and disjoint (by path and
    by content: a duplicate names both files), that a single-label data set has two classes or
    more (a softmax over one class is always right: it "trains" to 100 %), and that every class
    has a training image."""
    num_classes = index.meta.num_classes
    multilabel = index.meta.task == "multilabel"
    if num_classes < (1 if multilabel else 2):
        raise ValueError(f"data set {index.meta.name!r} ({index.meta.root}): {num_classes} class(es) "
                         f"({', '.join(index.meta.classes) or 'none'}); expected at least "
                         f"{'one label' if multilabel else 'two classes: a single-label classifier of one class is right whatever it sees'}")
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
    _content_disjoint(index.records)
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


_MD5 = re.compile(r"[0-9a-f]{32}")
REQUIRED_COLUMNS = ("path", "label", "split")
OPTIONAL_COLUMNS = ("md5", "positives", "difficult")
REBUILD = "rebuild it with `dvc repro --force prepare` (or `python -m stages.prepare`)"


def _parse_ints(text: str | None) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split()) if text else ()


def _read_meta(meta_path: Path) -> DatasetMeta:
    """``dataset.json`` as a :class:`DatasetMeta`; errors name the file, the key and what is allowed."""
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise ValueError(f"{meta_path}: not valid JSON ({err}); {REBUILD}") from None
    fields_ = {f.name: f for f in dataclasses.fields(DatasetMeta)}
    if not isinstance(raw, dict):
        raise ValueError(f"{meta_path}: expected a JSON object with keys {', '.join(fields_)}; {REBUILD}")
    unknown = [k for k in raw if k not in fields_]
    missing = [k for k, f in fields_.items() if k not in raw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
    if unknown or missing:
        raise ValueError(f"{meta_path}: unknown keys {unknown}, missing keys {missing}; expected the keys "
                         f"{', '.join(fields_)}; {REBUILD}")
    meta = DatasetMeta(**raw)
    classes = meta.classes
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes)):
        raise ValueError(f"{meta_path}: classes = {classes!r}: expected a non-empty list of names; {REBUILD}")
    if meta.task not in TASKS:
        raise ValueError(f"{meta_path}: task = {meta.task!r}: expected one of {', '.join(TASKS)}; {REBUILD}")
    return meta


def _is_relative_path(path: str) -> bool:
    """A path inside the data set's root: non-empty, relative, no ``..`` part, ``/``-separated."""
    # string tests, not PurePath: read_index checks every row (120,000 for COCO) at each stage start
    return (bool(path) and not path.startswith("/") and "\\" not in path and path[1:2] != ":"
            and ".." not in path.split("/"))


def _record(row: dict[str, str | None], meta: DatasetMeta, where: str) -> Record:
    """One ``index.csv`` row, checked; errors start with ``where`` (``file:line``)."""
    n, multilabel = meta.num_classes, meta.task == "multilabel"
    path, split, md5 = row["path"] or "", row["split"] or "", row.get("md5") or ""
    if not _is_relative_path(path):
        raise ValueError(f"{where}: path {path!r}: expected a non-empty path relative to the data set's root, "
                         "'/'-separated, without '..'")
    if split not in SPLITS:
        raise ValueError(f"{where}: split {split!r}: expected one of {', '.join(SPLITS)}")
    if md5 and not _MD5.fullmatch(md5):
        raise ValueError(f"{where}: md5 {md5!r}: expected 32 lowercase hexadecimal digits or nothing")
    text = (row["label"] or "").strip()
    try:
        label = int(text)
    except ValueError:
        raise ValueError(f"{where}: label {text!r}: expected an integer") from None
    lists: dict[str, tuple[int, ...]] = {}
    for column in ("positives", "difficult"):
        cell = row.get(column) or ""
        try:
            lists[column] = _parse_ints(cell)
        except ValueError:
            raise ValueError(f"{where}: {column} {cell!r}: expected class indices separated by spaces") from None
        bad = [c for c in lists[column] if not 0 <= c < n]
        if bad:
            raise ValueError(f"{where}: {column} {cell!r}: class {bad[0]} is outside 0..{n - 1} ({n} classes)")
    if multilabel:
        if label != -1:
            raise ValueError(f"{where}: label {label}: expected -1 in a multi-label index (classes are in positives)")
        stray = sorted(set(lists["difficult"]) - set(lists["positives"]))
        if stray:
            raise ValueError(f"{where}: difficult classes {stray} are not in positives "
                             f"{lists['positives']}: expected a subset of positives")
    else:
        if not 0 <= label < n:
            raise ValueError(f"{where}: label {label}: expected a class index in 0..{n - 1} ({n} classes)")
        if lists["positives"] or lists["difficult"]:
            raise ValueError(f"{where}: positives/difficult given in a single-label index: expected them empty")
    return Record(path, label, split, md5, lists["positives"], lists["difficult"])


def read_index(directory: Path) -> DatasetIndex:
    """The prepared index in ``directory``, checked before anything uses it.

    Every row of ``index.csv`` is checked (errors name ``index.csv:<line>``, the value and what
    is allowed): required columns ``path``, ``label``, ``split``; ``path`` relative without
    ``..``; ``split`` one of train/val/test; ``label`` a class index in ``[0, num_classes)``
    (``-1`` for multi-label, whose ``positives`` / ``difficult`` lie in that range and
    ``difficult`` ⊆ ``positives``); ``md5`` empty or 32 hex digits; no path listed twice. Then
    :func:`validate_index` (non-empty, disjoint splits; every class trained), its errors
    prefixed with the file. ``dataset.json`` must hold exactly :class:`DatasetMeta`'s keys.
    """
    directory = Path(directory)
    meta_path, index_path = directory / META_FILE, directory / INDEX_FILE
    for path in (meta_path, index_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the prepare stage first")
    meta = _read_meta(meta_path)
    records: list[Record] = []
    listed_at: dict[str, int] = {}
    with open(index_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{index_path}:1: header {','.join(header)!r} lacks column(s) {', '.join(missing)}: "
                             f"expected {','.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}; {REBUILD}")
        try:
            for row in reader:
                where = f"{index_path}:{reader.line_num}"
                if None in row or any(row[c] is None for c in REQUIRED_COLUMNS):  # too many / too few cells
                    raise ValueError(f"{where}: malformed row: {len(header)} columns expected ({','.join(header)})")
                record = _record(row, meta, where)
                if record.path in listed_at:
                    raise ValueError(f"{where}: path {record.path!r} is already listed at line "
                                     f"{listed_at[record.path]}: expected each image once")
                listed_at[record.path] = reader.line_num
                records.append(record)
        except csv.Error as err:
            raise ValueError(f"{index_path}:{reader.line_num}: malformed row ({err})") from None
    index = DatasetIndex(meta, records)
    try:
        validate_index(index)
    except ValueError as err:
        raise ValueError(f"{index_path}: {err}; {REBUILD}") from None
    return index


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
