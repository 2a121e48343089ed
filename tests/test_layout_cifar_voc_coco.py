"""Layouts cifar10 / cifar100 / voc2007 / coco2014 on small copies of the real formats."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdlib.data.layouts import LAYOUTS, LayoutScan, ScannedImage
from kdlib.data.layouts.cifar import scan_cifar10, scan_cifar100
from kdlib.data.layouts.coco2014 import scan_coco2014
from kdlib.data.layouts.voc2007 import VOC_CLASSES, scan_voc2007

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_NAMES = [f"fine{i:02d}" for i in range(100)]


def test_layouts_registered() -> None:
    assert LAYOUTS.get("cifar10") is scan_cifar10
    assert LAYOUTS.get("cifar100") is scan_cifar100
    assert LAYOUTS.get("voc2007") is scan_voc2007
    assert LAYOUTS.get("coco2014") is scan_coco2014


# ---------------------------------------------------------------- CIFAR


def _dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def _batch(
    rng: np.random.Generator, labels: list[int], labels_key: bytes, name: str, extra: dict | None = None
) -> dict:
    n = len(labels)
    return {
        b"batch_label": name.encode(),
        labels_key: list(labels),
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{name}_{i}.png".encode() for i in range(n)],
        **(extra or {}),
    }


CIFAR10_TRAIN_LABELS = {f"data_batch_{i}": [(i + k) % 10 for k in range(2)] for i in range(1, 6)}
CIFAR10_TEST_LABELS = [9, 0, 3]


def make_cifar10(parent: Path) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    folder = parent / "cifar-10-batches-py"
    batches = {name: _batch(rng, labels, b"labels", name) for name, labels in CIFAR10_TRAIN_LABELS.items()}
    batches["test_batch"] = _batch(rng, CIFAR10_TEST_LABELS, b"labels", "test_batch")
    for name, obj in batches.items():
        _dump(folder / name, obj)
    _dump(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072})
    return batches


def make_cifar100(parent: Path) -> dict[str, dict]:
    rng = np.random.default_rng(1)
    folder = parent / "cifar-100-python"
    batches = {
        # coarse labels differ from the fine ones, so reading the wrong key shows.
        "train": _batch(rng, [99, 0, 42, 7], b"fine_labels", "train", {b"coarse_labels": [1, 2, 3, 4]}),
        "test": _batch(rng, [5, 5], b"fine_labels", "test", {b"coarse_labels": [0, 0]}),
    }
    for name, obj in batches.items():
        _dump(folder / name, obj)
    _dump(
        folder / "meta",
        {
            b"fine_label_names": [n.encode() for n in CIFAR100_NAMES],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        },
    )
    return batches


@pytest.mark.parametrize("spelling", ["parent", "folder", "folder_str_slash"])
def test_cifar10_scan(tmp_path: Path, spelling: str) -> None:
    make_cifar10(tmp_path / "raw")
    root: Path | str = {
        "parent": tmp_path / "raw",
        "folder": tmp_path / "raw" / "cifar-10-batches-py",
        "folder_str_slash": str(tmp_path / "raw" / "cifar-10-batches-py") + "/",
    }[spelling]
    staging = tmp_path / "staging"
    scan = scan_cifar10(root, staging=staging)
    assert isinstance(scan, LayoutScan)
    assert scan.root == staging / "images"
    assert scan.classes == CIFAR10_NAMES
    assert scan.task == "multiclass"
    expected = [
        ScannedImage(f"train/{CIFAR10_NAMES[label]}/{name}-{i:05d}.png", label, "train")
        for name, labels in CIFAR10_TRAIN_LABELS.items()
        for i, label in enumerate(labels)
    ] + [
        ScannedImage(f"test/{CIFAR10_NAMES[label]}/test_batch-{i:05d}.png", label, "test")
        for i, label in enumerate(CIFAR10_TEST_LABELS)
    ]
    assert scan.images == expected
    for image in scan.images:
        assert (scan.root / image.path).is_file()
    assert sorted(p.relative_to(scan.root).as_posix() for p in scan.root.rglob("*.png")) == sorted(
        i.path for i in expected
    )


def test_cifar10_png_pixels_round_trip(tmp_path: Path) -> None:
    batches = make_cifar10(tmp_path)
    scan = scan_cifar10(tmp_path, staging=tmp_path / "staging")
    for batch_name, row, image in [("test_batch", 2, scan.images[-1]), ("data_batch_4", 1, scan.images[7])]:
        assert image.path.endswith(f"{batch_name}-{row:05d}.png")
        with Image.open(scan.root / image.path) as png:
            assert png.format == "PNG" and png.mode == "RGB" and png.size == (32, 32)
            decoded = np.asarray(png)
        planes = batches[batch_name][b"data"][row].reshape(3, 32, 32)
        np.testing.assert_array_equal(decoded.transpose(2, 0, 1), planes)
        # the red plane is the first 1024 values, row-major
        np.testing.assert_array_equal(decoded[0, :, 0], batches[batch_name][b"data"][row][:32])


def test_cifar100_scan_uses_fine_labels(tmp_path: Path) -> None:
    batches = make_cifar100(tmp_path)
    scan = scan_cifar100(tmp_path, staging=tmp_path / "st")
    assert scan.classes == CIFAR100_NAMES
    assert [(i.path, i.label, i.split) for i in scan.images] == [
        ("train/fine99/train-00000.png", 99, "train"),
        ("train/fine00/train-00001.png", 0, "train"),
        ("train/fine42/train-00002.png", 42, "train"),
        ("train/fine07/train-00003.png", 7, "train"),
        ("test/fine05/test-00000.png", 5, "test"),
        ("test/fine05/test-00001.png", 5, "test"),
    ]
    with Image.open(scan.root / "train/fine42/train-00002.png") as png:
        decoded = np.asarray(png.convert("RGB"))
    np.testing.assert_array_equal(decoded.transpose(2, 0, 1), batches["train"][b"data"][2].reshape(3, 32, 32))
    # the folder itself is a valid root as well
    again = scan_cifar100(tmp_path / "cifar-100-python", staging=tmp_path / "st2")
    assert [i.path for i in again.images] == [i.path for i in scan.images]


def test_cifar_limits(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    scan = scan_cifar10(tmp_path, staging=tmp_path / "st", train_limit=3, test_limit=0)
    assert [i.path.rsplit("/", 1)[1] for i in scan.images] == [
        "data_batch_1-00000.png", "data_batch_1-00001.png", "data_batch_2-00000.png",
    ]
    assert {i.split for i in scan.images} == {"train"}
    assert not (scan.root / "test").exists()
    big = scan_cifar10(tmp_path, staging=tmp_path / "st2", train_limit=1000, test_limit=1)
    assert sum(i.split == "train" for i in big.images) == 10
    assert [i.path for i in big.images if i.split == "test"] == ["test/truck/test_batch-00000.png"]
    make_cifar100(tmp_path)
    small = scan_cifar100(tmp_path, staging=tmp_path / "st3", train_limit=2, test_limit=None)
    assert [i.label for i in small.images] == [99, 0, 5, 5]
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="train_limit"):
            scan_cifar10(tmp_path, staging=tmp_path / "st4", train_limit=bad)


def test_cifar_requires_staging(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    make_cifar100(tmp_path)
    with pytest.raises(ValueError, match="staging"):
        scan_cifar10(tmp_path)
    with pytest.raises(ValueError, match="staging"):
        scan_cifar100(tmp_path, staging=None)


def _corrupt(path: Path, changes: dict) -> None:
    with path.open("rb") as f:
        obj = pickle.load(f, encoding="bytes")
    obj.update(changes)
    _dump(path, obj)


def test_cifar_size_checks_name_the_batch(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    staging = tmp_path / "st"

    _corrupt(folder / "data_batch_3", {b"data": np.zeros((2, 3071), dtype=np.uint8)})
    with pytest.raises(ValueError, match=r"data_batch_3.*3072"):
        scan_cifar10(tmp_path, staging=staging)

    make_cifar10(tmp_path)
    _corrupt(folder / "data_batch_5", {b"labels": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"data_batch_5.*3 labels.*2 data rows"):
        scan_cifar10(tmp_path, staging=staging)

    make_cifar10(tmp_path)
    _corrupt(folder / "test_batch", {b"labels": [0, 10, 1]})
    with pytest.raises(ValueError, match=r"test_batch.*label 10 of row 1.*0\.\.9"):
        scan_cifar10(tmp_path, staging=staging)

    make_cifar100(tmp_path)
    _corrupt(tmp_path / "cifar-100-python" / "train", {b"fine_labels": [0, 100, 1, 2]})
    with pytest.raises(ValueError, match=r"train.*label 100.*0\.\.99"):
        scan_cifar100(tmp_path, staging=staging)

    make_cifar100(tmp_path)
    _corrupt(tmp_path / "cifar-100-python" / "meta", {b"fine_label_names": [b"a", b"b"]})
    with pytest.raises(ValueError, match=r"meta.*2 classes"):
        scan_cifar100(tmp_path, staging=staging)

    make_cifar10(tmp_path)
    (folder / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_2"):
        scan_cifar10(tmp_path, staging=staging)

    make_cifar10(tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        scan_cifar10(tmp_path, staging=staging, train_limit=1)
    with pytest.raises(FileNotFoundError):
        scan_cifar10(tmp_path / "nowhere", staging=staging)


# ---------------------------------------------------------------- VOC 2007


def _obj(name: str, difficult: str | None) -> str:
    tag = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    return f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>{tag}<bndbox><xmin>1</xmin></bndbox></object>"


VOC_ANNOTATIONS = {
    # dog: one plain + one difficult -> positive, not difficult; person: only difficult.
    "000001": [("dog", "0"), ("dog", "1"), ("person", "1")],
    # cat twice difficult -> difficult; chair without a <difficult> tag -> plain.
    "000002": [("cat", "1"), ("cat", "1"), ("chair", None)],
    "000003": [],
    "000004": [("tvmonitor", " 0 "), ("aeroplane", "0"), ("aeroplane", "0")],
}


def make_voc(base: Path, trainval: str = "000001\n000002\n", test: str = "000003\n000004\n") -> Path:
    voc = base / "VOCdevkit" / "VOC2007"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "Annotations").mkdir()
    (voc / "JPEGImages").mkdir()
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text(trainval)
    (voc / "ImageSets" / "Main" / "test.txt").write_text(test)
    for image_id, objects in VOC_ANNOTATIONS.items():
        body = "".join(_obj(n, d) for n, d in objects)
        (voc / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>"
            f"<size><width>10</width><height>10</height><depth>3</depth></size>{body}</annotation>\n"
        )
    return voc


def _c(*names: str) -> tuple[int, ...]:
    return tuple(sorted(VOC_CLASSES.index(n) for n in names))


@pytest.mark.parametrize("spelling", ["parent", "devkit", "voc2007", "str_slash"])
def test_voc2007_scan(tmp_path: Path, spelling: str) -> None:
    voc = make_voc(tmp_path)
    root: Path | str = {
        "parent": tmp_path,
        "devkit": tmp_path / "VOCdevkit",
        "voc2007": voc,
        "str_slash": str(tmp_path / "VOCdevkit") + "/",
    }[spelling]
    scan = scan_voc2007(root)
    assert scan.root == voc
    assert scan.task == "multilabel"
    assert scan.classes == list(VOC_CLASSES) and len(scan.classes) == 20
    assert scan.classes[0] == "aeroplane" and scan.classes[10] == "diningtable" and scan.classes[19] == "tvmonitor"
    assert scan.images == [
        ScannedImage("JPEGImages/000001.jpg", -1, "train", _c("dog", "person"), _c("person")),
        ScannedImage("JPEGImages/000002.jpg", -1, "train", _c("cat", "chair"), _c("cat")),
        ScannedImage("JPEGImages/000003.jpg", -1, "test", (), ()),
        ScannedImage("JPEGImages/000004.jpg", -1, "test", (0, 19), ()),
    ]


def test_voc2007_keeps_list_order_and_skips_blank_lines(tmp_path: Path) -> None:
    make_voc(tmp_path, trainval="000002\n\n000001\n", test="000004\n")
    scan = scan_voc2007(tmp_path)
    assert [(i.path, i.split) for i in scan.images] == [
        ("JPEGImages/000002.jpg", "train"),
        ("JPEGImages/000001.jpg", "train"),
        ("JPEGImages/000004.jpg", "test"),
    ]


def test_voc2007_errors_name_the_file(tmp_path: Path) -> None:
    voc = make_voc(tmp_path)
    annotations = voc / "Annotations"

    (annotations / "000002.xml").write_text(
        "<annotation>" + _obj("chair", "0") + _obj("dinosaur", "0") + "</annotation>"
    )
    with pytest.raises(ValueError, match=r"000002\.xml.*unknown class 'dinosaur'"):
        scan_voc2007(tmp_path)

    (annotations / "000002.xml").write_text("<annotation><object><name>cat</name></annotation>")
    with pytest.raises(ValueError, match=r"000002\.xml: malformed XML"):
        scan_voc2007(tmp_path)

    (annotations / "000002.xml").write_text("<annotation>" + _obj("cat", "2") + "</annotation>")
    with pytest.raises(ValueError, match=r"000002\.xml.*difficult.*'2'"):
        scan_voc2007(tmp_path)

    (annotations / "000002.xml").unlink()
    with pytest.raises(FileNotFoundError, match=r"000002\.xml"):
        scan_voc2007(tmp_path)


def test_voc2007_bad_lists(tmp_path: Path) -> None:
    make_voc(tmp_path / "a", trainval="000001\n000002 1\n")
    with pytest.raises(ValueError, match=r"trainval\.txt:2: expected one image id"):
        scan_voc2007(tmp_path / "a")
    make_voc(tmp_path / "b", test="000003\n000001\n")
    with pytest.raises(ValueError, match=r"test\.txt:2: image id '000001' already listed at .*trainval\.txt:1"):
        scan_voc2007(tmp_path / "b")
    voc = make_voc(tmp_path / "c")
    (voc / "ImageSets" / "Main" / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"test\.txt"):
        scan_voc2007(tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="VOC2007"):
        scan_voc2007(tmp_path / "empty")


# ---------------------------------------------------------------- COCO 2014


COCO_CATEGORIES = [
    {"supercategory": "indoor", "id": 90, "name": "toothbrush"},
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "vehicle", "id": 3, "name": "car"},
]


def _coco_json(images: list[tuple[int, str]], anns: list[tuple[int, int]]) -> dict:
    return {
        "info": {"year": 2014},
        "licenses": [],
        "images": [{"id": i, "file_name": f, "width": 10, "height": 10} for i, f in images],
        "annotations": [
            {"id": 1000 + k, "image_id": img, "category_id": cat, "iscrowd": 0, "bbox": [0, 0, 1, 1]}
            for k, (img, cat) in enumerate(anns)
        ],
        "categories": COCO_CATEGORIES,
    }


def make_coco(root: Path, train: dict | None = None, val: dict | None = None) -> Path:
    (root / "annotations").mkdir(parents=True)
    train = train or _coco_json(
        [(9, "COCO_train2014_000000000009.jpg"), (25, "COCO_train2014_000000000025.jpg"),
         (4, "COCO_train2014_000000000004.jpg")],
        # image 25 has no annotation; image 9: person twice + car; image 4: toothbrush
        [(9, 1), (4, 90), (9, 3), (9, 1)],
    )
    val = val or _coco_json([(42, "COCO_val2014_000000000042.jpg")], [(42, 3), (42, 90)])
    (root / "annotations" / "instances_train2014.json").write_text(json.dumps(train))
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(val))
    return root


def test_coco2014_scan(tmp_path: Path) -> None:
    make_coco(tmp_path)
    for root in (tmp_path, str(tmp_path) + "/"):
        scan = scan_coco2014(root)
        assert scan.root == tmp_path
        assert scan.task == "multilabel"
        # sorted by category id 1, 3, 90
        assert scan.classes == ["person", "car", "toothbrush"]
        assert scan.images == [
            ScannedImage("train2014/COCO_train2014_000000000009.jpg", -1, "train", (0, 1)),
            ScannedImage("train2014/COCO_train2014_000000000004.jpg", -1, "train", (2,)),
            ScannedImage("val2014/COCO_val2014_000000000042.jpg", -1, "test", (1, 2)),
        ]
        assert all(i.difficult == () for i in scan.images)


def test_coco2014_bad_ids(tmp_path: Path) -> None:
    make_coco(tmp_path / "a", val=_coco_json([(42, "x.jpg")], [(42, 3), (42, 5)]))
    with pytest.raises(ValueError, match=r"instances_val2014\.json.*category_id 5"):
        scan_coco2014(tmp_path / "a")
    make_coco(tmp_path / "b", train=_coco_json([(9, "x.jpg")], [(9, 1), (99, 3)]))
    with pytest.raises(ValueError, match=r"instances_train2014\.json.*image_id 99"):
        scan_coco2014(tmp_path / "b")
    make_coco(tmp_path / "c", train=_coco_json([(9, "x.jpg"), (9, "y.jpg")], [(9, 1)]))
    with pytest.raises(ValueError, match=r"instances_train2014\.json: image id 9 is listed twice"):
        scan_coco2014(tmp_path / "c")


def test_coco2014_file_errors(tmp_path: Path) -> None:
    make_coco(tmp_path / "a")
    (tmp_path / "a" / "annotations" / "instances_val2014.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"instances_val2014\.json"):
        scan_coco2014(tmp_path / "a")
    make_coco(tmp_path / "b")
    (tmp_path / "b" / "annotations" / "instances_train2014.json").write_text("{\"images\": [")
    with pytest.raises(ValueError, match=r"instances_train2014\.json: not valid JSON"):
        scan_coco2014(tmp_path / "b")
    other = _coco_json([(42, "x.jpg")], [(42, 3)])
    other["categories"] = COCO_CATEGORIES[:2]
    make_coco(tmp_path / "c", val=other)
    with pytest.raises(ValueError, match=r"instances_val2014\.json: its categories differ"):
        scan_coco2014(tmp_path / "c")
    with pytest.raises(FileNotFoundError):
        scan_coco2014(tmp_path / "missing")
