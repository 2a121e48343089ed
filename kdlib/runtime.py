"""Where training runs: device, process rank, seeding and data loaders.

Everything that changes under ``torchrun`` (DDP) lives here: the sampler choice in
:func:`make_loader`, and :attr:`Runtime.is_main`, which gates logging and checkpointing.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from kdlib.data.views import AugmentedViews, ViewSampler
from kdlib.process import child_initializer


@dataclass(frozen=True)
class Runtime:
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str = "auto") -> "Runtime":
        """Read ``RANK`` / ``WORLD_SIZE`` as set by torchrun; pick CUDA when available."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        dev = torch.device(device)
        if dev.type == "cuda" and world > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return cls(dev, rank, world)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and make torch pick deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _seed_worker(worker_id: int) -> None:
    child_initializer()  # a worker must not outlive a killed training process
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    seed: int,
    runtime: Runtime,
    num_workers: int = 0,
) -> DataLoader:
    """A loader whose order depends only on ``seed`` (and the epoch, via ``set_epoch``).

    Over :class:`~kdlib.data.views.AugmentedViews` the sampler yields ``(index, view)`` pairs,
    the view chosen by the epoch; the image order is the same as over the plain data set.
    """
    # Two generators: the DataLoader draws a worker base seed from its own at every new iterator
    # (each epoch without persistent workers, once with them), so a shared one would make the
    # shuffle order depend on num_workers.
    order = torch.Generator().manual_seed(seed)
    workers = torch.Generator().manual_seed(seed)
    if runtime.distributed:
        sampler = DistributedSampler(
            dataset, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=train, seed=seed
        )
    else:
        sampler = RandomSampler(dataset, generator=order) if train else SequentialSampler(dataset)
    if isinstance(dataset, AugmentedViews):
        sampler = ViewSampler(sampler, dataset.num_views)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=False,
        num_workers=num_workers,
        worker_init_fn=_seed_worker,
        generator=workers,
        persistent_workers=num_workers > 0,
        pin_memory=runtime.device.type == "cuda",
    )


def has_native_kernels(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``device`` computes ``dtype`` (bfloat16, float16) natively. On a CPU without
    AVX512-BF16 / AVX512-FP16 / AMX, oneDNN has no kernels for them and torch emulates them
    through fp32 conversions: a convolution is then 5–30× slower than in fp32."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return True
    try:
        check = torch.ops.mkldnn._is_mkldnn_bf16_supported if dtype == torch.bfloat16 else \
            torch.ops.mkldnn._is_mkldnn_fp16_supported
        return bool(check())
    except (AttributeError, RuntimeError):  # a torch without the probe: assume the kernels exist
        return True
