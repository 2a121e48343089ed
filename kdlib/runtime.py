"""Where training runs: the ``runtime`` settings, this process's device and rank, seeding and loaders.

:class:`RuntimeSettings` is what a run asks for (processes, machines, compilation, resume);
:class:`Runtime` is what one process got (its device and ranks; under torchrun it joins the
process group, :mod:`kdlib.distributed`). :func:`make_loader` shards training batches over the
processes and never validation.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

from kdlib.data.views import AugmentedViews, ViewSampler
from kdlib.process import child_initializer
from kdlib.schema import is_bool, is_int, one_of, optional, setting


def is_endpoint(v: object) -> str | None:
    """``host:port`` with a port in 1..65535."""
    expected = "host:port, e.g. 10.0.0.1:29500"
    if not isinstance(v, str) or ":" not in v:
        return expected
    host, _, port = v.rpartition(":")
    return None if host and port.isdigit() and 0 < int(port) < 65536 else expected


@dataclass(frozen=True, kw_only=True)
class RuntimeSettings:
    """Where and how a training stage runs: device, processes, machines, compilation, resume.

    ``nproc_per_node`` > 1 or ``nnodes`` > 1 runs the stage under ``torchrun`` (gloo on CPU, NCCL
    on CUDA with one GPU per process); a model preset's ``batch_size`` is then per process and
    the global batch is ``batch_size × nproc_per_node × nnodes``. ``nnodes`` > 1 needs
    ``rdzv_endpoint`` (node 0's ``host:port``); each other machine runs the same stage with its
    ``node_rank``. ``node_rank``, ``rdzv_endpoint`` and ``rdzv_timeout_s`` decide where processes
    meet, not what they compute, so no stage depends on them.
    """

    device: str = setting(one_of("auto", "cpu", "cuda"), "auto")
    nproc_per_node: int = setting(is_int(1), 1)
    nnodes: int = setting(is_int(1), 1)
    node_rank: int = setting(is_int(0), 0)
    rdzv_endpoint: str | None = setting(optional(is_endpoint), None)
    rdzv_timeout_s: int = setting(is_int(1), 120)
    max_restarts: int = setting(is_int(0), 0)  # torchrun restarts of a failed worker group; each resumes
    sync_bn: bool = setting(is_bool, False)  # convert BatchNorm to SyncBatchNorm under DDP (CUDA only)
    compile: bool = setting(is_bool, False)  # torch.compile the trained model
    resume: bool = setting(is_bool, True)  # pick up a killed run of the same stage from its last epoch

    def problems(self) -> list[tuple[str | None, str]]:
        found: list[tuple[str | None, str]] = []
        if self.node_rank >= self.nnodes:
            found.append(("node_rank", f"expected an integer in [0, {self.nnodes - 1}] (nnodes = {self.nnodes})"))
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            found.append(("rdzv_endpoint", "expected host:port of node 0 when nnodes > 1 (every node gives the same)"))
        if self.sync_bn and self.device == "cpu":
            found.append(("sync_bn", "expected false on CPU: torch's SyncBatchNorm only works on CUDA modules "
                                     "(\"SyncBatchNorm layers only work with GPU modules\")"))
        return found

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def launches(self) -> bool:
        """Whether the stage runs its work under torchrun."""
        return self.world_size > 1


@dataclass(frozen=True)
class Runtime:
    """The device and place of this process among the training processes.

    ``rank``/``world_size`` over all machines; ``local_rank``/``local_world_size`` on this one.
    The global rank 0 decides (validation, best epoch); each machine's local rank 0
    (:attr:`writes_outputs`) writes that machine's checkpoints, logs and caches, so every
    machine's workspace ends with the same complete outputs.
    """

    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def writes_outputs(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str = "auto", timeout_s: float = 1800.0) -> "Runtime":
        """This process's runtime; CUDA when ``device`` is ``auto`` and a GPU is present.

        Under torchrun with several processes (``WORLD_SIZE`` > 1) it joins the process group,
        so code that trains under torchrun always trains with DDP (:func:`kdlib.train.fit`
        wraps the student whenever the runtime is distributed).
        """
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("runtime.device = 'cuda': expected a CUDA device, and torch sees none "
                               f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
        from kdlib import distributed

        if distributed.launched_world_size() > 1:
            dev, rank, world, local_rank, local_world = distributed.init_process_group(device, timeout_s)
            return cls(dev, rank, world, local_rank, local_world)
        return cls(torch.device(device))


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
    """A loader whose order depends only on ``seed``, the epoch (``set_epoch``) and this
    process's rank among ``runtime.world_size``.

    Over :class:`~kdlib.data.views.AugmentedViews` the sampler yields ``(index, view)`` pairs,
    the view chosen by the epoch; the image order is the same as over the plain data set.
    """
    # The training order is DistributedSampler's (a permutation drawn from seed + epoch, rank r
    # taking every world_size-th index) with any number of processes, one included: a run with
    # P processes of batch B then sees, step by step, the same images as one process of batch
    # P·B, and the order needs no state to resume (the epoch is enough). A separate generator
    # feeds the DataLoader's worker base seeds (drawn at each new iterator), so the order does
    # not depend on num_workers. Validation is never sharded: every process sees all of it.
    workers = torch.Generator().manual_seed(seed)
    sampler: Sampler
    if train:
        sampler = DistributedSampler(dataset, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True,
                                     seed=seed)
    else:
        sampler = SequentialSampler(dataset)
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
