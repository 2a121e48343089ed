"""Bad data inputs stop with a message naming the file (and line), the value and what is allowed,
before any work, and ``prepare`` leaves nothing half-written behind."""
from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdlib.data.index import DatasetIndex, DatasetMeta, Record, read_index, validate_index, write_index
from kdlib.data.prepare import prepare_dataset
from kdlib.data.spec import DatasetSpec
from tests.test_layout_cifar_voc_coco import make_cifar10, make_voc
from tests.test_safe_readers import BILLION_LAUGHS, _System, _touch_command

HEADER = "path,label,split,md5,positives,difficult"


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def _single_label(tmp_path: Path) -> Path:
    """A valid prepared directory: 2 classes, one image of each in every split."""
    records = [Record(f"{split}/{c}/1.png", label, split, _md5(f"{split}{c}"))
               for split in ("train", "val", "test") for label, c in enumerate("ab")]
    write_index(DatasetIndex(DatasetMeta("toy", str(tmp_path), ["a", "b"], 1, 4, [0.5], [0.25]), records), tmp_path)
    return tmp_path / "index.csv"


def _multi_label(tmp_path: Path) -> Path:
    records = [Record(f"{split}/{i}.jpg", -1, split, _md5(f"{split}{i}"), (0, 1, 2), (2,) if i else ())
               for split in ("train", "val", "test") for i in range(2)]
    meta = DatasetMeta("voc", str(tmp_path), ["x", "y", "z"], 3, 8, [0.5] * 3, [0.25] * 3, task="multilabel")
    write_index(DatasetIndex(meta, records), tmp_path)
    return tmp_path / "index.csv"


def _edit_line(index_csv: Path, line_no: int, old: str, new: str) -> None:
    """Replace ``old`` by ``new`` once in 1-based line ``line_no`` of ``index_csv``."""
    lines = index_csv.read_text().splitlines()
    assert old in lines[line_no - 1], (old, lines[line_no - 1])
    lines[line_no - 1] = lines[line_no - 1].replace(old, new, 1)
    index_csv.write_text("\n".join(lines) + "\n")


def _error(directory: Path) -> str:
    with pytest.raises(ValueError) as info:
        read_index(directory)
    return str(info.value)


def test_valid_fixtures_read_back(tmp_path: Path) -> None:
    """The untouched fixtures pass, so each case below fails for its one edit."""
    assert len(read_index(_single_label(tmp_path / "s").parent).records) == 6
    assert read_index(_multi_label(tmp_path / "m").parent).records[1].difficult == (2,)


# ---------------------------------------------------------------- index.csv rows
@pytest.mark.parametrize(("line", "old", "new", "expected"), [
    (3, ",1,train,", ",2,train,", "index.csv:3: label 2: expected a class index in 0..1 (2 classes)"),
    (2, ",0,train,", ",-1,train,", "index.csv:2: label -1: expected a class index in 0..1 (2 classes)"),
    (4, ",0,val,", ",zero,val,", "index.csv:4: label 'zero': expected an integer"),
    (6, ",test,", ",holdout,", "index.csv:6: split 'holdout': expected one of train, val, test"),
    (7, "test/b/1.png", "../test/b/1.png", "index.csv:7: path '../test/b/1.png': expected a non-empty path "
                                           "relative to the data set's root, '/'-separated, without '..'"),
    (2, "train/a/1.png", "/etc/passwd", "index.csv:2: path '/etc/passwd': expected a non-empty path relative"),
    (3, ",train,", ",train,nothex", "index.csv:3: md5 'nothex"),
    (3, ",,", ",3,", "index.csv:3: positives '3': class 3 is outside 0..1 (2 classes)"),
], ids=["label_too_big", "label_negative", "label_not_int", "unknown_split", "dotdot_path", "absolute_path",
        "bad_md5", "positives_in_single_label"])
def test_bad_single_label_row_names_file_line_value(tmp_path: Path, line, old, new, expected) -> None:
    index_csv = _single_label(tmp_path)
    _edit_line(index_csv, line, old, new)
    message = _error(tmp_path)
    assert str(tmp_path) in message and expected in message


@pytest.mark.parametrize(("line", "old", "new", "expected"), [
    (2, ",0 1 2,", ",0 1 3,", "index.csv:2: positives '0 1 3': class 3 is outside 0..2 (3 classes)"),
    (3, ",0 1 2,2", ",0 1 2,7", "index.csv:3: difficult '7': class 7 is outside 0..2 (3 classes)"),
    (3, ",0 1 2,2", ",0 1,2", "index.csv:3: difficult classes [2] are not in positives (0, 1): expected a subset"),
    (2, ",-1,train,", ",0,train,", "index.csv:2: label 0: expected -1 in a multi-label index"),
], ids=["positive_out_of_range", "difficult_out_of_range", "difficult_not_positive", "multilabel_with_label"])
def test_bad_multi_label_row_names_file_line_value(tmp_path: Path, line, old, new, expected) -> None:
    _edit_line(_multi_label(tmp_path), line, old, new)
    assert expected in _error(tmp_path)


def test_missing_column_names_the_header_and_the_expected_one(tmp_path: Path) -> None:
    index_csv = _single_label(tmp_path)
    _edit_line(index_csv, 1, "split", "fold")
    message = _error(tmp_path)
    assert f"{index_csv}:1: header 'path,label,fold,md5,positives,difficult' lacks column(s) split" in message
    assert f"expected {HEADER}" in message and "dvc repro --force prepare" in message


