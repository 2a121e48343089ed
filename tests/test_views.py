"""Replayable views (kdlib.data.views) and the seeded batch shift: seeds, RNG isolation, the
(index, view) sampler, the views themselves, and independence from the number of loader workers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from kdlib.data import IndexedImageDataset, Record, build_transforms
from kdlib.data.transforms import RandomShift
from kdlib.data.views import SEED_BITS, AugmentedViews, ViewSampler, make_view_seeds, seeded
from kdlib.runtime import Runtime, make_loader


def write_images(root: Path, count: int, size: int, channels: int) -> list[Record]:
    gen = torch.Generator().manual_seed(123)
    records = []
    for i in range(count):
        shape = (size, size) if channels == 1 else (size, size, 3)
        pixels = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels, mode="L" if channels == 1 else "RGB").save(root / f"{i}.png")
        records.append(Record(f"{i}.png", i % 3, "train"))
    return records


@pytest.fixture(scope="module")
def rgb_set(tmp_path_factory: pytest.TempPathFactory) -> IndexedImageDataset:
    """12 RGB 24-px images, the per-image "imagenet" preset (RandomResizedCrop + flip) to 16 px."""
    root = tmp_path_factory.mktemp("rgb")
    records = write_images(root, 12, 24, 3)
    augment = build_transforms("imagenet", 16, 24, True, {})
    return IndexedImageDataset(root, records, 3, augment.sample, preload=True, batch_transform=augment.batch)


@pytest.fixture(scope="module")
def gray_set(tmp_path_factory: pytest.TempPathFactory) -> IndexedImageDataset:
    """10 gray 16-px images with the batch-level "shift" preset (no per-image transform)."""
    root = tmp_path_factory.mktemp("gray")
    records = write_images(root, 10, 16, 1)
    augment = build_transforms("shift", 16, 16, True, {"shift_px": 2})
    return IndexedImageDataset(root, records, 1, augment.sample, preload=True, batch_transform=augment.batch)


# ------------------------------------------------------------------------------- seeds

def test_view_seeds_are_deterministic_per_seed_and_differ_across_seeds():
    a, b = make_view_seeds(0, 50, 4), make_view_seeds(0, 50, 4)
    assert a.shape == (50, 4) and a.dtype == torch.int64
    assert torch.equal(a, b)
    c = make_view_seeds(1, 50, 4)
    assert not torch.equal(a, c)
    assert (a != c).float().mean() > 0.99  # not just one entry: a different table
    big = make_view_seeds(3, 2000, 5)
    assert int(big.min()) >= 0 and int(big.max()) < 2**SEED_BITS
    assert SEED_BITS == 62
    assert int(big.max()) > 2**61  # the whole range is used, not a small corner of it
    assert big.unique().numel() == big.numel()  # no two views share a seed
    with pytest.raises(ValueError, match="num_views"):
        make_view_seeds(0, 3, 0)


def test_seeded_restores_the_callers_rng_stream():
    torch.manual_seed(42)
    expected = torch.rand(5)
    torch.manual_seed(42)
    with seeded(7):
        inside = torch.rand(100)  # would advance the stream without the fork
    after = torch.rand(5)
    assert torch.equal(after, expected)
    with seeded(7):
        again = torch.rand(100)
    assert torch.equal(inside, again)  # the block sees the stream of its own seed
    with seeded(8):
        other = torch.rand(100)
    assert not torch.equal(inside, other)


def test_seeded_transform_is_replayable(rgb_set):
    image = rgb_set.image(0)
    transform = rgb_set.transform
    with seeded(1234):
        first = transform(image)
    torch.manual_seed(999)  # the global state must not matter
    with seeded(1234):
        second = transform(image)
    assert first.shape == (3, 16, 16) and first.dtype == torch.uint8
    assert torch.equal(first, second)
    outputs = []
    for s in range(5):
        with seeded(s):
            outputs.append(transform(image))
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])


# ----------------------------------------------------------------------------- sampler

def test_view_sampler_keeps_the_random_sampler_order_and_cycles_views():
    n, k, seed = 17, 3, 5
    plain = RandomSampler(range(n), generator=torch.Generator().manual_seed(seed))
    sampler = ViewSampler(RandomSampler(range(n), generator=torch.Generator().manual_seed(seed)), k)
    assert len(sampler) == n
    for epoch in range(7):  # auto-increment: one epoch per iteration
        pairs = list(sampler)
        assert [i for i, _ in pairs] == list(plain)
        assert {v for _, v in pairs} == {epoch % k}
    # set_epoch picks the view explicitly (and does not auto-advance)
    sampler = ViewSampler(SequentialSampler(range(n)), k)
    for epoch in (4, 4, 0, 5, 2):
        sampler.set_epoch(epoch)
        pairs = list(sampler)
        assert pairs == [(i, epoch % k) for i in range(n)]
    # after an explicit epoch, a plain iteration continues from that epoch
    sampler.set_epoch(1)
    list(sampler)
    assert {v for _, v in sampler} == {1 % k}
    assert {v for _, v in sampler} == {2 % k}


def test_make_loader_order_is_a_permutation_seeded_by_seed_plus_epoch(gray_set):
    """The order is ``randperm(N)`` of a generator seeded with seed + epoch (DistributedSampler's),
    whatever the number of workers: nothing else advances it, so a resumed run needs only the epoch."""
    seed, epochs = 11, 4
    views = AugmentedViews(gray_set, make_view_seeds(0, len(gray_set), 2))
    ours = make_loader(views, 4, True, seed, Runtime())
    for epoch in range(epochs):
        ours.sampler.set_epoch(epoch)
        got = [(b[2].tolist(), b[3].tolist()) for b in ours]
        want = torch.randperm(len(gray_set), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        assert sum((p for p, _ in got), []) == want
        assert all(set(v) == {epoch % 2} for _, v in got)


def test_two_ranks_split_each_global_batch_of_one_process(gray_set):
    """Rank r of P takes every P-th index of the same permutation: step by step, the P ranks'
    batches of B together hold the images of one process's batch of P·B."""
    views = AugmentedViews(gray_set, make_view_seeds(0, len(gray_set), 1))
    single = make_loader(views, 2, True, 5, Runtime())
    ranks = [make_loader(views, 1, True, 5, Runtime(rank=r, world_size=2)) for r in range(2)]
    for loader in (single, *ranks):
        loader.sampler.set_epoch(3)
    one = [sorted(b[2].tolist()) for b in single]
    two = [sorted(a[2].tolist() + b[2].tolist()) for a, b in zip(*ranks)]
    assert len(gray_set) % 2 == 0 and len(one) == 5 and one == two


def test_validation_is_never_sharded(gray_set):
    loader = make_loader(gray_set, 3, False, 0, Runtime(rank=1, world_size=2))
    assert sum((b[2].tolist() for b in loader), []) == list(range(len(gray_set)))


# ------------------------------------------------------------------------------- views

def test_augmented_views_are_pure_functions_of_image_and_view(rgb_set):
    seeds = make_view_seeds(0, len(rgb_set), 4)
    views = AugmentedViews(rgb_set, seeds)
    assert views.num_views == 4 and len(views) == len(rgb_set)
    image, target, position, view = views[(3, 2)]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
    assert target == rgb_set.target(3) and position == 3 and view == 2
    torch.manual_seed(0)
    again = views[(3, 2)][0]
    torch.manual_seed(1)
    assert torch.equal(views[(3, 2)][0], again) and torch.equal(image, again)
    # a fresh wrapper with the same seeds rebuilds the same view
    assert torch.equal(AugmentedViews(rgb_set, seeds.clone())[(3, 2)][0], image)
    # other views of the same image differ (RandomResizedCrop + flip)
    others = [views[(3, k)][0] for k in (0, 1, 3)]
    assert all(not torch.equal(image, o) for o in others)
    # the view is the one the seed makes: the per-image transform under seeds[i, k]
    with seeded(int(seeds[5, 1])):
        direct = rgb_set.transform(rgb_set.image(5))
    assert torch.equal(views[(5, 1)][0], direct)
    assert torch.equal(views.batch_seeds(torch.tensor([5, 3]), torch.tensor([1, 2])),
                       torch.stack([seeds[5, 1], seeds[3, 2]]))
    with pytest.raises(ValueError, match="view seeds must have shape"):
        AugmentedViews(rgb_set, make_view_seeds(0, len(rgb_set) + 1, 2))


# --------------------------------------------------------------------------- RandomShift

def test_seeded_random_shift_is_a_zero_padded_crop_at_its_offsets():
    p = 3
    shift = RandomShift(p)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (32, 2, 12, 10), generator=gen, dtype=torch.uint8)
    seeds = make_view_seeds(9, 32, 1)[:, 0]
    out = shift(images, seeds)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, shift(images, seeds.clone()))
    torch.manual_seed(5)
    assert torch.equal(out, shift(images, seeds))  # global RNG irrelevant with seeds
    top, left = shift.offsets(seeds)
    for b in range(len(images)):
        padded = F.pad(images[b], (p, p, p, p))
        crop = padded[:, int(top[b]):int(top[b]) + 12, int(left[b]):int(left[b]) + 10]
        assert torch.equal(out[b], crop), b
    # a batch member's shift depends only on its own seed, not on the rest of the batch
    assert torch.equal(shift(images[5:9], seeds[5:9]), out[5:9])
    # different seeds move images: at least some differ from the unshifted image
    assert any(not torch.equal(out[b], images[b]) for b in range(len(images)))


