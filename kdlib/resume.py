"""Resume a killed training run from its last finished epoch, to the same bytes.

After every epoch the loop saves its whole state into a :class:`ResumeStore`: model, optimizer,
lr scheduler, grad scaler, epoch, checkpoint selection (best score, patience counter), history
and timings, and every process's random states (torch CPU and CUDA, NumPy, Python's
``random``). The sampler needs no state: its order is a function of the seed and the epoch
(:func:`kdlib.runtime.make_loader`), and augmented views are a function of (image, view). The
best checkpoint written so far is kept beside the state, since the run's output folder does not
survive the kill. A rerun that loads the state continues with exactly the random draws, weights
and optimizer moments the uninterrupted run had at that epoch, so its checkpoints are
byte-identical to those of a run that was never killed (on the same machine).

Layout of a store directory (one per run key; see the stage that picks the key)::

    epoch-0007/state.pt          model, optimizer, ... (written by each machine's local rank 0)
    epoch-0007/rng-<rank>.pt     one per process (ranks draw different dropout)
    epoch-0007/files/best.pt     copies of the files the run wrote so far
    epoch-0007/COMPLETE          written last: an epoch folder without it is ignored

Every file is written under a temporary name, flushed and renamed; the two newest complete
epochs are kept, so a state truncated by a crash (or a full disk) falls back to the previous
epoch, and failing that to a fresh start, each with a warning, never a crash.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

STATE_FORMAT = 1
KEEP_EPOCHS = 2


class ResumeWarning(UserWarning):
    """A saved state was unusable and is being skipped."""


class ResumeError(RuntimeError):
    """A saved state of this run cannot be continued as configured (e.g. another world size)."""


def capture_rng() -> dict[str, Any]:
    """The random states a training step draws from, in this process."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # as tensors and numbers, so that the state loads with torch.load(weights_only=True)
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, write: Any) -> None:
    """``write(temporary path)``, fsync, rename to ``path``: ``path`` is whole or absent."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _torch_save(value: Any) -> Any:
    return lambda tmp: torch.save(value, tmp)


class ResumeStore:
    """The saved states of one run, in ``directory``, for the run identified by ``key``.

    ``rank`` / ``world_size`` / ``writes_shared`` describe this process (the process that writes
    ``state.pt`` and the files is each machine's local rank 0). A state saved under another
    key (a directory reused by hand) is ignored with a warning; one saved with another world
    size raises :class:`ResumeError`, because the per-process random states and the data
    shards then belong to other processes.
    """

    def __init__(self, directory: Path, key: str, rank: int = 0, world_size: int = 1,
                 writes_shared: bool = True) -> None:
        self.directory = Path(directory)
        self.key = key
        self.rank, self.world_size, self.writes_shared = rank, world_size, writes_shared

    def _epochs(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and p.name.startswith("epoch-")
                 and p.name[6:].isdigit()]
        return sorted(found, key=lambda p: int(p.name[6:]), reverse=True)

    def save(self, epoch: int, state: Mapping[str, Any], files: Mapping[str, Path] = {},
             barrier: Any = None) -> None:
        """Save epoch ``epoch``'s state (``state`` from this machine's local rank 0; ignored on
        other processes) and copies of ``files`` (name → path). ``barrier()`` is called between
        the processes' writes and the ``COMPLETE`` marker, so an epoch is complete only once
        every process's random state is on disk."""
        folder = self.directory / f"epoch-{epoch:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / f"rng-{self.rank}.pt", _torch_save(capture_rng()))
        if self.writes_shared:
            full = {"format": STATE_FORMAT, "key": self.key, "epoch": epoch, "world_size": self.world_size,
                    **state}
            _write_atomic(folder / "state.pt", _torch_save(full))
            (folder / "files").mkdir(exist_ok=True)
            for name, path in files.items():
                _write_atomic(folder / "files" / name, lambda tmp, src=path: shutil.copyfile(src, tmp))
        if barrier is not None:
            barrier()
        if self.writes_shared:
            _write_atomic(folder / "COMPLETE", lambda tmp: Path(tmp).write_text(
                json.dumps({"key": self.key, "epoch": epoch, "files": sorted(files)}) + "\n"))
            for old in self._epochs()[KEEP_EPOCHS:]:
                shutil.rmtree(old, ignore_errors=True)

    def load(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Path]] | None:
        """``(state, this process's random state, saved files)`` of the newest usable epoch, or
        ``None`` (nothing saved, or nothing usable: each skipped epoch is a warning)."""
        for folder in self._epochs():
            if not (folder / "COMPLETE").is_file():
                continue  # killed while saving: the previous epoch is the last whole one
            try:
                state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
                rng = torch.load(folder / f"rng-{self.rank}.pt", map_location="cpu", weights_only=True)
                marker = json.loads((folder / "COMPLETE").read_text())
            except Exception as err:  # truncated or unreadable: any error of torch.load's unpickler
                warnings.warn(f"resume state {folder} is unreadable ({type(err).__name__}: {err}); "
                              "trying the previous epoch", ResumeWarning, stacklevel=2)
                continue
            if state.get("key") != self.key or state.get("format") != STATE_FORMAT:
                warnings.warn(f"resume state {folder} belongs to another run (key {str(state.get('key'))[:12]}, "
                              f"expected {self.key[:12]}); ignored", ResumeWarning, stacklevel=2)
                continue
            if state.get("world_size") != self.world_size:
                raise ResumeError(
                    f"resume state {folder} was saved by {state.get('world_size')} processes and this run has "
                    f"{self.world_size}: the random states and data shards belong to those processes. Run with the "
                    f"same runtime.nproc_per_node x runtime.nnodes, or delete {self.directory} to start afresh")
            files = {name: folder / "files" / name for name in marker.get("files", [])}
            missing = [str(p) for p in files.values() if not p.is_file()]
            if missing:
                warnings.warn(f"resume state {folder} lacks {', '.join(missing)}; trying the previous epoch",
                              ResumeWarning, stacklevel=2)
                continue
            return state, rng, files
        return None

    def clear(self) -> None:
        """Remove every saved state of this run (it completed)."""
        shutil.rmtree(self.directory, ignore_errors=True)
