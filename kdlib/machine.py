"""What a measurement ran on: CPU model, cores, accelerator, library versions.

Wall-clock figures (seconds per epoch, ms per step, batch-1 latency) mean little without the
machine they came from, and a study run over several machines or sessions (DVC's run cache,
``records.json``) mixes them: every training timing carries the :func:`label` of :func:`describe`
(one string, so ``dvc exp show`` gains one column per model, not one per field), and a study report
says how many experiments trained on each machine. The benchmarks store the whole :func:`describe`.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

NOT_RECORDED = "not recorded"  # a timing made before machines were stored


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's marketing name (``model name`` in ``/proc/cpuinfo`` on Linux; ``platform.processor()``
    elsewhere, which on Linux is usually empty), else the architecture."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name" and value.strip():
                return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe(device: torch.device | str | None = None) -> dict[str, Any]:
    """The machine this process runs on; with a CUDA ``device``, its GPU's name and memory too."""
    info: dict[str, Any] = {"cpu": cpu_model(), "logical_cores": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                            "python": platform.python_version()}
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        info["accelerator"] = props.name
        info["accelerator_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def label(info: dict[str, Any] | None) -> str:
    """A short name for tables: ``"AMD EPYC, 2 cores"``, ``"NVIDIA H200 (AMD EPYC, 16 cores)"``;
    :data:`NOT_RECORDED` for none."""
    if not info:
        return NOT_RECORDED
    host = f"{info.get('cpu', 'unknown CPU')}, {info.get('logical_cores', '?')} cores"
    return f"{info['accelerator']} ({host})" if info.get("accelerator") else host
