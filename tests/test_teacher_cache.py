"""The teacher-output cache: cached outputs (logits, features, intermediate layers) equal the online
teacher's on the replayed view, top-k compression keeps the tail mass, atomic save/load, the key refuses
a stale cache, and the marker of a cache left unbuilt serves its own run only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import Tensor

from kdlib.checkpoint import save_checkpoint
from kdlib.data import BatchNormalizer, IndexedImageDataset, Record, build_transforms
from kdlib.data.views import AugmentedViews, make_view_seeds
from kdlib.losses.kd import kd_loss, soft_kl
from kdlib.models import build_model
from kdlib.teacher import OnlineTeacher
from kdlib.teacher_cache import (
    CachedTeacher,
    CacheMismatch,
    TeacherCache,
    build_teacher_cache,
    cache_key,
    compress_topk,
    expand_topk,
    layer_table_bytes,
    save_skipped,
    skipped_reason,
)

NUM_VIEWS = 3
FP16 = dict(rtol=2e-3, atol=2e-3)  # float16 storage: 2^-11 relative rounding, plus batch-size rounding


def write_images(root: Path, count: int, size: int, channels: int, seed: int) -> list[Record]:
    gen = torch.Generator().manual_seed(seed)
    records = []
    for i in range(count):
        shape = (size, size) if channels == 1 else (size, size, 3)
        pixels = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels, mode="L" if channels == 1 else "RGB").save(root / f"{i}.png")
        records.append(Record(f"{i}.png", i % 10, "train"))
    return records


class Setup:
    """A training set with its views, normalizer and a (randomly initialized) teacher."""

    def __init__(self, root: Path, records: list[Record], channels: int, preset: str, image_size: int,
                 stored: int, options: dict, num_classes: int = 10, teacher_kwargs: dict | None = None,
                 features: bool = True) -> None:
        augment = build_transforms(preset, image_size, stored, True, options)
        self.train = IndexedImageDataset(root, records, channels, augment.sample, preload=True,
                                         batch_transform=augment.batch)
        self.views = AugmentedViews(self.train, make_view_seeds(7, len(records), NUM_VIEWS))
        self.mean, self.std = [0.5] * channels, [0.25] * channels
        self.normalizer = BatchNormalizer(self.mean, self.std)
        torch.manual_seed(0)
        self.model = build_model("cnn_small", num_classes, channels)
        with torch.no_grad():  # spread the logits: a random head gives nearly uniform softmax
            self.model.fc.weight.mul_(20.0)
        self.teacher = OnlineTeacher(self.model, features=features, **(teacher_kwargs or {}))

    def replay(self, i: int, k: int) -> Tensor:
        """View (i, k) rebuilt independently of the cache: exactly what the training loop does."""
        image, _, pos, view = self.views[(i, k)]
        batch = image.unsqueeze(0)
        if self.train.batch_transform is not None:
            batch = self.train.batch_transform(batch, self.views.seeds[[pos]][:, [view]].view(1))
        return self.normalizer(batch)

    def build(self, **kwargs) -> TeacherCache:
        kwargs.setdefault("key", {"views": str(NUM_VIEWS)})
        return build_teacher_cache(self.teacher, self.views, self.normalizer, torch.device("cpu"),
                                   batch_size=kwargs.pop("batch_size", 8), progress=False, **kwargs)


@pytest.fixture(scope="module")
def gray(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """MNIST-like: 1 channel, 16 px, the batched ``shift`` transform (seeded per image)."""
    root = tmp_path_factory.mktemp("gray")
    return Setup(root, write_images(root, 20, 16, 1, 0), 1, "shift", 16, 16, {"shift_px": 2})


@pytest.fixture(scope="module")
def rgb(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """3 channels, 24 px stored, per-image ``imagenet`` transform (RandomResizedCrop + flip) to
    16 px; the teacher renormalizes (other mean/std) and resizes to 20 px like a real one may."""
    root = tmp_path_factory.mktemp("rgb")
    setup = Setup(root, write_images(root, 12, 24, 3, 1), 3, "imagenet", 16, 24, {})
    setup.teacher = OnlineTeacher(setup.model, input_size=20, student_stats=(setup.mean, setup.std),
                                  teacher_stats=([0.4, 0.45, 0.5], [0.2, 0.22, 0.24]), features=True)
    return setup


@pytest.fixture(scope="module")
def gray_cache(gray: Setup) -> TeacherCache:
    return gray.build()


@pytest.fixture(scope="module")
def rgb_cache(rgb: Setup) -> TeacherCache:
    return rgb.build(batch_size=5)


PAIRS = [(0, 0), (3, 1), (7, 2), (19, 0), (11, 2)]


@pytest.mark.parametrize("which", ["gray", "rgb"])
def test_cached_outputs_equal_the_online_teacher_on_the_replayed_view(which, request):
    setup: Setup = request.getfixturevalue(which)
    cache: TeacherCache = request.getfixturevalue(f"{which}_cache")
    pairs = [(i % cache.num_images, k) for i, k in PAIRS]
    positions, views = torch.tensor([i for i, _ in pairs]), torch.tensor([k for _, k in pairs])
    images = torch.cat([setup.replay(i, k) for i, k in pairs])
    online = setup.teacher(images, positions, views)
    cached = CachedTeacher(cache, torch.device("cpu"), features=True)(images, positions, views)
    assert cached.logits.dtype == torch.float32 and cached.logits.shape == online.logits.shape
    torch.testing.assert_close(cached.logits, online.logits, rtol=1e-5, atol=1e-5)  # exact float32
    torch.testing.assert_close(cached.features, online.features, **FP16)
    # the distillation loss from the cache equals the online one
    student = torch.randn(len(pairs), 10, generator=torch.Generator().manual_seed(3)) * 3
    targets = torch.tensor([setup.train.target(i) for i, _ in pairs])
    for temperature in (1.0, 4.0):
        torch.testing.assert_close(soft_kl(student, cached.logits, temperature),
                                   soft_kl(student, online.logits, temperature), **FP16)
    torch.testing.assert_close(kd_loss(student, cached.logits, targets, 4.0, 0.9),
                               kd_loss(student, online.logits, targets, 4.0, 0.9), **FP16)
    # a feature-mimicking loss (MSE to the teacher's features) agrees to float16 precision too
    feats = torch.randn_like(online.features)
    torch.testing.assert_close(torch.nn.functional.mse_loss(feats, cached.features),
                               torch.nn.functional.mse_loss(feats, online.features), **FP16)


def test_views_differ_and_replay_identically(gray: Setup, rgb: Setup, gray_cache: TeacherCache,
                                             rgb_cache: TeacherCache):
    for setup, cache in ((gray, gray_cache), (rgb, rgb_cache)):
        assert torch.equal(cache.seeds, setup.views.seeds)
        distinct_images = 0
        for i in range(4):
            rebuilt = [setup.replay(i, k) for k in range(NUM_VIEWS)]
            assert all(torch.equal(v, setup.replay(i, k)) for k, v in enumerate(rebuilt))  # replayable
            distinct_images += len({v.numpy().tobytes() for v in rebuilt}) > 1
            logits = cache.logits(torch.full((NUM_VIEWS,), i), torch.arange(NUM_VIEWS))
            assert not torch.equal(logits[0], logits[1]) or not torch.equal(logits[0], logits[2])
        assert distinct_images == 4  # augmentation really happens


def test_build_is_deterministic_across_batch_sizes_and_workers(gray: Setup, gray_cache: TeacherCache):
    other = gray.build(batch_size=7, num_workers=2)
    torch.testing.assert_close(other.exact_logits, gray_cache.exact_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other.feature_table.float(), gray_cache.feature_table.float(), **FP16)


@pytest.fixture(scope="module")
def hundred(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("hundred")
    return Setup(root, write_images(root, 10, 16, 1, 2), 1, "shift", 16, 16, {"shift_px": 2},
                 num_classes=100, features=False)


def test_topk_keeps_the_top_entries_and_the_tail_mass(hundred: Setup):
    exact = hundred.build()
    compressed = hundred.build(topk=10)
    assert exact.topk is None and compressed.topk == 10 and compressed.num_classes == 100
    assert compressed.top_values.dtype == torch.float16 and compressed.top_indices.dtype == torch.int16
    assert compressed.fill.dtype == torch.float32 and compressed.top_values.shape == (10, NUM_VIEWS, 10)
    assert compressed.nbytes < exact.nbytes / 5
    positions = torch.arange(10).repeat(NUM_VIEWS)
    views = torch.arange(NUM_VIEWS).repeat_interleave(10)
    z, z_hat = exact.logits(positions, views), compressed.logits(positions, views)
    top = z.topk(10, dim=1).indices
    assert torch.equal(torch.sort(compressed.top_indices[positions, views].long(), dim=1).values,
                       torch.sort(top, dim=1).values)
    torch.testing.assert_close(z_hat.gather(1, top), z.gather(1, top), rtol=1e-3, atol=0)  # float16
    p, p_hat = z.softmax(1), z_hat.softmax(1)
    tail = torch.ones_like(p, dtype=torch.bool).scatter_(1, top, False)
    assert (p * tail).sum(1).min() > 1e-3  # the tail is not negligible, so the check means something
    torch.testing.assert_close((p_hat * tail).sum(1), (p * tail).sum(1), rtol=5e-3, atol=1e-6)
    torch.testing.assert_close(p_hat.gather(1, top), p.gather(1, top), rtol=5e-3, atol=1e-6)
    # the tail is uniform: every non-top-k class holds the same fill
    tail_logits = torch.where(tail, z_hat, float("nan"))
    assert torch.equal(tail_logits.nan_to_num(float("-inf")).amax(1), tail_logits.nan_to_num(float("inf")).amin(1))
    # the distillation targets on the kept classes are the teacher's (the KL itself differs by
    # the tail's lost detail: it is uniform now, as FKD's marginal smoothing intends)
    torch.testing.assert_close(z_hat.softmax(1) * ~tail, z.softmax(1) * ~tail, rtol=5e-3, atol=1e-6)
    # topk >= C or None: exact float32
    for k in (None, 100, 500):
        full = hundred.build(topk=k)
        assert full.topk is None and full.exact_logits.dtype == torch.float32
        torch.testing.assert_close(full.logits(positions, views), z, rtol=1e-5, atol=1e-5)


def test_topk_fill_is_stable_and_wide_indices():
    z = torch.tensor([[1000.0, 990.0, 980.0, 970.0, 960.0]])
    values, indices, fill = compress_topk(z, 2)
    assert torch.isfinite(fill).all()
    expected = torch.logsumexp(z[0, 2:], 0) - torch.log(torch.tensor(3.0))
    torch.testing.assert_close(fill[0], expected)
    torch.testing.assert_close(expand_topk(values, indices, fill, 5).softmax(1)[0, 2:].sum(),
                               z.softmax(1)[0, 2:].sum(), rtol=1e-3, atol=1e-6)
    _, wide, _ = compress_topk(torch.randn(2, 40000), 5)
    assert wide.dtype == torch.int32
    _, narrow, _ = compress_topk(torch.randn(2, 32767), 5)
    assert narrow.dtype == torch.int16
    with pytest.raises(ValueError, match="float16"):
        compress_topk(torch.tensor([[1e6, 0.0, 1.0]]), 1)


def test_save_load_roundtrip_mmap_and_lsh(gray_cache: TeacherCache, tmp_path: Path):
    gray_cache.set_lsh(torch.randn(16), {"num_hyperplanes": 16, "sigma": 1.5, "seed": 3, "bias_mode": "median"})
    try:
        target = tmp_path / "teacher_cache"
        gray_cache.save(target)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher_cache"]  # no .partial / .old
        assert sorted(p.name for p in target.iterdir()) == ["cache.json", "teacher_outputs.pt"]
        meta = json.loads((target / "cache.json").read_text())
        assert meta["num_images"] == 20 and meta["num_views"] == NUM_VIEWS and meta["compression"]["kind"] == "none"
        assert meta["total_bytes"] == gray_cache.nbytes
        assert meta["tensors"]["features"] == {"shape": [20, NUM_VIEWS, 64], "dtype": "float16",
                                               "bytes": 20 * NUM_VIEWS * 64 * 2}
        for mmap in (True, False):
            loaded = TeacherCache.load(target, expected_key=gray_cache.key, mmap=mmap)
            assert loaded.tensors().keys() == gray_cache.tensors().keys()
            for name, t in gray_cache.tensors().items():
                assert torch.equal(loaded.tensors()[name], t), name
            assert loaded.lsh_meta == gray_cache.lsh_meta and loaded.nbytes == gray_cache.nbytes
        # overwriting an existing cache is atomic too
        gray_cache.save(target)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher_cache"]
    finally:
        gray_cache._lsh_bias = gray_cache._lsh_meta = None  # the fixture is shared


def test_failed_save_leaves_nothing_and_keeps_the_old_cache(gray_cache: TeacherCache, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    target = tmp_path / "cache"
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", broken_save)
        with pytest.raises(OSError, match="disk full"):
            gray_cache.save(target)
    assert list(tmp_path.iterdir()) == []
    gray_cache.save(target)
    before = (target / "teacher_outputs.pt").read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", broken_save)
        with pytest.raises(OSError):
            gray_cache.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert (target / "teacher_outputs.pt").read_bytes() == before
    TeacherCache.load(target)


def test_missing_or_corrupt_files_are_named(gray_cache: TeacherCache, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TeacherCache.load(tmp_path / "nowhere")
    target = tmp_path / "c"
    gray_cache.save(target)
    data = (target / "teacher_outputs.pt").read_bytes()
    (target / "teacher_outputs.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="teacher_outputs.pt is corrupt"):
        TeacherCache.load(target)
    (target / "cache.json").write_text("{not json")
    with pytest.raises(ValueError, match="cache.json is corrupt"):
        TeacherCache.load(target)
    (target / "cache.json").unlink()
    with pytest.raises(FileNotFoundError, match="cache.json is missing"):
        TeacherCache.load(target)


@pytest.fixture()
def key_files(tmp_path: Path) -> dict:
    ckpt = tmp_path / "teacher.pt"
    save_checkpoint(ckpt, build_model("cnn_small", 10, 1), {"arch": "cnn_small"})
    index, meta = tmp_path / "index.csv", tmp_path / "dataset.json"
    index.write_text("path,label,split,md5\n0.png,0,train,abc\n")
    meta.write_text(json.dumps({"name": "toy", "classes": ["a"]}))
    transform = {"preset": "shift", "options": {"shift_px": 2}, "image_size": 16, "mean": [0.5], "std": [0.25]}
    return {"teacher_checkpoint": ckpt, "data_files": [index, meta], "transform": transform,
            "num_views": NUM_VIEWS, "seed": 7}


def small_cache(key: dict[str, str]) -> TeacherCache:
    return TeacherCache(make_view_seeds(7, 4, NUM_VIEWS), 5, key, exact_logits=torch.randn(4, NUM_VIEWS, 5))


def test_cache_key_components(key_files: dict):
    key = cache_key(**key_files)
    assert set(key) == {"teacher", "data", "transform", "views", "seed"}
    assert len(key["teacher"]) == 64 and len(key["data"]) == 64
    assert key["views"] == "3" and key["seed"] == "7"
    # canonical: key order and tuple/list do not matter
    reordered = dict(reversed(list(key_files["transform"].items())), mean=(0.5,))
    assert cache_key(**{**key_files, "transform": reordered}) == key
    # the data digest sees the file order and where bytes fall between files
    index, meta = key_files["data_files"]
    assert cache_key(**{**key_files, "data_files": [meta, index]})["data"] != key["data"]
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        cache_key(**{**key_files, "data_files": [index.with_name("missing.csv")]})


def test_load_checks_every_key_component(key_files: dict, tmp_path: Path):
    key = cache_key(**key_files)
    target = tmp_path / "cache"
    small_cache(key).save(target)
    assert TeacherCache.load(target, expected_key=cache_key(**key_files)).key == key

    other_ckpt = tmp_path / "teacher2.pt"
    torch.manual_seed(1)
    save_checkpoint(other_ckpt, build_model("cnn_small", 10, 1), {"arch": "cnn_small"})
    other_index = tmp_path / "index2.csv"
    other_index.write_text("path,label,split,md5\n0.png,1,train,abc\n")
    changes = {
        "teacher sha256": {"teacher_checkpoint": other_ckpt},
        "data sha256": {"data_files": [other_index, key_files["data_files"][1]]},
        "transform": {"transform": {**key_files["transform"], "options": {"shift_px": 3}}},
        "number of views": {"num_views": 5},
        "view seed": {"seed": 8},
    }
    for component, change in changes.items():
        expected = cache_key(**{**key_files, **change})
        with pytest.raises(CacheMismatch, match=component) as err:
            TeacherCache.load(target, expected_key=expected)
        message = str(err.value)
        assert str(target) in message and "dvc repro teacher_cache" in message
        assert message.count("but distillation uses") == 1  # only the changed component
    with pytest.raises(CacheMismatch) as err:
        TeacherCache.load(target, expected_key=cache_key(**{**key_files, "teacher_checkpoint": other_ckpt}))
    assert f"teacher sha256 {key['teacher'][:12]}… but distillation uses" in str(err.value)
    with pytest.raises(CacheMismatch) as err:
        TeacherCache.load(target, expected_key=cache_key(**{**key_files, **changes["transform"], "seed": 9}))
    message = str(err.value)
    assert 'options: {"shift_px": 2} → {"shift_px": 3}' in message and "view seed 7 but distillation uses 9" in message
    assert isinstance(err.value, ValueError)


def test_cached_teacher_returns_device_tensors(gray_cache: TeacherCache, hundred: Setup):
    device = torch.device("cpu")
    teacher = CachedTeacher(gray_cache, device, features=True)
    assert teacher.features
    out = teacher(torch.zeros(4, 1, 16, 16), torch.tensor([0, 1, 2, 3]), torch.tensor([2, 1, 0, 2]))
    assert out.logits.shape == (4, 10) and out.logits.device == device and out.logits.dtype == torch.float32
    assert out.features.shape == (4, 64) and out.features.dtype == torch.float32
    assert CachedTeacher(gray_cache, device, features=False)(None, torch.tensor([0]), torch.tensor([0])).features is None
    with pytest.raises(ValueError, match="positions"):
        teacher(torch.zeros(1, 1, 16, 16))
    without = hundred.build(topk=10)
    assert without.feature_table is None
    with pytest.raises(ValueError, match="without them"):
        CachedTeacher(without, device, features=True)
    with pytest.raises(ValueError, match="no features"):
        without.features(torch.tensor([0]), torch.tensor([0]))
    logits = CachedTeacher(without, device, features=False)(None, torch.tensor([1, 2]), torch.tensor([0, 2])).logits
    assert logits.shape == (2, 100) and logits.dtype == torch.float32


# ------------------------------------------------------------------ intermediate layers

LAYERS = ("features.6", "features.10:input", "pre_logits")  # a stage, a module's input, the pooled pre-logits


def test_cached_layers_equal_the_online_teacher_taps(gray: Setup, tmp_path: Path):
    """The outputs of the layers a feature-map method reads, cached (float16) under their paths and the
    key's ``layers``, equal the tapped online teacher's on the replayed views; ``cache.json`` describes
    them, reloading keeps them, and a cache of other layers is refused."""
    teacher = OnlineTeacher(gray.model)
    teacher.tap(LAYERS)
    try:
        key = {"views": str(NUM_VIEWS), "layers": json.dumps(list(LAYERS), separators=(",", ":"))}
        with pytest.raises(ValueError, match="must say which layers"):  # a key that does not name them
            build_teacher_cache(teacher, gray.views, gray.normalizer, torch.device("cpu"), 8, {"views": "3"},
                                progress=False)
        cache = build_teacher_cache(teacher, gray.views, gray.normalizer, torch.device("cpu"), 7, key, progress=False)
        assert cache.layer_paths == LAYERS and cache.layer_shapes == ((64, 8, 8), (64, 4, 4), (64,))
        assert all(t.dtype == torch.float16 for t in cache.layer_tables)
        pairs = [(i % cache.num_images, k) for i, k in PAIRS]
        positions, views = torch.tensor([i for i, _ in pairs]), torch.tensor([k for _, k in pairs])
        online = teacher(torch.cat([gray.replay(i, k) for i, k in pairs]), positions, views)
        cached = CachedTeacher(cache, torch.device("cpu"), layers=LAYERS)(None, positions, views)
        assert cached.features is None and len(cached.layers) == len(online.layers) == 3
        for path, a, b in zip(LAYERS, cached.layers, online.layers):
            assert a.dtype == torch.float32 and a.shape == b.shape, path
            torch.testing.assert_close(a, b, **FP16)
        torch.testing.assert_close(cached.logits, online.logits, rtol=1e-5, atol=1e-5)

        target = tmp_path / "cache"
        cache.save(target)
        meta = json.loads((target / "cache.json").read_text())
        per_view = [64 * 8 * 8, 64 * 4 * 4, 64]
        assert meta["layers"] == [{"path": p, "tensor": f"layer_{i}", "shape": list(s), "dtype": "float16",
                                   "bytes": 20 * NUM_VIEWS * n * 2}
                                  for i, (p, s, n) in enumerate(zip(LAYERS, cache.layer_shapes, per_view))]
        assert meta["layer_bytes"] == layer_table_bytes(cache.layer_shapes, 20, NUM_VIEWS) == 20 * 3 * sum(per_view) * 2
        assert meta["total_bytes"] == cache.nbytes
        loaded = TeacherCache.load(target, expected_key=key)
        assert loaded.layer_paths == LAYERS
        for a, b in zip(loaded.layer_tables, cache.layer_tables):
            assert torch.equal(a, b)
        # a method reading other layers is refused, by the key and by the cached teacher itself
        other = {**key, "layers": json.dumps(["features.6"], separators=(",", ":"))}
        with pytest.raises(CacheMismatch, match=r'teacher layers \["features.6","features.10:input","pre_logits"\] but '
                                                r'distillation uses \["features.6"\]'):
            TeacherCache.load(target, expected_key=other)
        with pytest.raises(CacheMismatch, match="holds the teacher layers features.6, features.10:input, pre_logits "
                                                "but distillation reads features.6;"):
            CachedTeacher(loaded, torch.device("cpu"), layers=["features.6"])
        with pytest.raises(CacheMismatch, match="teacher layers"):  # a cache of no layers, for a layer method
            TeacherCache.load(target, expected_key={"views": str(NUM_VIEWS)})
    finally:
        teacher.taps.remove()  # the model is the module's fixture: leave no hooks on it
    # a teacher layer paired with two student layers is cached once and answered twice
    twice = LAYERS + ("features.6",)
    teacher.tap(twice)
    try:
        again = build_teacher_cache(teacher, gray.views, gray.normalizer, torch.device("cpu"), 8, key, progress=False)
        assert again.layer_paths == LAYERS
        online = teacher(torch.cat([gray.replay(i, k) for i, k in pairs]), positions, views)
        cached = CachedTeacher(again, torch.device("cpu"), layers=twice)(None, positions, views)
        assert len(cached.layers) == len(online.layers) == 4 and torch.equal(cached.layers[3], cached.layers[0])
        for a, b in zip(cached.layers, online.layers):
            torch.testing.assert_close(a, b, **FP16)
    finally:
        teacher.taps.remove()


def test_a_skipped_cache_marker_serves_its_run_only(tmp_path: Path):
    target = tmp_path / "cache"
    assert skipped_reason(target) is None  # nothing there: loading says what is missing
    save_skipped(target, "too big", {"views": "2", "layers": '["layer3"]'})
    assert json.loads((target / "cache.json").read_text()) == {"enabled": False, "reason": "too big",
                                                               "key": {"views": "2", "layers": '["layer3"]'}}
    assert skipped_reason(target, {"views": "2", "layers": '["layer3"]'}) == "too big"
    with pytest.raises(CacheMismatch, match="number of views 2 but distillation uses 3"):
        skipped_reason(target, {"views": "3", "layers": '["layer3"]'})
    (target / "cache.json").write_text('{"enabled": false}')  # teacher_cache.enabled: false writes no key
    assert skipped_reason(target, {"views": "2"}) is None
    with pytest.raises(FileNotFoundError, match="teacher_outputs.pt is missing"):
        TeacherCache.load(target)