def test_short_row_is_malformed(tmp_path: Path) -> None:
    index_csv = _single_label(tmp_path)
    lines = index_csv.read_text().splitlines()
    lines[2] = "train/b/1.png,1"
    index_csv.write_text("\n".join(lines) + "\n")
    assert f"{index_csv}:3: malformed row: 6 columns expected ({HEADER})" in _error(tmp_path)


def test_path_listed_twice_names_both_lines(tmp_path: Path) -> None:
    index_csv = _single_label(tmp_path)
    _edit_line(index_csv, 3, "train/b/1.png", "train/a/1.png")
    assert f"{index_csv}:3: path 'train/a/1.png' is already listed at line 2" in _error(tmp_path)


def test_duplicate_content_in_two_splits_names_both_paths(tmp_path: Path) -> None:
    index_csv = _single_label(tmp_path)
    lines = index_csv.read_text().splitlines()
    md5_of_train_a = lines[1].split(",")[3]
    _edit_line(index_csv, 6, lines[6 - 1].split(",")[3], md5_of_train_a)  # test/a/1.png: same bytes as train/a/1.png
    message = _error(tmp_path)
    assert message.startswith(f"{index_csv}: train/a/1.png (train) and test/a/1.png (test) have the same content "
                              f"(md5 {md5_of_train_a})")
    assert "remove one of the two files" in message


def test_validate_index_duplicate_names_both_paths() -> None:
    records = [Record("train/a.png", 0, "train", "m1"), Record("val/a.png", 0, "val", "m2"),
               Record("test/copy_of_a.png", 0, "test", "m1"), Record("train/b.png", 1, "train", "m3")]
    meta = DatasetMeta("toy", ".", ["a", "b"], 1, 4, [0.5], [0.25])
    with pytest.raises(ValueError, match=re.escape("train/a.png (train) and test/copy_of_a.png (test) have the "
                                                   "same content (md5 m1)")):
        validate_index(DatasetIndex(meta, records))
    # the same bytes twice inside one split leak nothing and are allowed
    validate_index(DatasetIndex(meta, records[:2] + [Record("train/b.png", 0, "train", "m1"),
                                                     Record("test/c.png", 0, "test", "m3"),
                                                     Record("train/d.png", 1, "train", "m4")]))


@pytest.mark.parametrize(("text", "expected"), [
    ("{not json", "not valid JSON"),
    ('{"name": "toy"}', "missing keys ['root', 'classes', 'channels', 'image_size', 'mean', 'std']"),
], ids=["meta_not_json", "meta_missing_keys"])
def test_bad_dataset_json_names_the_file_and_how_to_rebuild(tmp_path: Path, text: str, expected: str) -> None:
    _single_label(tmp_path)
    (tmp_path / "dataset.json").write_text(text)
    message = _error(tmp_path)
    assert f"{tmp_path / 'dataset.json'}:" in message and expected in message and "dvc repro --force prepare" in message


# ---------------------------------------------------------------- prepare leaves nothing half-written
def _spec(layout: str, root: Path, image_size: int = 8) -> DatasetSpec:
    return DatasetSpec(layout=layout, root=str(root), image_size=image_size, channels=3,
                       mean=[0.5] * 3, std=[0.25] * 3, augment="none")


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    assert not list(out.parent.glob(out.name + "*"))


def test_prepare_duplicate_image_across_splits_names_both_paths(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / c / "1.png")
    (root / "test" / "dog" / "2.png").write_bytes((root / "train" / "cat" / "1.png").read_bytes())
    out = tmp_path / "prepared" / "folder"
    with pytest.raises(ValueError) as info:
        prepare_dataset(_spec("imagefolder", root), "folder", out, split_seed=0)
    message = str(info.value)
    assert "train/cat/1.png (train) and test/dog/2.png (test) have the same content" in message
    _assert_nothing_written(out)


def test_prepare_crafted_cifar_runs_nothing_and_writes_nothing(tmp_path: Path) -> None:
    make_cifar10(tmp_path / "src")
    marker = tmp_path / "pwned"
    meta_file = tmp_path / "src" / "cifar-10-batches-py" / "batches.meta"
    meta_file.write_bytes(pickle.dumps({b"label_names": _System(_touch_command(marker))}, protocol=2))
    out = tmp_path / "prepared" / "cifar10"
    with pytest.raises(ValueError, match=re.escape(f"{meta_file}: refuses to load")):
        prepare_dataset(_spec("cifar10", tmp_path / "src", 32), "cifar10", out, split_seed=0)
    assert not marker.exists()
    _assert_nothing_written(out)


def test_prepare_billion_laughs_voc_writes_nothing(tmp_path: Path) -> None:
    voc = make_voc(tmp_path / "src")
    bad = voc / "Annotations" / "000003.xml"
    bad.write_text(BILLION_LAUGHS)
    out = tmp_path / "prepared" / "voc2007"
    with pytest.raises(ValueError, match=re.escape(f"{bad}: refuses a <!DOCTYPE> declaration")):
        prepare_dataset(_spec("voc2007", tmp_path / "src", 32), "voc2007", out, split_seed=0)
    _assert_nothing_written(out)
