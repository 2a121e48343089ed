"""Layouts ``foodx251``, ``intel_scenes`` and ``oxford_pets`` on tiny fixtures built in tmp_path:
real JPEG/PNG files written with PIL and real CSV/TXT annotation files in the distributed formats."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from kdlib.data.layouts import LAYOUTS, LayoutScan


def write_image(path: Path, color: tuple[int, int, int] = (10, 200, 30), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new(mode, (4, 3), color if mode == "RGB" else color[0]).save(path, format=fmt)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def assert_files_exist(scan: LayoutScan) -> None:
    for image in scan.images:
        assert "\\" not in image.path and not image.path.startswith("/")
        assert (scan.root / image.path).is_file(), image.path
        with Image.open(scan.root / image.path) as im:
            im.verify()


# ---- foodx251 ---------------------------------------------------------------------------------
FOOD_CLASSES = ["macaron", "beignet", "cruller"]
FOOD_TRAIN = [("train_000003.jpg", 2), ("train_000001.jpg", 0), ("train_000002.jpg", 1),
              ("train_000004.jpg", 0)]
FOOD_VAL = [("val_000002.jpg", 1), ("val_000001.jpg", 2)]


def make_food(root: Path) -> Path:
    write_text(root / "annot" / "class_list.txt",
               "".join(f"{i} {name}\n" for i, name in enumerate(FOOD_CLASSES)))
    write_text(root / "annot" / "train_info.csv", "".join(f"{n},{y}\n" for n, y in FOOD_TRAIN))
    write_text(root / "annot" / "val_info.csv", "".join(f"{n},{y}\n" for n, y in FOOD_VAL))
    for name, _ in FOOD_TRAIN:
        write_image(root / "train_set" / name)
    for name, _ in FOOD_VAL:
        write_image(root / "val_set" / name, mode="L")  # grayscale: converted to RGB at load time
    return root


def test_foodx251_reads_csv_in_order(tmp_path: Path) -> None:
    root = make_food(tmp_path / "food")
    scan = LAYOUTS.get("foodx251")(root)
    assert scan.root == root
    assert scan.classes == FOOD_CLASSES
    assert scan.task == "multiclass"
    assert [(i.path, i.label, i.split) for i in scan.images] == (
        [(f"train_set/{n}", y, "train") for n, y in FOOD_TRAIN]
        + [(f"val_set/{n}", y, "test") for n, y in FOOD_VAL]
    )
    assert Counter(i.split for i in scan.images) == {"train": 4, "test": 2}
    assert_files_exist(scan)


def test_foodx251_root_spellings_and_class_list_order(tmp_path: Path) -> None:
    root = make_food(tmp_path / "food")
    # class_list.txt lines out of id order: names still follow ids.
    write_text(root / "annot" / "class_list.txt", "2 cruller\n0 macaron\n\n1 beignet\n")
    by_path = LAYOUTS.get("foodx251")(root)
    by_str = LAYOUTS.get("foodx251")(str(root) + "/", staging=tmp_path / "unused")
    assert by_path.classes == by_str.classes == FOOD_CLASSES
    assert by_path.images == by_str.images
    assert Path(by_str.root) == root


def test_foodx251_missing_root_and_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LAYOUTS.get("foodx251")(tmp_path / "nowhere")
    for name in ("class_list.txt", "train_info.csv", "val_info.csv"):
        root = make_food(tmp_path / name)
        (root / "annot" / name).unlink()
        with pytest.raises(FileNotFoundError, match=name):
            LAYOUTS.get("foodx251")(root)


@pytest.mark.parametrize("bad_line", ["train_000009.jpg", "train_000009.jpg,1,extra",
                                      "train_000009.jpg,one", ",1"])
def test_foodx251_malformed_csv_line(tmp_path: Path, bad_line: str) -> None:
    root = make_food(tmp_path / "food")
    write_text(root / "annot" / "train_info.csv", f"train_000001.jpg,0\n{bad_line}\n")
    with pytest.raises(ValueError, match=r"train_info\.csv:2: expected 'image_name,label'"):
        LAYOUTS.get("foodx251")(root)


def test_foodx251_header_line_is_rejected(tmp_path: Path) -> None:
    root = make_food(tmp_path / "food")
    write_text(root / "annot" / "val_info.csv", "img_name,label\nval_000001.jpg,0\n")
    with pytest.raises(ValueError, match=r"val_info\.csv:1: .*no header"):
        LAYOUTS.get("foodx251")(root)


@pytest.mark.parametrize("label", [3, -1])
def test_foodx251_label_out_of_range(tmp_path: Path, label: int) -> None:
    root = make_food(tmp_path / "food")
    write_text(root / "annot" / "val_info.csv", f"val_000001.jpg,0\nval_000002.jpg,2\nval_000003.jpg,{label}\n")
    with pytest.raises(ValueError, match=rf"val_info\.csv:3: label {label} out of range 0\.\.2"):
        LAYOUTS.get("foodx251")(root)


@pytest.mark.parametrize("text, message", [
    ("0 macaron\nbeignet\n", r"class_list\.txt:2: expected '<id> <name>'"),
    ("0 macaron\n0 beignet\n", r"class_list\.txt:2: class id 0 already defined on line 1"),
    ("0 macaron\n2 beignet\n", r"class_list\.txt: class ids must be 0\.\.1.*missing \[1\]"),
])
def test_foodx251_bad_class_list(tmp_path: Path, text: str, message: str) -> None:
    root = make_food(tmp_path / "food")
    write_text(root / "annot" / "class_list.txt", text)
    with pytest.raises(ValueError, match=message):
        LAYOUTS.get("foodx251")(root)


def test_foodx251_duplicate_image(tmp_path: Path) -> None:
    root = make_food(tmp_path / "food")
    write_text(root / "annot" / "train_info.csv", "a.jpg,0\nb.jpg,1\na.jpg,0\n")
    with pytest.raises(ValueError, match=r"train_info\.csv:3: image 'a\.jpg' already listed on line 1"):
        LAYOUTS.get("foodx251")(root)


# ---- intel_scenes -----------------------------------------------------------------------------
INTEL_CLASSES = ["buildings", "forest", "sea"]
INTEL_TRAIN = {"buildings": ["10.jpg", "2.JPG"], "forest": ["5.png", "7.jpeg"], "sea": ["1.jpg"]}
INTEL_TEST = {"buildings": ["3.jpg"], "forest": ["4.jpg"], "sea": ["8.PNG", "9.jpg"]}


def make_intel(root: Path, nested_train: bool, nested_test: bool) -> Path:
    for folder, nested, files in (("seg_train", nested_train, INTEL_TRAIN),
                                  ("seg_test", nested_test, INTEL_TEST)):
        base = root / folder / folder if nested else root / folder
        for cls, names in files.items():
            for name in names:
                write_image(base / cls / name)
            # ignored: a hidden file, a non-image, a hidden folder
            write_image(base / cls / ".hidden.jpg")
            write_text(base / cls / "notes.txt", "not an image")
            write_image(base / cls / ".thumbs" / "x.jpg")
        write_text(base / ".DS_Store", "")
    write_image(root / "seg_pred" / "seg_pred" / "123.jpg")  # unlabelled, ignored
    return root


def expected_intel(nested_train: bool, nested_test: bool) -> list[tuple[str, int, str]]:
    rows = []
    for folder, nested, files, split in (("seg_train", nested_train, INTEL_TRAIN, "train"),
                                         ("seg_test", nested_test, INTEL_TEST, "test")):
        prefix = f"{folder}/{folder}" if nested else folder
        for label, cls in enumerate(INTEL_CLASSES):
            rows += [(f"{prefix}/{cls}/{n}", label, split) for n in sorted(files[cls])]
    return rows


@pytest.mark.parametrize("nested_train, nested_test", [(True, True), (False, False), (True, False)])
def test_intel_scenes_nested_and_flat(tmp_path: Path, nested_train: bool, nested_test: bool) -> None:
    root = make_intel(tmp_path / "intel", nested_train, nested_test)
    scan = LAYOUTS.get("intel_scenes")(root)
    assert scan.classes == INTEL_CLASSES
    assert [(i.path, i.label, i.split) for i in scan.images] == expected_intel(nested_train, nested_test)
    assert Counter(i.split for i in scan.images) == {"train": 5, "test": 4}
    assert not any("seg_pred" in i.path or ".hidden" in i.path or ".thumbs" in i.path
                   for i in scan.images)
    assert_files_exist(scan)
    again = LAYOUTS.get("intel_scenes")(str(root) + "/")
    assert again.images == scan.images and again.classes == scan.classes


def test_intel_scenes_missing_root_and_split(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LAYOUTS.get("intel_scenes")(tmp_path / "nowhere")
    root = make_intel(tmp_path / "intel", True, True)
    for path in sorted((root / "seg_test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "seg_test").rmdir()
    with pytest.raises(FileNotFoundError, match="seg_test"):
        LAYOUTS.get("intel_scenes")(root)


def test_intel_scenes_class_sets_differ(tmp_path: Path) -> None:
    root = make_intel(tmp_path / "intel", True, False)
    write_image(root / "seg_train" / "seg_train" / "glacier" / "1.jpg")
    write_image(root / "seg_test" / "street" / "1.jpg")
    with pytest.raises(ValueError, match=r"only in seg_train: \['glacier'\], only in seg_test: \['street'\]"):
        LAYOUTS.get("intel_scenes")(root)


def test_intel_scenes_empty_class_folder_and_mixed_nesting(tmp_path: Path) -> None:
    root = make_intel(tmp_path / "intel", False, False)
    (root / "seg_train" / "glacier").mkdir()
    (root / "seg_test" / "glacier").mkdir()
    write_text(root / "seg_test" / "glacier" / "readme.txt", "no images")
    with pytest.raises(ValueError, match=r"glacier: class folder holds no images"):
        LAYOUTS.get("intel_scenes")(root)

    root = make_intel(tmp_path / "intel2", True, True)
    write_image(root / "seg_train" / "forest" / "1.jpg")  # a flat class beside the nested folder
    with pytest.raises(ValueError, match=r"seg_train: holds the nested folder 'seg_train' and also \['forest'\]"):
        LAYOUTS.get("intel_scenes")(root)


# ---- oxford_pets ------------------------------------------------------------------------------
PETS_TRAINVAL = [("Abyssinian_100", 1, 1, 1), ("american_bulldog_12", 2, 2, 1),
                 ("Abyssinian_2", 1, 1, 1), ("american_pit_bull_terrier_3", 3, 2, 2)]
PETS_TEST = [("american_pit_bull_terrier_1", 3, 2, 2), ("Abyssinian_7", 1, 1, 1),
             ("american_bulldog_150", 2, 2, 1)]
PETS_CLASSES = ["Abyssinian", "american_bulldog", "american_pit_bull_terrier"]


def pet_lines(rows: list[tuple[str, int, int, int]]) -> str:
    return "".join(f"{n} {c} {s} {b}\n" for n, c, s, b in rows)


def make_pets(root: Path) -> Path:
    header = "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n"
    write_text(root / "annotations" / "trainval.txt", header + pet_lines(PETS_TRAINVAL))
    write_text(root / "annotations" / "test.txt", pet_lines(PETS_TEST) + "\n")
    for name, *_ in PETS_TRAINVAL + PETS_TEST:
        write_image(root / "images" / f"{name}.jpg")
    return root


def test_oxford_pets_reads_both_splits(tmp_path: Path) -> None:
    root = make_pets(tmp_path / "pets")
    scan = LAYOUTS.get("oxford_pets")(root)
    assert scan.classes == PETS_CLASSES
    assert [(i.path, i.label, i.split) for i in scan.images] == (
        [(f"images/{n}.jpg", c - 1, "train") for n, c, _, _ in PETS_TRAINVAL]
        + [(f"images/{n}.jpg", c - 1, "test") for n, c, _, _ in PETS_TEST]
    )
    assert Counter(i.split for i in scan.images) == {"train": 4, "test": 3}
    assert_files_exist(scan)
    again = LAYOUTS.get("oxford_pets")(str(root) + "/", staging=None)
    assert again.images == scan.images and again.classes == scan.classes


def test_oxford_pets_missing_root_and_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LAYOUTS.get("oxford_pets")(tmp_path / "nowhere")
    for name in ("trainval.txt", "test.txt"):
        root = make_pets(tmp_path / name)
        (root / "annotations" / name).unlink()
        with pytest.raises(FileNotFoundError, match=name):
            LAYOUTS.get("oxford_pets")(root)


@pytest.mark.parametrize("bad_line, message", [
    ("Abyssinian_5 1 1", "expected '<image_name> <class_id> <species> <breed_id>'"),
    ("Abyssinian_5 one 1 1", "expected '<image_name> <class_id> <species> <breed_id>'"),
    ("Abyssinian 1 1 1", r"image name 'Abyssinian' does not end in '_<number>'"),
    ("Abyssinian_5 1 3 1", "species 3 is not 1"),
])
def test_oxford_pets_malformed_line(tmp_path: Path, bad_line: str, message: str) -> None:
    root = make_pets(tmp_path / "pets")
    write_text(root / "annotations" / "test.txt", f"# comment\n{pet_lines(PETS_TEST[:1])}{bad_line}\n")
    with pytest.raises(ValueError, match=rf"test\.txt:3: {message}"):
        LAYOUTS.get("oxford_pets")(root)


@pytest.mark.parametrize("class_id", [0, 38])
def test_oxford_pets_class_id_out_of_range(tmp_path: Path, class_id: int) -> None:
    root = make_pets(tmp_path / "pets")
    write_text(root / "annotations" / "trainval.txt",
               pet_lines(PETS_TRAINVAL) + f"Bengal_1 {class_id} 1 1\n")
    with pytest.raises(ValueError, match=rf"trainval\.txt:5: class_id {class_id} out of range 1\.\.37"):
        LAYOUTS.get("oxford_pets")(root)


def test_oxford_pets_inconsistent_class_names(tmp_path: Path) -> None:
    root = make_pets(tmp_path / "pets")
    # class id 2 is american_bulldog at trainval.txt:4 (after 2 comments); test.txt:2 calls it Bengal.
    write_text(root / "annotations" / "test.txt", "Abyssinian_7 1 1 1\nBengal_4 2 1 6\n")
    with pytest.raises(ValueError, match=r"test\.txt:2: class_id 2 is named 'Bengal' here but "
                                         r"'american_bulldog' at .*trainval\.txt:4"):
        LAYOUTS.get("oxford_pets")(root)
    # the same name under two ids (4 is otherwise unused)
    write_text(root / "annotations" / "test.txt", "Abyssinian_7 4 1 1\n")
    with pytest.raises(ValueError, match=r"test\.txt:1: class name 'Abyssinian' has class_id 4 here "
                                         r"but 1 at .*trainval\.txt:3"):
        LAYOUTS.get("oxford_pets")(root)


def test_oxford_pets_skipped_class_id_and_duplicates(tmp_path: Path) -> None:
    root = make_pets(tmp_path / "pets")
    write_text(root / "annotations" / "test.txt", "Bengal_4 6 1 2\n")
    with pytest.raises(ValueError, match=r"ids \[4, 5\] never appear"):
        LAYOUTS.get("oxford_pets")(root)
    write_text(root / "annotations" / "test.txt", "Abyssinian_2 1 1 1\n")
    with pytest.raises(ValueError, match=r"test\.txt:1: image 'Abyssinian_2' already listed at .*trainval\.txt:5"):
        LAYOUTS.get("oxford_pets")(root)


def test_layouts_reject_unknown_options(tmp_path: Path) -> None:
    for name, root in (("foodx251", make_food(tmp_path / "f")),
                       ("intel_scenes", make_intel(tmp_path / "i", True, True)),
                       ("oxford_pets", make_pets(tmp_path / "p"))):
        with pytest.raises(TypeError, match="unexpected keyword"):
            LAYOUTS.get(name)(root, bogus=1)
