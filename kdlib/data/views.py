"""Augmented views as a pure function of (image, view): every random augmentation is replayable.

Training draws, for image ``i`` in epoch ``e``, the view ``k = e mod K`` whose randomness comes
only from ``seeds[i, k]`` (a ``(N, K)`` table made once from the run's seed). The per-image
transform runs under that seed (:func:`seeded`), and batch-level augmentation derives its
parameters from the same seeds (:class:`kdlib.data.transforms.RandomShift`). So a view can be
rebuilt anywhere: in another process, in another epoch, with any number of loader workers, and
by the teacher-output cache, which stores the seeds of the views it ran the teacher on and has
the student replay exactly those (as FKD does with its stored crop boxes and flips; here the
seed rebuilds every parameter of any preset, RandAugment included).

With ``K`` equal to the number of epochs each epoch sees a fresh view, as with an unseeded
pipeline; with a smaller ``K`` (a cache of ``K`` views) views repeat every ``K`` epochs.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

SEED_BITS = 62  # seeds stay positive in int64 and leave bit room for derived values


_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer (Steele et al., OOPSLA 2014): a bijection of uint64 that scrambles
    every input bit into every output bit (arithmetic wraps modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    return z ^ (z >> np.uint64(31))


def make_view_seeds(seed: int, num_images: int, num_views: int) -> Tensor:
    """``(num_images, num_views)`` int64 table of view seeds in ``[0, 2**62)``.

    Entry ``(i, k)`` is a hash of ``(seed, i, k)`` alone, so view ``k`` of image ``i`` is the
    same whatever the number of views: a cache of ``K`` views holds exactly the first ``K`` views
    of an uncached run with the same seed.
    """
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    with np.errstate(over="ignore"):
        images = np.arange(num_images, dtype=np.uint64)[:, None]
        views = np.arange(num_views, dtype=np.uint64)[None, :]
        key = _splitmix64(np.uint64(seed & (2**64 - 1)) * np.uint64(_GOLDEN) + images)
        mixed = _splitmix64(key + views * np.uint64(_GOLDEN))
    return torch.from_numpy((mixed >> np.uint64(64 - SEED_BITS)).astype(np.int64))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded by ``seed``, restoring it afterwards, so a
    seeded view never disturbs the caller's random stream (dropout, weight init...)."""
    with torch.random.fork_rng(devices=[]):
        # only the CPU generator: torch.manual_seed would also reseed CUDA's, which fork_rng
        # with devices=[] does not restore, and the GPU's dropout would then follow the views
        torch.default_generator.manual_seed(seed)
        yield


class ViewSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, view)`` pairs: the order of ``base`` with view ``epoch mod num_views``.

    The epoch advances at each new iteration (one per training epoch), or is set with
    :meth:`set_epoch`, which is forwarded to ``base`` (e.g. a ``DistributedSampler``).
    """

    def __init__(self, base: Sampler[int], num_views: int) -> None:
        self.base = base
        self.num_views = num_views
        self.epoch = 0
        self._epoch_set = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_set = epoch, True
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        view = self.epoch % self.num_views
        if not self._epoch_set:
            self.epoch += 1
        self._epoch_set = False
        for index in self.base:
            yield index, view

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]


class AugmentedViews(Dataset):
    """Wraps an :class:`~kdlib.data.dataset.IndexedImageDataset`: item ``(i, k)`` is image ``i``
    transformed under ``seeds[i, k]``, returned as ``(image, target, i, k)``."""

    def __init__(self, base: Dataset, seeds: Tensor) -> None:
        if seeds.ndim != 2 or seeds.shape[0] != len(base):  # type: ignore[arg-type]
            raise ValueError(f"view seeds must have shape ({len(base)}, K), got {tuple(seeds.shape)}")  # type: ignore[arg-type]
        self.base = base
        self.seeds = seeds
        self._seed_list = seeds.tolist()  # Python ints: indexing a tensor per item costs more

    @property
    def num_views(self) -> int:
        return self.seeds.shape[1]

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, object, int, int]:
        i, k = key
        base = self.base
        image = base.image(i)  # type: ignore[attr-defined]
        if base.transform is not None:  # type: ignore[attr-defined]
            with seeded(self._seed_list[i][k]):
                image = base.transform(image)  # type: ignore[attr-defined]
        return image, base.target(i), i, k  # type: ignore[attr-defined]

    def batch_seeds(self, positions: Tensor, views: Tensor) -> Tensor:
        """The seeds of a batch's views, for batch-level augmentation."""
        return self.seeds[positions.long(), views.long()]
