"""The JPEG path (kdlib.data.decode, kdlib.data.pixel_cache): reduced DCT-scale decoding, the
memory-mapped pixel cache, its wiring into IndexedImageDataset / DatasetSpec, and the exact
replay of (image, view) pairs through every path and any number of loader workers.

The pictures are crops of a real photograph (matplotlib's sample ``grace_hopper.jpg``), small
so that every test takes about a second.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import pickle
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from kdlib.data import IndexedImageDataset, Record, build_transforms, load_image
from kdlib.data.decode import (bytes_of, decode_at_short_side, decode_image, decode_jpeg_views, draft_scale,
                               fit_short_side)
from kdlib.data.index import DatasetIndex, DatasetMeta
from kdlib.data.pixel_cache import PixelCache, PixelCacheError, cache_file, cache_key, open_or_build
from kdlib.data.spec import DatasetSpec
from kdlib.data.views import AugmentedViews, make_view_seeds, seeded
from kdlib.runtime import Runtime, make_loader
from kdlib.schema import SchemaError, parse

REPO = Path(__file__).resolve().parents[1]
PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"  # 512 × 600, RGB
# (width, height) of the test pictures: landscape, portrait, wide, square, and one below every size
SHAPES = [(160, 120), (120, 160), (200, 90), (96, 96), (140, 105), (60, 45)]


def photo_crops(root: Path, shapes: list[tuple[int, int]] = SHAPES) -> list[Record]:
    """JPEGs (quality 90) cut from the photograph at different places, flipped every other one."""
    source = Image.open(PHOTO).convert("RGB")
    records = []
    for i, (w, h) in enumerate(shapes):
        left, top = 37 * i % (512 - 300), 53 * i % (600 - 300)
        box = (left, top, left + 300, top + int(300 * h / w))
        picture = source.crop(box).resize((w, h), Image.Resampling.BICUBIC)
        if i % 2:
            picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        picture.save(root / f"p{i}.jpg", quality=90)
        records.append(Record(f"p{i}.jpg", i % 2, "train"))
    return records


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Record]]:
    root = tmp_path_factory.mktemp("photos")
    return root, photo_crops(root)


# ------------------------------------------------------------------------------- reduced decode

def expected_scale(width: int, height: int, need: int) -> int:
    """The largest 1/s with s·need <= short side, written out independently of the code."""
    short = min(width, height)
    return max([s for s in (1, 2, 4, 8) if s * need <= short] or [1])


@pytest.mark.parametrize(("width", "height", "need", "scale"), [
    (500, 375, 256, 1), (500, 375, 448, 1), (500, 375, 187, 2), (500, 375, 188, 1), (500, 375, 93, 4),
    (500, 375, 46, 8), (500, 375, 10, 8), (1000, 750, 256, 2), (1000, 750, 224, 2), (2000, 1500, 256, 4),
])
def test_draft_scale_picks_the_largest_reduction_that_stays_at_or_above_the_need(width, height, need, scale):
    assert draft_scale(width, height, need) == scale == expected_scale(width, height, need)
    assert draft_scale(width, height, None) == 1
    assert math.ceil(min(width, height) / scale) >= need or min(width, height) < need


def test_reduced_decode_size_is_never_below_the_need(photos):
    root, records = photos
    path, (w, h) = root / records[0].path, SHAPES[0]
    for need in range(1, 200, 7):
        image = decode_image(path, 3, need)
        s = expected_scale(w, h, need)
        assert tuple(image.shape) == (3, math.ceil(h / s), math.ceil(w / s)), need
        assert min(image.shape[1:]) >= min(need, min(w, h))


def test_non_jpeg_and_no_size_decode_at_full_size_like_load_image(tmp_path: Path, photos):
    root, records = photos
    full = np.asarray(Image.open(root / records[0].path).convert("RGB")).transpose(2, 0, 1)
    assert torch.equal(decode_image(root / records[0].path, 3), torch.from_numpy(full.copy()))
    Image.open(root / records[0].path).save(tmp_path / "p.png")
    png = decode_image(tmp_path / "p.png", 3, 20)  # a PNG has no DCT scales: full size
    assert tuple(png.shape) == (3, 120, 160) and torch.equal(png, load_image(tmp_path / "p.png", 3))
    gray = decode_image(root / records[0].path, 1, 30)  # reduced to 1/4, then the usual RGB -> L conversion
    with Image.open(root / records[0].path) as img:
        img.draft("RGB", (40, 30))
        assert img.size == (40, 30)
        expected_gray = np.asarray(img.convert("L"))
    assert torch.equal(gray[0], torch.from_numpy(expected_gray.copy()))
    sixteen = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "d.png")
    assert torch.equal(decode_image(tmp_path / "d.png", 1, 1)[0],
                       torch.from_numpy((sixteen * (255.0 / 65535)).astype(np.uint8)))


def test_bad_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(ValueError, match="bad.jpg"):
        decode_image(tmp_path / "bad.jpg", 3, 32)
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        decode_at_short_side(tmp_path / "gone.jpg", 3, 32)


def test_reduced_decode_agrees_with_full_decode_plus_resize(photos):
    """At short side S: same shape as ``v2.Resize(S)`` of the full decode; where a DCT scale
    applies (the DCT's own downscale is not the bilinear filter) pixels within a mean absolute
    difference of 6 grey levels and a 99th percentile of 40 (these tiny crops are the hard case:
    on the bench's 500×375 photographs it is about 2 and 20), and closer to it than a
    nearest-neighbour downscale is; exactly equal where no scale applies."""
    root, records = photos
    path = root / records[0].path  # 160 × 120
    full = load_image(path, 3)
    for size in (30, 40, 59, 60, 100, 119, 120, 200):
        reference = TF.resize(full, [size], antialias=True) if size < 120 else full
        reduced = decode_at_short_side(path, 3, size)
        assert reduced.shape == reference.shape, size
        diff = (reduced.int() - reference.int()).abs().float()
        if expected_scale(160, 120, size) == 1:
            assert torch.equal(reduced, reference), size
        else:
            assert diff.mean() <= 6 and diff.quantile(0.99) <= 40, (size, diff.mean(), diff.quantile(0.99))
            nearest = TF.resize(full, [size], interpolation=TF.InterpolationMode.NEAREST)
            assert diff.mean() < (nearest.int() - reference.int()).abs().float().mean(), size


def test_fit_short_side_keeps_aspect_and_never_enlarges():
    image = torch.zeros(3, 120, 160, dtype=torch.uint8)
    assert fit_short_side(image, 100).shape == (3, 100, 133)  # int(100 * 160 / 120)
    assert fit_short_side(image.transpose(1, 2), 100).shape == (3, 133, 100)
    assert fit_short_side(image, 120).shape == (3, 120, 160)
    assert fit_short_side(image, 500).shape == (3, 120, 160)


# ------------------------------------------------------------------------------- the pixel cache

def test_cache_round_trips_exact_pixels_for_variable_aspect_ratios(photos, tmp_path: Path):
    root, records = photos
    cache = open_or_build(tmp_path, root, records, 64, 3)
    assert len(cache) == len(records)
    shapes = [tuple(cache.image(i).shape) for i in range(len(records))]
    # independently: the short side becomes 64 unless already smaller (the 60 × 45 picture)
    assert shapes == [(3, 64, 85), (3, 85, 64), (3, 64, 142), (3, 64, 64), (3, 64, 85), (3, 45, 60)]
    for i, r in enumerate(records):
        assert torch.equal(cache.image(i), decode_at_short_side(root / r.path, 3, 64)), r.path
    assert torch.equal(cache.image(5), load_image(root / records[5].path, 3))  # small: stored as decoded
    assert cache.nbytes == sum(math.prod(s) for s in shapes)
    again = open_or_build(tmp_path, root, records, 64, 3)  # opened, not rebuilt
    assert again.path == cache.path and os.stat(cache.path).st_ino == os.stat(again.path).st_ino


def test_cache_identity_follows_records_size_and_channels(photos, tmp_path: Path):
    root, records = photos
    with_md5 = [Record(r.path, r.label, r.split, md5=f"{i:032x}") for i, r in enumerate(records)]
    keys = {cache_key(root, records, 64, 3), cache_key(root, records, 96, 3), cache_key(root, records, 64, 1),
            cache_key(root, records[:-1], 64, 3), cache_key(root, with_md5, 64, 3)}
    assert len(keys) == 5
    changed = [Record(r.path, r.label, r.split, md5=f"{i + 1:032x}") for i, r in enumerate(records)]
    assert cache_key(root, changed, 64, 3) != cache_key(root, with_md5, 64, 3)
    # with md5s the root does not matter: the same bytes anywhere are the same pixels
    assert cache_key(root, with_md5, 64, 3) == cache_key(tmp_path, with_md5, 64, 3)


def test_truncated_or_mismatched_cache_is_detected_and_rebuilt(photos, tmp_path: Path):
    root, records = photos
    cache = open_or_build(tmp_path, root, records, 64, 3)
    key = cache_key(root, records, 64, 3)
    reference = [cache.image(i) for i in range(len(records))]
    with open(cache.path, "r+b") as handle:
        handle.truncate(os.path.getsize(cache.path) - 10)
    with pytest.raises(PixelCacheError, match=f"{cache.path.name}.*bytes, expected"):
        PixelCache.open(cache.path, key, len(records), 64, 3)
    in_worker = pickle.loads(pickle.dumps(cache))  # what a DataLoader worker gets: unmapped
    with pytest.raises(PixelCacheError, match=f"{cache.path.name} changed after it was checked"):
        in_worker.image(0)  # a process that maps it lazily refuses it rather than read a wrong image
    with pytest.warns(UserWarning, match=f"{cache.path.name}.*rebuilding"):
        rebuilt = open_or_build(tmp_path, root, records, 64, 3)
    assert all(torch.equal(rebuilt.image(i), reference[i]) for i in range(len(records)))
    # another cache's file under this name: the header's key tells them apart
    other = open_or_build(tmp_path, root, records[:3], 64, 3)
    os.replace(other.path, rebuilt.path)
    with pytest.raises(PixelCacheError, match="key"):
        PixelCache.open(rebuilt.path, key, len(records), 64, 3)
    rebuilt.path.write_bytes(b"\0" * 5000)  # what an unfinished write looks like
    with pytest.raises(PixelCacheError, match="header"):
        PixelCache.open(rebuilt.path, key, len(records), 64, 3)


def test_a_failed_build_leaves_nothing_that_is_later_read(photos, tmp_path: Path):
    root, records = photos
    data = tmp_path / "data"
    data.mkdir()
    for r in records:
        (data / r.path).write_bytes((root / r.path).read_bytes())
    (data / records[3].path).write_bytes((root / records[3].path).read_bytes()[:300])  # a cut-off JPEG
    cache_dir = tmp_path / "cache"
    with pytest.raises(ValueError, match=records[3].path):
        open_or_build(cache_dir, data, records, 64, 3)
    assert sorted(p.name for p in cache_dir.iterdir()) == [cache_file(cache_dir, cache_key(data, records, 64, 3),
                                                                      64, 3).name + ".lock"]
    # a killed build's leftover is removed by the next build, never opened
    (data / records[3].path).write_bytes((root / records[3].path).read_bytes())
    final = cache_file(cache_dir, cache_key(data, records, 64, 3), 64, 3)
    leftover = final.with_name(f".{final.name}.999999.partial")
    leftover.write_bytes(b"KDPIXC01 half a cache")
    cache = open_or_build(cache_dir, data, records, 64, 3)
    assert cache.path == final and not leftover.exists()
    assert not list(cache_dir.glob("*.partial"))


def _build_in_child(args: tuple[Path, Path, list[Record]]) -> tuple[str, list[float]]:
    cache_dir, root, records = args
    cache = open_or_build(cache_dir, root, records, 64, 3)
    return str(cache.path), [float(cache.image(i).float().mean()) for i in range(len(records))]


def test_concurrent_builders_share_one_complete_file(photos, tmp_path: Path):
    root, records = photos
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_build_in_child, [(tmp_path, root, records)] * 2)
    assert results[0] == results[1]
    assert [p.name for p in tmp_path.glob("*.pixels")] == [Path(results[0][0]).name]
    assert not list(tmp_path.glob(".*.partial"))


# ------------------------------------------------------------------------------- views

def view_sets(root: Path, records: list[Record], cache_dir: Path) -> dict[str, IndexedImageDataset]:
    transform = build_transforms("imagenet", 48, None, True).sample
    return {
        "per item": IndexedImageDataset(root, records, 3, transform, preload=False, preload_size=64),
        "in memory": IndexedImageDataset(root, records, 3, transform, preload=True, preload_size=64),
        "pixel cache": IndexedImageDataset(root, records, 3, transform, preload=True, preload_size=64,
                                           cache_dir=cache_dir),
    }


def test_same_image_and_view_give_the_same_tensor_on_every_path_and_worker_count(photos, tmp_path: Path):
    root, records = photos
    sets = view_sets(root, records, tmp_path)
    assert sets["pixel cache"].pixel_cache is not None and sets["in memory"].pixel_cache is None
    seeds = make_view_seeds(7, len(records), 2)
    pairs = [(i, k) for i in range(len(records)) for k in range(2)]
    views = {name: AugmentedViews(data, seeds) for name, data in sets.items()}
    reference = [views["per item"][p][0] for p in pairs]
    assert reference[0].shape == (3, 48, 48) and not torch.equal(reference[0], reference[1])  # views differ
    for name, view in views.items():
        for _ in range(2):  # and again: the cache replays, nothing drifts
            assert all(torch.equal(view[p][0], ref) for p, ref in zip(pairs, reference)), name
    # through the training loader, in its worker processes: each item is (image, target, i, k)
    for workers in (0, 2):
        loader = make_loader(views["pixel cache"], 4, True, 3, Runtime(), num_workers=workers)
        seen = 0
        for images, _, positions, ks in loader:
            for image, i, k in zip(images, positions.tolist(), ks.tolist()):
                assert torch.equal(image, reference[pairs.index((i, k))]), (workers, i, k)
                seen += 1
        assert seen == len(records)


def test_gpu_batch_decoder_draws_the_cpu_imagenet_views_from_the_same_seeds(photos):
    """decode_jpeg_views on the CPU (the same code nvJPEG runs on CUDA, which this machine lacks):
    the crop box and flip of each (image, view) seed are those of the CPU ``imagenet`` preset, so
    with the same libjpeg the views are identical."""
    root, records = photos
    transform = build_transforms("imagenet", 48, None, True).sample
    seeds = [11, 12, 13, 14]
    chosen = records[:4]
    batch = decode_jpeg_views([bytes_of(root / r.path) for r in chosen], seeds, 48, device="cpu")
    assert batch.shape == (4, 3, 48, 48) and batch.dtype == torch.uint8
    for view, r, seed in zip(batch, chosen, seeds):
        with seeded(seed):
            expected = transform(load_image(root / r.path, 3))
        assert torch.equal(view, expected), r.path
    with pytest.raises(ValueError, match="one seed per image"):
        decode_jpeg_views([bytes_of(root / chosen[0].path)], [1, 2], 48, device="cpu")


# ------------------------------------------------------------------------------- the spec

def rgb_preset(**keys) -> dict:
    return {"layout": "imagefolder", "root": "/data/x", "image_size": 224, "channels": 3,
            "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2], "augment": "imagenet", **keys}


@pytest.mark.parametrize(("value", "expected"), [
    (200, "datasets.cub.preload_size = 200: expected null or at least image_size (224)"),
    (0, "datasets.cub.preload_size = 0: expected null or an integer >= 8"),
    ("256", "datasets.cub.preload_size = '256': expected null or an integer >= 8"),
    (True, "datasets.cub.preload_size = True: expected null or an integer >= 8"),
])
def test_bad_preload_size_is_refused_naming_the_values(value, expected):
    with pytest.raises(SchemaError) as err:
        parse(DatasetSpec, rgb_preset(preload_size=value), "datasets.cub.")
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems
    assert "200 px" in str(err.value) or value != 200


def test_preload_size_sets_train_and_eval_short_sides_and_keys_views():
    spec = parse(DatasetSpec, rgb_preset(preload_size=256))
    assert spec.short_side(224, True) == 256
    assert spec.short_side(224, False) == 256  # round(224 / 0.875): the eval transform's resize
    assert parse(DatasetSpec, rgb_preset(preload_size=448, eval_crop_pct=1.0)).short_side(448, False) == 448
    with pytest.raises(ValueError, match="preload_size 256 is smaller than the input size 288"):
        spec.short_side(288, True)
    plain = parse(DatasetSpec, rgb_preset())
    assert plain.short_side(224, True) is None and plain.short_side(224, False) is None
    # null is left out of the view key, so teacher caches keyed before the field existed stay valid
    assert "preload_size" not in plain.view_key(224)
    assert spec.view_key(224) == {**plain.view_key(224), "preload_size": 256}


def test_eval_views_from_the_cache_equal_the_full_size_path_where_no_dct_scale_applies(photos, tmp_path: Path):
    root, records = photos
    meta = DatasetMeta("p", str(root), ["a", "b"], 3, 48, [0.5] * 3, [0.2] * 3)
    index = DatasetIndex(meta, [Record(r.path, r.label, "test") for r in records])
    cached = parse(DatasetSpec, rgb_preset(image_size=48, preload=True, preload_size=64))
    full = parse(DatasetSpec, rgb_preset(image_size=48, preload=True))
    a = cached.load(index, "test", None, False, cache_dir=tmp_path)
    b = full.load(index, "test", None, False, cache_dir=tmp_path)
    assert a.pixel_cache is not None and a.pixel_cache.size == round(48 / 0.875) and b.pixel_cache is None
    for i, (w, h) in enumerate(SHAPES):
        if expected_scale(w, h, 55) == 1:  # no DCT reduction: one resize either way
            assert torch.equal(a[i][0], b[i][0]), records[i].path


def test_mnist_default_is_unchanged(tmp_path: Path):
    """The embedded MNIST preset (preload_size absent: null) loads the exported 28-px PNGs as
    they are: the same tensors as reading each file with PIL, held in memory, no pixel cache."""
    from kdlib.data.prepare import prepare_dataset

    preset = yaml.safe_load((REPO / "params.yaml").read_text())["datasets"]["mnist"]
    preset = {**preset, "root": str(REPO / "data" / "mnist"),
              "options": {"train_per_class": 2, "val_per_class": 1, "test_per_class": 5}}
    spec = parse(DatasetSpec, preset)
    assert spec.preload and spec.preload_size is None
    index = prepare_dataset(spec, "mnist", tmp_path / "prepared", split_seed=0)
    data = spec.load(index, "train", None, True, cache_dir=tmp_path / "cache")
    assert data.pixel_cache is None and data._cache is not None and not (tmp_path / "cache").exists()
    assert len(data) == 20
    for i, record in enumerate(index.split("train")):
        pixels = np.asarray(Image.open(Path(index.meta.root) / record.path))
        image, target, position = data[i]
        assert image.dtype == torch.uint8 and image.shape == (1, 28, 28)
        assert torch.equal(image[0], torch.from_numpy(pixels.copy())) and target == record.label and position == i


def test_preload_size_below_a_used_model_input_size_is_refused_before_any_work() -> None:
    from stages.params import ParamError, read_params, resolve

    params = read_params()
    params.update(dataset="cub200", student="deit")
    params["models"]["deit"]["input_size"] = 288
    with pytest.raises(ParamError, match=r"datasets.cub200.preload_size = 256: expected at least 288, the input size "
                                         r"of the student preset 'deit' \(or null\)"):
        resolve(params)
