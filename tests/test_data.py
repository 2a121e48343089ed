"""Data: MNIST idx reading and export, the imagefolder layout, the prepared index, image decoding
and batch normalization. Every image here is a few pixels, written into ``tmp_path``."""
from __future__ import annotations

import gzip
import hashlib
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdlib.data import (
    LAYOUTS,
    BatchNormalizer,
    DatasetIndex,
    DatasetMeta,
    Record,
    build_manifest,
    load_image,
    read_index,
    write_index,
)
from kdlib.data.index import validate_index
from kdlib.data.mnist import ChecksumError, export_imagefolder, load_mnist, read_idx_gz
from kdlib.data.prepare import index_from_scan

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO_ROOT / "data" / "mnist"
# data/mnist/README.md
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ---- idx files ------------------------------------------------------------------------------
def idx3_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def tiny_idx(tmp_path: Path) -> tuple[Path, np.ndarray, str]:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = idx3_bytes(array)
    path = tmp_path / "tiny-images.idx3-ubyte.gz"
    path.write_bytes(gzip.compress(raw))
    return path, array, hashlib.md5(raw).hexdigest()


def test_read_idx_gz_without_md5(tiny_idx) -> None:
    path, array, _ = tiny_idx
    out = read_idx_gz(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    assert np.array_equal(out, array)


def test_read_idx_gz_with_matching_md5(tiny_idx) -> None:
    path, array, md5 = tiny_idx
    assert np.array_equal(read_idx_gz(path, md5), array)


def test_read_idx_gz_md5_mismatch(tiny_idx) -> None:
    path, _, md5 = tiny_idx
    wrong = "0" * 32
    with pytest.raises(ChecksumError) as info:
        read_idx_gz(path, wrong)
    message = str(info.value)
    assert str(path) in message and md5 in message and wrong in message
    assert isinstance(info.value, ValueError)


def test_read_idx_gz_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad.idx3-ubyte.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 7])))  # float32 type code
    with pytest.raises(ValueError, match="magic") as info:
        read_idx_gz(path)
    assert str(path) in str(info.value)


def test_read_idx_gz_length_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "short.idx1-ubyte.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 0x08, 1, 0, 0, 0, 5, 1, 2, 3])))
    with pytest.raises(ValueError, match="header promises") as info:
        read_idx_gz(path)
    assert str(path) in str(info.value)


def test_read_idx_gz_not_gzip(tmp_path: Path) -> None:
    path = tmp_path / "plain.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="gzip") as info:
        read_idx_gz(path)
    assert str(path) in str(info.value)


def test_read_idx_gz_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.gz"):
        read_idx_gz(tmp_path / "nope.gz")


# ---- the real embedded MNIST ----------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist() -> dict[str, np.ndarray]:
    return load_mnist(MNIST_DIR)


