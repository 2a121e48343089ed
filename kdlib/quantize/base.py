"""What every precision/backend provides, and the registry that names them.

A precision turns an fp32 classifier (``forward(x) -> logits``) into a :class:`Prepared` model:
an ``nn.Module`` taking the same normalized fp32 NCHW batch and returning fp32 logits, plus
how to serialize it and which dtypes its stored weights really have. Adding a precision is one
new file whose ``prepare`` function is decorated with ``@PRECISIONS.register("name")``.
A precision that cannot run here raises :class:`Skipped` with the reason; it never falls back
to fp32.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from kdlib.registry import Registry


class Skipped(RuntimeError):
    """This precision cannot run on this machine/model; the message says why."""


@dataclass
class QuantContext:
    """Inputs a precision may need besides the model."""

    example: Tensor  # a normalized fp32 batch (>= 2 images) with the evaluation input shape
    calibration: Sequence[Tensor] = ()  # normalized fp32 batches from the training split
    device: torch.device = torch.device("cpu")
    threads: int = 2
    workdir: Path = Path(".")  # scratch space for exported files (ONNX)
    static_batch_sizes: tuple[int, ...] = (1, 64)  # shapes a static-shape backend compiles


@dataclass
class Prepared:
    """A model ready to evaluate in one precision."""

    module: nn.Module  # forward(normalized fp32 batch) -> fp32 logits
    backend: str  # what runs it, e.g. "pytorch eager", "onnxruntime 1.31.1 CPU"
    save: Callable[[Path], Path]  # writes the deployable artifact under this stem; returns the file
    stored_dtypes: Callable[[], dict[str, int]]  # weight elements per dtype as stored
    device: torch.device = torch.device("cpu")
    notes: str = ""
    extra: dict = field(default_factory=dict)


PrepareFn = Callable[[nn.Module, QuantContext], Prepared]
PRECISIONS: Registry[PrepareFn] = Registry("precision")


def tensor_dtypes(tensors: Sequence[Tensor] | dict[str, Tensor]) -> dict[str, int]:
    """Element count per dtype name (``torch.float8_e4m3fn`` → ``float8_e4m3fn``)."""
    values = tensors.values() if isinstance(tensors, dict) else tensors
    counts: Counter[str] = Counter()
    for t in values:
        for inner in _storage_tensors(t):
            counts[str(inner.dtype).removeprefix("torch.")] += inner.numel()
    return dict(counts)


def _storage_tensors(t: object) -> list[Tensor]:
    """The tensors that hold ``t``'s data: a subclass such as torchao's ``Int8Tensor`` reports its
    logical dtype (fp32) but stores ``qdata`` (int8) and ``scale``, so it is unwrapped."""
    if isinstance(t, (tuple, list)):
        return [x for item in t for x in _storage_tensors(item)]
    if not isinstance(t, Tensor):
        return []
    if type(t) not in (Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [x for n in names for x in _storage_tensors(getattr(t, n))]
    return [t]


def torch_save(obj: object, stem: Path, suffix: str = ".pt") -> Path:
    path = Path(stem).with_suffix(suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


class OutputToFloat(nn.Module):
    """Casts the input to the model's dtype/device and the logits back to fp32 on the CPU."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        super().__init__()
        self.model, self.dtype, self.device, self.memory_format = model, dtype, device, memory_format
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
        return self.model(x).float().cpu()
