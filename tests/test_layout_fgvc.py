"""Fine-grained layouts: ``cub200``, ``stanford_dogs`` and their 320-class merge ``cub_dogs``.

Fixtures are the real file formats in miniature: CUB's whitespace tables, Stanford Dogs' MATLAB
split lists written with scipy.io.savemat as (N, 1) cell arrays, and tiny real JPEG files.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from kdlib.data.layouts import LAYOUTS

# ----------------------------------------------------------------------------------- helpers


def write_jpeg(path: Path, shade: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), (shade, 255 - shade, 40)).save(path, "JPEG")


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# Class ids are deliberately NOT in folder-name order: sorted folders are 010.Wren (id 2),
# 020.Sparrow (id 1), 030.Albatross (id 3), so a folder-index label (as in the
# DeiT+ConvNeXt FGVC project) would be wrong.
CUB_CLASSES = {1: "020.Sparrow", 2: "010.Wren", 3: "030.Albatross"}
# (image id, class id, is_train); images.txt order is id order, as in the real file.
CUB_IMAGES = [
    (1, 1, 1), (2, 1, 0), (3, 1, 1),
    (4, 2, 1), (5, 2, 0),
    (6, 3, 0), (7, 3, 1), (8, 3, 1), (9, 3, 0),
]


def cub_relpath(image_id: int, class_id: int) -> str:
    name = CUB_CLASSES[class_id]
    return f"{name}/{name.split('.')[1]}_{image_id:04d}.jpg"


def make_cub(root: Path) -> Path:
    write_lines(root / "classes.txt", [f"{cid} {name}" for cid, name in CUB_CLASSES.items()])
    write_lines(root / "images.txt", [f"{i} {cub_relpath(i, c)}" for i, c, _ in CUB_IMAGES])
    write_lines(root / "image_class_labels.txt", [f"{i} {c}" for i, c, _ in CUB_IMAGES])
    write_lines(root / "train_test_split.txt", [f"{i} {t}" for i, _, t in CUB_IMAGES])
    for i, c, _ in CUB_IMAGES:
        write_jpeg(root / "images" / cub_relpath(i, c), shade=20 * i)
    return root


def replace_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[number - 1] = text
    write_lines(path, lines)


DOGS_TRAIN = [
    "n02085620-Chihuahua/n02085620_1.jpg",
    "n02085620-Chihuahua/n02085620_2.jpg",
    "n02086240-Shih-Tzu/n02086240_1.jpg",
    "n02086240-Shih-Tzu/n02086240_2.jpg",
    "n02085782-Japanese_spaniel/n02085782_1.jpg",
    "n02085782-Japanese_spaniel/n02085782_2.jpg",
]
DOGS_TEST = [
    "n02085620-Chihuahua/n02085620_3.jpg",
    "n02085782-Japanese_spaniel/n02085782_3.jpg",
]
DOGS_CLASSES = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02086240-Shih-Tzu"]


def cell_column(strings: list[str]) -> np.ndarray:
    """An (N, 1) object array of 1-element string arrays: how MATLAB cell columns load."""
    column = np.empty((len(strings), 1), dtype=object)
    for row, text in enumerate(strings):
        column[row, 0] = np.array([text])
    return column


def write_split_list(path: Path, files: list[str], labels: list[int] | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    content: dict[str, np.ndarray] = {
        "file_list": cell_column(files),
        "annotation_list": cell_column([f.rsplit(".", 1)[0] for f in files]),
    }
    if labels is not None:
        content["labels"] = np.asarray(labels, dtype=np.float64).reshape(-1, 1)
    scipy.io.savemat(str(path), content)


def dogs_labels(files: list[str]) -> list[int]:
    return [DOGS_CLASSES.index(f.split("/")[0]) + 1 for f in files]


def make_dogs(root: Path, with_labels: bool = True) -> Path:
    for name, files in (("train_list.mat", DOGS_TRAIN), ("test_list.mat", DOGS_TEST)):
        write_split_list(root / "splits" / name, files, dogs_labels(files) if with_labels else None)
    for i, rel in enumerate(DOGS_TRAIN + DOGS_TEST):
        write_jpeg(root / "Images" / rel, shade=25 * i)
    return root


def scan(layout: str, root: Path | str, **options: object):
    return LAYOUTS.get(layout)(root, **options)


def assert_paths_exist(result) -> None:
    for image in result.images:
        assert "\\" not in image.path and not image.path.startswith("/")
        assert (Path(result.root) / image.path).is_file(), image.path


# ------------------------------------------------------------------------------------- cub200


def test_cub_counts_classes_labels_splits(tmp_path: Path) -> None:
    root = make_cub(tmp_path / "CUB_200_2011")
    result = scan("cub200", root)
    assert Path(result.root) == root
    assert result.task == "multiclass"
    assert result.classes == ["020.Sparrow", "010.Wren", "030.Albatross"]  # classes.txt id order
    assert [im.path for im in result.images] == [f"images/{cub_relpath(i, c)}" for i, c, _ in CUB_IMAGES]
    assert [im.label for im in result.images] == [c - 1 for _, c, _ in CUB_IMAGES]
    assert [im.split for im in result.images] == ["train" if t else "test" for _, _, t in CUB_IMAGES]
    assert Counter(im.split for im in result.images) == {"train": 5, "test": 4}
    assert all(im.positives == () and im.difficult == () for im in result.images)
    assert_paths_exist(result)


def test_cub_labels_come_from_class_file_not_folder_order(tmp_path: Path) -> None:
    root = make_cub(tmp_path)
    result = scan("cub200", root)
    folders = sorted(p.name for p in (root / "images").iterdir())
    by_folder = {im.path.split("/")[1]: im.label for im in result.images}
    # Wren (class id 2) sorts first as a folder, but its label is 2 - 1 = 1.
    assert folders[0] == "010.Wren" and by_folder["010.Wren"] == 1
    assert by_folder == {"020.Sparrow": 0, "010.Wren": 1, "030.Albatross": 2}
    assert any(folders.index(f) != label for f, label in by_folder.items())


def test_cub_keeps_images_txt_order_and_tolerates_blank_lines(tmp_path: Path) -> None:
    root = make_cub(tmp_path)
    lines = (root / "images.txt").read_text().splitlines()
    write_lines(root / "images.txt", [lines[3], "", *reversed(lines[:3]), *lines[4:], "  "])
    result = scan("cub200", root)
    assert [im.path.split("_")[-1] for im in result.images[:4]] == ["0004.jpg", "0003.jpg", "0002.jpg", "0001.jpg"]
    assert len(result.images) == len(CUB_IMAGES)


def test_cub_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan("cub200", missing)


@pytest.mark.parametrize("name", ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"])
def test_cub_missing_annotation_file(tmp_path: Path, name: str) -> None:
    root = make_cub(tmp_path)
    (root / name).unlink()
    with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")):
        scan("cub200", root)


@pytest.mark.parametrize(
    ("name", "line", "text", "expected"),
    [
        ("images.txt", 4, "4", r"images\.txt, line 4: expected '<image_id> <relpath>'"),
        ("images.txt", 2, "two 010.Wren/x.jpg", r"images\.txt, line 2: expected '<image_id> <relpath>'"),
        ("images.txt", 5, "5 /abs/path.jpg", r"images\.txt, line 5: expected a relative path"),
        ("images.txt", 5, "5 ../escape.jpg", r"images\.txt, line 5: expected a relative path"),
        ("image_class_labels.txt", 3, "3 1 7", r"image_class_labels\.txt, line 3: expected '<image_id> <class_id>'"),
        ("image_class_labels.txt", 6, "6 x", r"image_class_labels\.txt, line 6: expected '<image_id> <class_id>'"),
        ("train_test_split.txt", 7, "7 2", r"train_test_split\.txt, line 7: expected '<image_id> <1\|0>'"),
        ("classes.txt", 2, "x 010.Wren", r"classes\.txt, line 2: expected '<class_id> <name>'"),
    ],
)
def test_cub_malformed_line(tmp_path: Path, name: str, line: int, text: str, expected: str) -> None:
    root = make_cub(tmp_path)
    replace_line(root / name, line, text)
    with pytest.raises(ValueError, match=expected):
        scan("cub200", root)


@pytest.mark.parametrize("class_id", [0, 4])
def test_cub_class_id_out_of_range(tmp_path: Path, class_id: int) -> None:
    root = make_cub(tmp_path)
    replace_line(root / "image_class_labels.txt", 5, f"5 {class_id}")
    with pytest.raises(ValueError, match=rf"image_class_labels\.txt, line 5: class id {class_id} .*allowed 1\.\.3"):
        scan("cub200", root)


def test_cub_class_ids_must_be_one_to_k(tmp_path: Path) -> None:
    root = make_cub(tmp_path)
    replace_line(root / "classes.txt", 3, "4 030.Albatross")
    with pytest.raises(ValueError, match=r"classes\.txt, line 3: class id 4 .*1\.\.3"):
        scan("cub200", root)


@pytest.mark.parametrize("name", ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"])
def test_cub_duplicate_id(tmp_path: Path, name: str) -> None:
    root = make_cub(tmp_path)
    lines = (root / name).read_text().splitlines()
    replace_line(root / name, 3, lines[1].split()[0] + " " + lines[2].split(None, 1)[1])
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}, line 3: duplicate id 2 \(first on line 2\)"):
        scan("cub200", root)


def test_cub_duplicate_path(tmp_path: Path) -> None:
    root = make_cub(tmp_path)
    replace_line(root / "images.txt", 2, f"2 {cub_relpath(1, 1)}")
    with pytest.raises(ValueError, match=r"images\.txt, line 2: path .* already listed on line 1"):
        scan("cub200", root)


@pytest.mark.parametrize("name", ["image_class_labels.txt", "train_test_split.txt"])
def test_cub_id_missing_from_a_table(tmp_path: Path, name: str) -> None:
    root = make_cub(tmp_path)
    lines = (root / name).read_text().splitlines()
    write_lines(root / name, lines[:5] + lines[6:])  # drop image id 6
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}: no line for image id 6 .*images\.txt, line 6"):
        scan("cub200", root)


@pytest.mark.parametrize("name", ["image_class_labels.txt", "train_test_split.txt"])
def test_cub_id_not_in_images_txt(tmp_path: Path, name: str) -> None:
    root = make_cub(tmp_path)
    lines = (root / "images.txt").read_text().splitlines()
    write_lines(root / "images.txt", lines[:-1])  # image id 9 now only in the other tables
    if name == "train_test_split.txt":  # make the labels table agree so the split table is reached
        labels = (root / "image_class_labels.txt").read_text().splitlines()
        write_lines(root / "image_class_labels.txt", labels[:-1])
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}, line 9: image id 9 is not in .*images\.txt"):
        scan("cub200", root)


# ------------------------------------------------------------------------------ stanford_dogs


def test_dogs_mat_fixture_has_the_real_structure(tmp_path: Path) -> None:
    root = make_dogs(tmp_path)
    mat = scipy.io.loadmat(str(root / "splits" / "train_list.mat"))
    files = mat["file_list"]
    assert files.shape == (len(DOGS_TRAIN), 1) and files.dtype == object
    assert all(cell.shape == (1,) and cell.dtype.kind == "U" for cell in files[:, 0])
    assert [str(cell[0]) for cell in files[:, 0]] == DOGS_TRAIN
    assert mat["labels"].shape == (len(DOGS_TRAIN), 1)


@pytest.mark.parametrize("with_labels", [True, False])
def test_dogs_counts_classes_labels_splits(tmp_path: Path, with_labels: bool) -> None:
    root = make_dogs(tmp_path / "StanfordDogs", with_labels)
    result = scan("stanford_dogs", root)
    assert Path(result.root) == root
    assert result.classes == DOGS_CLASSES
    assert [im.path for im in result.images] == [f"Images/{rel}" for rel in DOGS_TRAIN + DOGS_TEST]
    assert [im.split for im in result.images] == ["train"] * len(DOGS_TRAIN) + ["test"] * len(DOGS_TEST)
    assert [im.label for im in result.images] == [label - 1 for label in dogs_labels(DOGS_TRAIN + DOGS_TEST)]
    assert Counter(im.label for im in result.images if im.split == "train") == {0: 2, 1: 2, 2: 2}
    assert_paths_exist(result)


@pytest.mark.parametrize("layout", ["cub200", "stanford_dogs"])
@pytest.mark.parametrize("spelling", ["path", "str", "str/"])
def test_any_root_spelling(tmp_path: Path, layout: str, spelling: str) -> None:
    root = make_cub(tmp_path) if layout == "cub200" else make_dogs(tmp_path)
    given = {"path": root, "str": str(root), "str/": str(root) + "/"}[spelling]
    result = scan(layout, given)
    reference = scan(layout, root)
    assert Path(result.root) == root
    assert result.classes == reference.classes and result.images == reference.images
    assert_paths_exist(result)


def test_dogs_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_dogs"):
        scan("stanford_dogs", tmp_path / "no_dogs")


@pytest.mark.parametrize("name", ["train_list.mat", "test_list.mat"])
def test_dogs_missing_list(tmp_path: Path, name: str) -> None:
    root = make_dogs(tmp_path)
    (root / "splits" / name).unlink()
    with pytest.raises(FileNotFoundError, match=rf"splits/{name.replace('.', '[.]')}"):
        scan("stanford_dogs", root)


def test_dogs_labels_must_agree_with_folder(tmp_path: Path) -> None:
    root = make_dogs(tmp_path)
    labels = dogs_labels(DOGS_TEST)
    labels[1] = 1  # row 2 is a Japanese spaniel (class 2), not a Chihuahua
    write_split_list(root / "splits" / "test_list.mat", DOGS_TEST, labels)
    with pytest.raises(ValueError, match=r"test_list\.mat, row 2: labels says class 1 but folder 'n02085782-Japanese_spaniel' is class 2"):
        scan("stanford_dogs", root)


def test_dogs_zero_based_labels_are_rejected(tmp_path: Path) -> None:
    root = make_dogs(tmp_path)
    write_split_list(root / "splits" / "train_list.mat", DOGS_TRAIN, [v - 1 for v in dogs_labels(DOGS_TRAIN)])
    with pytest.raises(ValueError, match=r"train_list\.mat, row 1: labels says class 0"):
        scan("stanford_dogs", root)


def test_dogs_labels_length_mismatch(tmp_path: Path) -> None:
    root = make_dogs(tmp_path)
    write_split_list(root / "splits" / "train_list.mat", DOGS_TRAIN, dogs_labels(DOGS_TRAIN)[:-1])
    with pytest.raises(ValueError, match=r"train_list\.mat: 'labels' has 5 rows but 'file_list' has 6"):
        scan("stanford_dogs", root)


@pytest.mark.parametrize("bad", ["n02085620_9.jpg", "/abs/n02085620_9.jpg", "../x/n02085620_9.jpg", "a/b/c.jpg"])
def test_dogs_malformed_file_list_entry(tmp_path: Path, bad: str) -> None:
    root = make_dogs(tmp_path)
    files = DOGS_TEST[:1] + [bad]
    write_split_list(root / "splits" / "test_list.mat", files, None)
    with pytest.raises(ValueError, match=r"test_list\.mat, file_list row 2: expected a path '<wnid>-<name>/<file>'"):
        scan("stanford_dogs", root)


def test_dogs_missing_file_list_key(tmp_path: Path) -> None:
    root = make_dogs(tmp_path)
    scipy.io.savemat(str(root / "splits" / "train_list.mat"), {"annotation_list": cell_column(["a/b"])})
    with pytest.raises(ValueError, match=r"train_list\.mat: no 'file_list' key \(keys: annotation_list\)"):
        scan("stanford_dogs", root)


def test_dogs_not_a_mat_file(tmp_path: Path) -> None:
    root = make_dogs(tmp_path)
    (root / "splits" / "train_list.mat").write_bytes(b"this is not MATLAB data at all, just text\n" * 4)
    with pytest.raises(ValueError, match=r"train_list\.mat: cannot be read as a MATLAB"):
        scan("stanford_dogs", root)


def test_dogs_image_in_both_lists(tmp_path: Path) -> None:
    root = make_dogs(tmp_path)
    files = DOGS_TEST + [DOGS_TRAIN[2]]
    write_split_list(root / "splits" / "test_list.mat", files, dogs_labels(files))
    with pytest.raises(ValueError, match=r"test_list\.mat, row 3: .*n02086240_1\.jpg is already listed in .*train_list\.mat, row 3"):
        scan("stanford_dogs", root)


# ----------------------------------------------------------------------------------- cub_dogs


def test_cub_dogs_merges_into_offset_classes(tmp_path: Path) -> None:
    cub_root = make_cub(tmp_path / "birds" / "CUB_200_2011")
    dogs_root = make_dogs(tmp_path / "dogs")
    result = scan("cub_dogs", cub_root, dogs_root=dogs_root)
    cub, dogs = scan("cub200", cub_root), scan("stanford_dogs", dogs_root)
    assert Path(result.root) == tmp_path.resolve()
    assert result.classes == [f"cub/{c}" for c in cub.classes] + [f"dogs/{c}" for c in dogs.classes]
    assert len(result.classes) == len(set(result.classes)) == 6
    n_cub = len(cub.images)
    assert len(result.images) == n_cub + len(dogs.images)
    assert [im.path for im in result.images[:n_cub]] == [f"birds/CUB_200_2011/{im.path}" for im in cub.images]
    assert [im.path for im in result.images[n_cub:]] == [f"dogs/{im.path}" for im in dogs.images]
    assert [im.label for im in result.images] == [im.label for im in cub.images] + [im.label + 3 for im in dogs.images]
    assert [im.split for im in result.images] == [im.split for im in cub.images + dogs.images]
    assert sorted({im.label for im in result.images}) == list(range(6))
    assert_paths_exist(result)


def test_cub_dogs_roots_anywhere_and_any_spelling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cub_root = make_cub(tmp_path / "a" / "x" / "cub")
    dogs_root = make_dogs(tmp_path / "b" / "dogs")
    monkeypatch.chdir(tmp_path / "a")
    result = scan("cub_dogs", "x/cub/", dogs_root=str(dogs_root) + "/")
    assert Path(result.root) == tmp_path.resolve()
    assert result.images[0].path.startswith("a/x/cub/images/")
    assert result.images[-1].path.startswith("b/dogs/Images/")
    assert_paths_exist(result)


def test_cub_dogs_dogs_root_inside_cub_root(tmp_path: Path) -> None:
    cub_root = make_cub(tmp_path / "cub")
    make_dogs(cub_root / "dogs")
    result = scan("cub_dogs", cub_root, dogs_root=cub_root / "dogs")
    assert Path(result.root) == cub_root.resolve()
    assert result.images[0].path.startswith("images/") and result.images[-1].path.startswith("dogs/Images/")
    assert_paths_exist(result)


def test_cub_dogs_needs_dogs_root(tmp_path: Path) -> None:
    root = make_cub(tmp_path)
    with pytest.raises(ValueError, match="dogs_root"):
        scan("cub_dogs", root)


def test_cub_dogs_reports_errors_of_either_part(tmp_path: Path) -> None:
    cub_root = make_cub(tmp_path / "cub")
    with pytest.raises(FileNotFoundError, match="no_dogs"):
        scan("cub_dogs", cub_root, dogs_root=tmp_path / "no_dogs")
    dogs_root = make_dogs(tmp_path / "dogs")
    (cub_root / "train_test_split.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_test_split\.txt"):
        scan("cub_dogs", cub_root, dogs_root=dogs_root)