def test_load_mnist_shapes_and_counts(mnist) -> None:
    assert mnist["train_images"].shape == (60000, 28, 28)
    assert mnist["test_images"].shape == (10000, 28, 28)
    assert mnist["train_labels"].shape == (60000,) and mnist["test_labels"].shape == (10000,)
    assert all(a.dtype == np.uint8 for a in mnist.values())
    assert np.bincount(mnist["train_labels"], minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(mnist["test_labels"], minlength=10).tolist() == MNIST_TEST_COUNTS


@pytest.fixture(scope="module")
def small_mnist(mnist) -> dict[str, np.ndarray]:
    """Full training arrays (for the stratified draw) but a 40-image test set (exported in full)."""
    return {
        "train_images": mnist["train_images"],
        "train_labels": mnist["train_labels"],
        "test_images": mnist["test_images"][:40],
        "test_labels": mnist["test_labels"][:40],
    }


def _exported(root: Path) -> dict[str, list[Path]]:
    return {s: sorted((root / s).rglob("*.png")) for s in ("train", "val", "test")}


def _source_index(path: Path) -> int:
    return int(path.stem.rsplit("-", 1)[1])


def test_export_imagefolder(small_mnist, tmp_path: Path) -> None:
    counts = export_imagefolder(small_mnist, tmp_path, train_per_class=3, val_per_class=2, seed=0)
    assert counts == {"train": 30, "val": 20, "test": 40}
    files = _exported(tmp_path)
    assert {s: len(v) for s, v in files.items()} == counts
    for split, per_class in (("train", 3), ("val", 2)):
        assert Counter(p.parent.name for p in files[split]) == {str(d): per_class for d in range(10)}
    assert sorted(d.name for d in (tmp_path / "test").iterdir()) == [str(d) for d in range(10)]
    train_src = {_source_index(p) for p in files["train"]}
    val_src = {_source_index(p) for p in files["val"]}
    assert len(train_src) == 30 and len(val_src) == 20 and not train_src & val_src
    assert all(p.name.startswith("mnist-train-") for p in files["train"] + files["val"])
    assert all(p.name.startswith("mnist-test-") for p in files["test"])
    # Folder = label and pixels = source image.
    sample = files["val"][0]
    i = _source_index(sample)
    assert int(sample.parent.name) == int(small_mnist["train_labels"][i])
    assert np.array_equal(np.asarray(Image.open(sample)), small_mnist["train_images"][i])


def test_export_imagefolder_deterministic(small_mnist, tmp_path: Path) -> None:
    def names(root: Path, seed: int) -> dict[str, list[str]]:
        export_imagefolder(small_mnist, root, train_per_class=2, val_per_class=1, seed=seed)
        return {s: [p.relative_to(root).as_posix() for p in v] for s, v in _exported(root).items()}

    a, b, c = names(tmp_path / "a", 3), names(tmp_path / "b", 3), names(tmp_path / "c", 4)
    assert a == b
    assert a["train"] != c["train"]


# ---- imagefolder layout ---------------------------------------------------------------------
def write_png(path: Path, value: int, size: int = 4, mode: str = "L") -> Path:
    """A tiny image whose pixels all encode ``value`` (distinct values → distinct bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size), value % 256, dtype=np.uint8)
    arr[0, 0] = value // 256
    Image.fromarray(arr, mode="L").convert(mode).save(path)
    return path


def test_imagefolder_with_split_folders(tmp_path: Path) -> None:
    n = 0
    for split, classes in {"train": ["dog", "cat", "bird"], "val": ["cat", "dog"], "test": ["bird", "cat"]}.items():
        for cls in classes:
            for k in range(2):
                write_png(tmp_path / split / cls / f"{k}.png", n)
                n += 1
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    write_png(tmp_path / "train" / "cat" / ".hidden.png", 999)
    scan = LAYOUTS.get("imagefolder")(tmp_path)
    assert scan.classes == ["bird", "cat", "dog"]
    assert len(scan.images) == n
    by_path = {im.path: im for im in scan.images}
    assert by_path["train/dog/0.png"].label == 2 and by_path["train/dog/0.png"].split == "train"
    assert by_path["val/cat/1.png"].label == 1 and by_path["val/cat/1.png"].split == "val"
    assert by_path["test/bird/0.png"].label == 0 and by_path["test/bird/0.png"].split == "test"
    assert Counter(im.split for im in scan.images) == {"train": 6, "val": 4, "test": 4}
    assert "train/cat/notes.txt" not in by_path and "train/cat/.hidden.png" not in by_path


def test_imagefolder_flat(tmp_path: Path) -> None:
    for i, cls in enumerate(["zebra", "ant"]):
        for k in range(3):
            write_png(tmp_path / cls / f"img{k}.PNG", 10 * i + k)
    scan = LAYOUTS.get("imagefolder")(tmp_path)
    assert scan.classes == ["ant", "zebra"]
    assert {im.split for im in scan.images} == {None}
    assert Counter(im.label for im in scan.images) == {0: 3, 1: 3}
    assert all(im.label == (0 if im.path.startswith("ant/") else 1) for im in scan.images)
    assert Path(scan.root) == tmp_path


def test_imagefolder_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError) as info:
        LAYOUTS.get("imagefolder")(missing)
    assert str(missing) in str(info.value)


def test_imagefolder_without_images(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no images"):
        LAYOUTS.get("imagefolder")(tmp_path)


def test_unknown_layout_lists_known() -> None:
    with pytest.raises(KeyError, match="imagefolder"):
        LAYOUTS.get("coco")


# ---- prepared index -------------------------------------------------------------------------
def meta_for(classes: list[str], root: Path) -> DatasetMeta:
    return DatasetMeta(name="toy", root=str(root), classes=classes, channels=1, image_size=4,
                       mean=[0.5], std=[0.25])


@pytest.fixture
def flat_root(tmp_path: Path) -> Path:
    root = tmp_path / "flat"
    for c in range(3):
        for k in range(10):
            write_png(root / f"c{c}" / f"{k:02d}.png", 100 * c + k)
    return root


def test_index_from_scan_assigns_stratified_seeded_splits(flat_root: Path) -> None:
    scan = LAYOUTS.get("imagefolder")(flat_root)
    meta = meta_for(scan.classes, flat_root)
    index = index_from_scan(scan, meta, val_fraction=0.25, test_fraction=0.2, seed=0)
    assert len(index.records) == 30
    counts = Counter((r.split, r.label) for r in index.records)
    for c in range(3):
        # 10 → 2 test (0.2); the 8 left → 2 val (0.25); 6 train
        assert (counts[("test", c)], counts[("val", c)], counts[("train", c)]) == (2, 2, 6)
    for r in index.records:
        assert r.md5 == hashlib.md5((flat_root / r.path).read_bytes()).hexdigest()
    again = index_from_scan(scan, meta, val_fraction=0.25, test_fraction=0.2, seed=0)
    assert again.records == index.records
    other = index_from_scan(scan, meta, val_fraction=0.25, test_fraction=0.2, seed=1)
    assert [r.split for r in other.records] != [r.split for r in index.records]


def test_index_from_scan_keeps_official_splits_and_carves_val_from_train(tmp_path: Path) -> None:
    n = 0
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for k in range(8 if split == "train" else 2):
                write_png(tmp_path / split / cls / f"{k}.png", n)
                n += 1
    scan = LAYOUTS.get("imagefolder")(tmp_path)
    index = index_from_scan(scan, meta_for(scan.classes, tmp_path), val_fraction=0.25, test_fraction=0.5, seed=0)
    for r in index.records:
        if r.path.startswith("test/"):
            assert r.split == "test"
        else:
            assert r.split in ("train", "val")
    assert Counter((r.split, r.label) for r in index.records) == {
        ("train", 0): 6, ("train", 1): 6, ("val", 0): 2, ("val", 1): 2, ("test", 0): 2, ("test", 1): 2,
    }


def test_write_read_index_round_trip(flat_root: Path, tmp_path: Path) -> None:
    scan = LAYOUTS.get("imagefolder")(flat_root)
    index = index_from_scan(scan, meta_for(scan.classes, flat_root), 0.25, 0.2, seed=0)
    out = tmp_path / "prepared"
    write_index(index, out)
    assert (out / "index.csv").read_text().splitlines()[0] == "path,label,split,md5,positives,difficult"
    loaded = read_index(out)
    assert loaded.records == index.records
    assert loaded.meta == index.meta
    assert loaded.meta.num_classes == 3


def test_read_index_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="prepare"):
        read_index(tmp_path / "nothing")


def test_read_index_malformed_row(flat_root: Path, tmp_path: Path) -> None:
    scan = LAYOUTS.get("imagefolder")(flat_root)
    write_index(index_from_scan(scan, meta_for(scan.classes, flat_root), 0.25, 0.2, seed=0), tmp_path)
    lines = (tmp_path / "index.csv").read_text().splitlines()
    lines[3] = lines[3].replace(",", ",x", 1)  # label "x<digit>"
    (tmp_path / "index.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"index\.csv:4"):
        read_index(tmp_path)


def toy_index(records: list[Record], classes: tuple[str, ...] = ("a", "b")) -> DatasetIndex:
    return DatasetIndex(meta_for(list(classes), Path(".")), records)


GOOD = [
    Record("train/a/1.png", 0, "train", "m1"), Record("train/b/1.png", 1, "train", "m2"),
    Record("val/a/1.png", 0, "val", "m3"), Record("test/b/1.png", 1, "test", "m4"),
]


def test_validate_index_accepts_good_index() -> None:
    validate_index(toy_index(GOOD))


def test_validate_rejects_duplicate_content_across_splits(tmp_path: Path) -> None:
    n = 0
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for k in range(3):
                write_png(tmp_path / split / cls / f"{split}{k}.png", n)
                n += 1
    # The same bytes under two split folders (a leak from train into test).
    data = (tmp_path / "train" / "a" / "train0.png").read_bytes()
    (tmp_path / "test" / "a" / "leak.png").write_bytes(data)
    scan = LAYOUTS.get("imagefolder")(tmp_path)
    with pytest.raises(ValueError) as info:
        index_from_scan(scan, meta_for(scan.classes, tmp_path), 0.34, 0.2, seed=0)
    message = str(info.value)
    assert hashlib.md5(data).hexdigest() in message and "test" in message


def test_validate_rejects_duplicate_md5_records() -> None:
    records = GOOD[:3] + [Record("test/b/1.png", 1, "test", "m1")]
    with pytest.raises(ValueError, match="m1"):
        validate_index(toy_index(records))


def test_validate_rejects_same_path_in_two_splits() -> None:
    records = GOOD + [Record("train/a/1.png", 0, "test", "m9")]
    with pytest.raises(ValueError, match="train/a/1.png"):
        validate_index(toy_index(records))


@pytest.mark.parametrize("label", [2, -1])
def test_validate_rejects_label_out_of_range(label: int) -> None:
    records = GOOD + [Record("train/x.png", label, "train", "m9")]
    with pytest.raises(ValueError, match=r"train/x\.png: label") as info:
        validate_index(toy_index(records))
    assert "0..1" in str(info.value)


def test_validate_rejects_class_without_training_image() -> None:
    records = [r for r in GOOD if not (r.split == "train" and r.label == 1)]
    with pytest.raises(ValueError, match="no training image: b"):
        validate_index(toy_index(records))


def test_validate_rejects_unknown_split_and_empty_split() -> None:
    with pytest.raises(ValueError, match="holdout"):
        validate_index(toy_index(GOOD + [Record("x.png", 0, "holdout", "m9")]))
    with pytest.raises(ValueError, match="'val' split is empty"):
        validate_index(toy_index([r for r in GOOD if r.split != "val"]))


def test_write_index_validates(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_index(toy_index(GOOD + [Record("bad.png", 5, "train", "m9")]), tmp_path)
    assert not (tmp_path / "index.csv").exists()


def test_build_manifest_counts_and_md5() -> None:
    manifest = build_manifest(toy_index(GOOD))
    assert manifest["num_classes"] == 2 and manifest["total"] == 4
    assert manifest["splits"]["train"]["count"] == 2
    assert manifest["splits"]["train"]["per_class"] == {"a": 1, "b": 1}
    assert manifest["splits"]["val"]["per_class"] == {"a": 1, "b": 0}
    assert manifest["splits"]["test"]["per_class"] == {"a": 0, "b": 1}
    # Order of records does not matter.
    assert build_manifest(toy_index(GOOD[::-1])) == manifest
    # A label change changes that split's md5 only.
    relabeled = [replace(GOOD[2], label=1) if i == 2 else r for i, r in enumerate(GOOD)]
    changed = build_manifest(toy_index(relabeled))
    assert changed["splits"]["val"]["md5"] != manifest["splits"]["val"]["md5"]
    assert changed["splits"]["train"]["md5"] == manifest["splits"]["train"]["md5"]
    assert changed["splits"]["test"]["md5"] == manifest["splits"]["test"]["md5"]


# ---- image decoding -------------------------------------------------------------------------
RGB = (10, 200, 30)
GRAY_OF_RGB = (10 * 299 + 200 * 587 + 30 * 114) // 1000  # ITU-R 601-2 luma, PIL's L conversion


def solid(mode: str, color, size=(3, 2)) -> Image.Image:
    return Image.new(mode, size, color)


def check_uint8_chw(tensor: torch.Tensor, channels: int, height: int = 2, width: int = 3) -> None:
    assert tensor.dtype == torch.uint8
    assert tuple(tensor.shape) == (channels, height, width)


@pytest.mark.parametrize("channels", [1, 3])
def test_load_image_rgba(tmp_path: Path, channels: int) -> None:
    path = tmp_path / "rgba.png"
    solid("RGBA", (*RGB, 128)).save(path)
    out = load_image(path, channels)
    check_uint8_chw(out, channels)
    expected = [GRAY_OF_RGB] if channels == 1 else list(RGB)
    assert out[:, 0, 0].tolist() == pytest.approx(expected, abs=1)
    assert (out == out[:, :1, :1]).all()


@pytest.mark.parametrize("channels", [1, 3])
def test_load_image_palette(tmp_path: Path, channels: int) -> None:
    path = tmp_path / "palette.png"
    img = Image.new("P", (3, 2), 1)
    img.putpalette([0, 0, 0, *RGB] + [0] * (3 * 254))
    img.save(path)
    assert Image.open(path).mode == "P"
    out = load_image(path, channels)
    check_uint8_chw(out, channels)
    expected = [GRAY_OF_RGB] if channels == 1 else list(RGB)
    assert out[:, 1, 2].tolist() == pytest.approx(expected, abs=1)


@pytest.mark.parametrize("channels", [1, 3])
def test_load_image_cmyk(tmp_path: Path, channels: int) -> None:
    path = tmp_path / "cmyk.tif"
    solid("CMYK", (0, 255, 255, 0)).save(path)  # pure red
    assert Image.open(path).mode == "CMYK"
    out = load_image(path, channels)
    check_uint8_chw(out, channels)
    if channels == 3:
        assert out[:, 0, 0].tolist() == [255, 0, 0]
    else:
        assert out[0, 0, 0].item() == pytest.approx(255 * 299 // 1000, abs=1)


@pytest.mark.parametrize("channels", [1, 3])
def test_load_image_16bit_gray(tmp_path: Path, channels: int) -> None:
    path = tmp_path / "gray16.png"
    arr = np.array([[0, 1000, 2000], [30000, 40000, 60000]], dtype=np.uint16)
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    out = load_image(path, channels)
    check_uint8_chw(out, channels)
    expected = (arr.astype(np.float64) * 255.0 / 60000).astype(np.uint8)
    for c in range(channels):
        assert np.array_equal(out[c].numpy(), expected)
    assert out.max().item() == 255  # scaled to the full range, not clipped to 0/255


def test_load_image_gray_to_rgb_repeats(tmp_path: Path) -> None:
    path = write_png(tmp_path / "g.png", 77)
    out = load_image(path, 3)
    check_uint8_chw(out, 3, 4, 4)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert out[0, 1, 1].item() == 77


def test_load_image_truncated_raises_value_error(tmp_path: Path) -> None:
    path = tmp_path / "trunc.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as info:
        load_image(path, 1)
    assert str(path) in str(info.value)


def test_load_image_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "text.png"
    path.write_text("hello")
    with pytest.raises(ValueError, match="text.png"):
        load_image(path, 3)


def test_load_image_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="gone.png"):
        load_image(tmp_path / "gone.png", 1)


# ---- batch normalization --------------------------------------------------------------------
def test_batch_normalizer_matches_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8, generator=gen)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    out = BatchNormalizer(mean, std)(batch)
    expected = (batch.double() / 255 - torch.tensor(mean, dtype=torch.double).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.double
    ).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    assert torch.allclose(out.double(), expected, atol=1e-5)


def test_batch_normalizer_single_channel_values() -> None:
    batch = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)
    out = BatchNormalizer([0.1307], [0.3081])(batch).flatten().tolist()
    assert out == pytest.approx([-0.1307 / 0.3081, (1 - 0.1307) / 0.3081], abs=1e-5)


def test_batch_normalizer_channels_last() -> None:
    batch = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    out = BatchNormalizer([0.5] * 3, [0.5] * 3, channels_last=True)(batch)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, torch.full_like(out, -1.0))


def test_export_imagefolder_test_subset(mnist, tmp_path: Path) -> None:
    counts = export_imagefolder(mnist, tmp_path, train_per_class=1, val_per_class=1, seed=0, test_per_class=2)
    assert counts == {"train": 10, "val": 10, "test": 20}
    files = _exported(tmp_path)["test"]
    assert Counter(p.parent.name for p in files) == {str(d): 2 for d in range(10)}
    for p in files:
        assert int(p.parent.name) == int(mnist["test_labels"][_source_index(p)])


# ---- all of MNIST: train_per_class null (datasets.mnist_full) --------------------------------
def test_export_imagefolder_all_training_images_not_in_val(mnist, tmp_path: Path) -> None:
    """train_per_class=None: val is a seeded stratified draw and train is every other training image."""
    part = {"train_images": mnist["train_images"][:1000], "train_labels": mnist["train_labels"][:1000],
            "test_images": mnist["test_images"][:30], "test_labels": mnist["test_labels"][:30]}
    counts = export_imagefolder(part, tmp_path / "a", train_per_class=None, val_per_class=5, seed=0)
    assert counts == {"train": 950, "val": 50, "test": 30}
    files = _exported(tmp_path / "a")
    train_src = {_source_index(p) for p in files["train"]}
    val_src = {_source_index(p) for p in files["val"]}
    assert not train_src & val_src and train_src | val_src == set(range(1000))
    assert Counter(p.parent.name for p in files["val"]) == {str(d): 5 for d in range(10)}
    for p in files["train"][::97] + files["val"][::7]:
        i = _source_index(p)
        assert int(p.parent.name) == int(part["train_labels"][i])
        assert np.array_equal(np.asarray(Image.open(p)), part["train_images"][i])
    # seeded: the same seed draws the same val, another seed another one
    export_imagefolder(part, tmp_path / "b", train_per_class=None, val_per_class=5, seed=0)
    export_imagefolder(part, tmp_path / "c", train_per_class=None, val_per_class=5, seed=1)
    again = {_source_index(p) for p in _exported(tmp_path / "b")["val"]}
    other = {_source_index(p) for p in _exported(tmp_path / "c")["val"]}
    assert again == val_src and other != val_src


def test_full_mnist_split_sizes(mnist, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mnist_full's options on the real files: 55,000 / 5,000 / 10,000, val 500 per digit, train and
    val disjoint and together the whole training set (paths recorded, PNG writing skipped)."""
    import kdlib.data.mnist as mnist_module

    written: list[Path] = []
    monkeypatch.setattr(mnist_module, "_write_pngs", lambda images, paths: written.extend(paths))
    counts = export_imagefolder(mnist, tmp_path, train_per_class=None, val_per_class=500, seed=0)
    assert counts == {"train": 55_000, "val": 5_000, "test": 10_000}
    by_split = {s: [p for p in written if p.relative_to(tmp_path).parts[0] == s] for s in ("train", "val", "test")}
    train_src = {_source_index(p) for p in by_split["train"]}
    val_src = {_source_index(p) for p in by_split["val"]}
    assert len(train_src) == 55_000 and not train_src & val_src and train_src | val_src == set(range(60_000))
    assert Counter(p.parent.name for p in by_split["val"]) == {str(d): 500 for d in range(10)}
    assert Counter(p.parent.name for p in by_split["train"]) == {
        str(d): n - 500 for d, n in enumerate(MNIST_TRAIN_COUNTS)}
    assert sorted(_source_index(p) for p in by_split["test"]) == list(range(10_000))


def test_subset_draw_is_unchanged(small_mnist, tmp_path: Path) -> None:
    """A numeric train_per_class still draws train first, then val from the rest, with the same
    generator: the default data set (and its DVC cache) is what it was."""
    from kdlib.data.splits import stratified_take

    export_imagefolder(small_mnist, tmp_path, train_per_class=4, val_per_class=3, seed=7)
    rng = np.random.default_rng(7)
    train = stratified_take(small_mnist["train_labels"], 4, rng)
    val = stratified_take(small_mnist["train_labels"], 3, rng, exclude=set(train.tolist()))
    files = _exported(tmp_path)
    assert sorted(_source_index(p) for p in files["train"]) == train.tolist()
    assert sorted(_source_index(p) for p in files["val"]) == val.tolist()


@pytest.mark.parametrize(("options", "problems"), [
    ({"train_per_class": None, "val_per_class": 500}, []),
    ({"train_per_class": None, "val_per_class": 500, "test_per_class": None}, []),
    ({"train_per_class": 0, "val_per_class": 1},
     [("train_per_class", "expected null (every training image not in val) or an integer in [1, inf]")]),
    ({"val_per_class": None}, [("val_per_class", "expected an integer")]),
    ({"train_per_class": "all"}, [("train_per_class", "expected null (every training image not in val) or an integer")]),
])
def test_mnist_layout_options(options: dict, problems: list) -> None:
    from kdlib.data.layouts import option_problems

    assert option_problems("mnist", options) == problems