def test_shift_offsets_cover_the_range_uniformly():
    p = 2
    shift = RandomShift(p)
    seeds = make_view_seeds(0, 20000, 1)[:, 0]
    top, left = shift.offsets(seeds)
    span = 2 * p + 1
    for offsets in (top, left):
        assert int(offsets.min()) == 0 and int(offsets.max()) == 2 * p
        counts = torch.bincount(offsets, minlength=span).float()
        expected = len(seeds) / span
        assert ((counts - expected).abs() / expected).max() < 0.05, counts
    # top and left are not tied to each other: every pair occurs, about equally often
    pairs = torch.bincount(top * span + left, minlength=span * span).float()
    expected = len(seeds) / span**2
    assert ((pairs - expected).abs() / expected).max() < 0.15, pairs


def _epochs(views: AugmentedViews, workers: int, epochs: int = 3) -> list[tuple[torch.Tensor, ...]]:
    loader = make_loader(views, 5, True, 21, Runtime(), num_workers=workers)
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out += [tuple(t.clone() for t in (b[0], b[2], b[3])) for b in loader]
    return out


def test_augmentation_does_not_depend_on_the_number_of_workers(rgb_set):
    """Every (image, view) comes out identical whichever worker process built it."""
    views = AugmentedViews(rgb_set, make_view_seeds(4, len(rgb_set), 3))

    def by_view(batches: list[tuple[torch.Tensor, ...]]) -> dict[tuple[int, int], torch.Tensor]:
        return {(int(p), int(v)): img for images, positions, view_ids in batches
                for img, p, v in zip(images, positions, view_ids)}

    single, multi = by_view(_epochs(views, 0)), by_view(_epochs(views, 2))
    assert set(single) == set(multi) == {(i, k) for i in range(len(rgb_set)) for k in range(3)}
    for key in single:
        assert torch.equal(single[key], multi[key]), key
    # the views of one image do differ from one another
    assert not torch.equal(single[(0, 0)], single[(0, 1)])
    # and a plain (non-random-order) loader gives the same batches with 0 and 2 workers
    def plain(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(views, batch_size=5, sampler=ViewSampler(SequentialSampler(views), 3),
                            num_workers=workers)
        return [b[0] for _ in range(3) for b in loader]

    assert all(torch.equal(a, b) for a, b in zip(plain(0), plain(2)))


def test_loader_batches_do_not_depend_on_the_number_of_workers(rgb_set):
    views = AugmentedViews(rgb_set, make_view_seeds(4, len(rgb_set), 3))
    single, multi = _epochs(views, 0), _epochs(views, 2)
    assert len(single) == len(multi) == 3 * 3
    for a, b in zip(single, multi):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
