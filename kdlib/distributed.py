"""Multi-process training with ``torch.distributed``: the process group, the DDP wrapper of the
student, and the few collectives the training loop needs.

Processes are started by ``torchrun`` (which sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``); :func:`init_process_group` joins them
with gloo on CPU and NCCL on CUDA (one GPU per process, the ``LOCAL_RANK``-th). Following DeiT's
``main.py`` and timm's distillation task, only the trainable student is wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel`; the teacher stays a plain module in eval
mode under ``no_grad`` on every process.

Every process takes the same decisions: validation runs on rank 0 over the full validation set
(a ``DistributedSampler`` would pad it, so the score would depend on the number of processes:
deit PR #24) and its result is broadcast, so best epoch and early stop agree; BatchNorm running
statistics, which each process updates from its own shard, are taken from rank 0
(:func:`sync_buffers`) before validating and saving, so every saved checkpoint is rank 0's model.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kdlib.features import student_output
from kdlib.losses.registry import StudentOutput
from kdlib.taps import LayerTaps

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A multi-process run that cannot start as configured (devices, rendezvous, environment)."""


def launched_world_size() -> int:
    """``WORLD_SIZE`` as torchrun set it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def backend_for(device: torch.device) -> str:
    """gloo on CPU, NCCL on CUDA. Passed explicitly: without it ``get_backend()`` reports
    "undefined" on a CPU-only build."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(device_type: str, timeout_s: float = 1800.0) -> tuple[torch.device, int, int, int, int]:
    """Join the processes torchrun started; returns ``(device, rank, world size, local rank,
    local world size)``. ``device_type`` is ``cpu`` or ``cuda``; on CUDA process ``LOCAL_RANK``
    takes GPU ``LOCAL_RANK`` and there must be at least ``LOCAL_WORLD_SIZE`` GPUs."""
    missing = [name for name in TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise DistributedError(f"a multi-process run needs torchrun's environment; {', '.join(missing)} unset")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    if device_type == "cuda":
        count = torch.cuda.device_count()
        if local_world > count:
            raise DistributedError(f"runtime.nproc_per_node = {local_world}: expected at most {count}, the CUDA "
                                   "devices this machine has (one process per GPU)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), store=_attempt_store(rank, world, timeout_s), rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return device, rank, world, local_rank, local_world


def _attempt_store(rank: int, world: int, timeout_s: float) -> dist.Store:
    """The store ``env://`` would make, in a namespace of this torchrun attempt.

    torchrun's agent serves one store at ``MASTER_ADDR:MASTER_PORT`` for every attempt of a
    ``--max-restarts`` run; without a per-attempt prefix a restarted process may read the killed
    group's addresses before its peers overwrite them, and fail to connect (seen here with gloo)."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_serves = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(host, port, world, is_master=not agent_serves and rank == 0,
                          timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"kdlib/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` of rank ``src`` on every process (pickled; for small results only)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(value: Any) -> list[Any]:
    """Every process's ``value``, in rank order, on every process."""
    if not active():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over processes (a new tensor; the input is left as it was)."""
    if not active():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_rows(tensor: Tensor) -> Tensor:
    """Every process's ``tensor`` concatenated along dim 0 in rank order, on every process (the row counts
    may differ between processes); ``tensor`` itself outside several processes."""
    if not active():
        return tensor
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device))
    counts = [int(s) for s in sizes]
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))  # all_gather takes equal shapes
    padded[:tensor.shape[0]] = tensor
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[:n] for o, n in zip(out, counts)])


def average_gradients(params: Sequence[nn.Parameter]) -> None:
    """Replace each gradient of ``params`` by its mean over processes, in one all-reduce (what DDP does
    for the student's parameters, for parameters outside it: a method's own)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not active() or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_parameters(params: Sequence[nn.Parameter], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``params`` to every process."""
    if not active():
        return
    with torch.no_grad():
        for param in params:
            dist.broadcast(param.data, src=src)


def sync_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every process."""
    if not active():
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=src)


def shard(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """Every ``world``-th item from ``rank``: disjoint, together all items, none repeated."""
    return list(items[rank::world])


class StudentForward(nn.Module):
    """The student as the training step calls it (features or both heads when the method needs
    them, :func:`kdlib.features.student_output`), as one ``forward``: DDP synchronizes gradients
    only of what runs through the wrapped module's ``forward``, and a feature student's
    ``forward_distill`` is not its ``forward``."""

    def __init__(self, model: nn.Module, features: bool, layers: Sequence[str] = ()) -> None:
        super().__init__()
        self.model = model
        self.features = features
        # hooks on the student's own modules: they fire inside DDP's forward, so the layers' gradients
        # are synchronized with the rest
        self.taps = LayerTaps(model, layers) if layers else None

    def forward(self, images: Tensor) -> StudentOutput:
        if self.taps is not None:
            logits, layers = self.taps.forward(images)
            return StudentOutput(logits, layers=layers)
        return student_output(self.model, images, self.features)


def wrap_student(model: nn.Module, features: bool, device: torch.device, sync_bn: bool = False,
                 layers: Sequence[str] = ()) -> nn.Module:
    """The module the training step calls: :class:`StudentForward` of ``model``, in DDP when
    several processes run. ``sync_bn`` converts BatchNorm to SyncBatchNorm first (CUDA only:
    torch's SyncBatchNorm refuses CPU modules). The optimizer and checkpoints keep using
    ``model`` itself, whose parameters DDP shares. ``layers``: module paths of the student whose outputs
    the step returns too (``StudentOutput.layers``, :mod:`kdlib.taps`)."""
    step = StudentForward(model, features, layers)
    if not active():
        return step
    if sync_bn:
        if device.type != "cuda":
            raise DistributedError("runtime.sync_bn = true: expected false on CPU (torch's SyncBatchNorm only "
                                   "works with CUDA modules)")
        # replaces the BatchNorm modules inside ``model`` in place, reusing their parameters and
        # buffers, so the optimizer built on ``model`` still holds the trained tensors
        step = nn.SyncBatchNorm.convert_sync_batchnorm(step)
    return nn.parallel.DistributedDataParallel(
        step, device_ids=[device.index] if device.type == "cuda" else None,
        # a frozen backbone (feature alignment) has parameters without gradients; DDP skips those
        # with requires_grad=False, so no unused-parameter search is needed
        find_unused_parameters=False)


def release_taps(step: nn.Module) -> None:
    """Take the layer hooks :func:`wrap_student` put on the student off it (training is over: evaluation
    and export run the bare model)."""
    inner = step.module if isinstance(step, nn.parallel.DistributedDataParallel) else step
    taps = getattr(getattr(inner, "_orig_mod", inner), "taps", None)
    if taps is not None:
        taps.remove()


def unwrap(step: nn.Module) -> nn.Module:
    """The student inside what :func:`wrap_student` returned."""
    inner = step.module if isinstance(step, nn.parallel.DistributedDataParallel) else step
    return getattr(inner, "_orig_mod", inner).model
