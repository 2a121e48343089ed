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
epoch, and failing that to a fresh start, each with a warning, never a crash. A write that
fails for a full disk is an ``OSError(ENOSPC)`` naming the file (:func:`kdlib.io.disk_full_error`).

The store directory may be shared (``$KDLIB_RESUME_DIR``), so what is read from it is checked
before it is used: ``COMPLETE`` may name only the files a state keeps (:data:`KEPT_FILES`, bare
names: a name such as ``../../README.md`` would have the run copy that file over one outside its
output folder), and no file or folder inside an epoch is read through a symbolic link. An epoch
that fails either check is skipped with a :class:`ResumeWarning`, like an unreadable one.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import stat
import warnings
from pathlib import Path
from typing import IO, Any, Callable, Mapping

import numpy as np
import torch

from kdlib.io import SizeOf, disk_full_error, torch_saved_size

STATE_FORMAT = 1
KEEP_EPOCHS = 2
# the files a state keeps copies of (what fit writes before its last epoch): COMPLETE may name no other
KEPT_FILES = frozenset({"best.pt"})
_BARE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")  # no separator, NUL, leading dot, "." or ".."


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


def file_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a file a resume state keeps, or ``None`` when it can: it must be a
    bare name (no folder, no ``..``, not hidden) and one of :data:`KEPT_FILES`."""
    if not isinstance(name, str) or not _BARE_NAME.fullmatch(name):
        return "not a bare file name (a path, a hidden name or a name with characters other than A-Z a-z 0-9 _ . -)"
    if name not in KEPT_FILES:
        return f"not one of the files a resume state keeps ({', '.join(sorted(KEPT_FILES))})"
    return None


def _open_inside(directory: Path, *parts: str) -> IO[bytes]:
    """``directory/parts[0]/.../parts[-1]`` opened for reading, following no symbolic link from
    ``directory`` down (each step is opened with ``O_NOFOLLOW`` relative to the one before, so a
    link swapped in after a check is refused too). Raises ``OSError`` naming the path otherwise,
    or when the file is not a regular file."""
    path = Path(directory, *parts)
    steps = [Path(directory).name or str(directory), *parts[:-1]]
    fd = None
    try:
        for i, part in enumerate(steps):
            try:
                inner = os.open(directory if i == 0 else part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                dir_fd=None if i == 0 else fd)
            except OSError as err:
                if err.errno == errno.ENOENT:
                    raise OSError(err.errno, f"{path}: {err.strerror}") from None
                raise OSError(err.errno, f"{path}: {part} is a symbolic link or not a folder ({err.strerror}); "
                              "resume files are never read through a link") from None
            if fd is not None:
                os.close(fd)
            fd = inner
        try:
            file_fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as err:
            if err.errno == errno.ELOOP or os.path.islink(path):
                raise OSError(err.errno, f"{path} is a symbolic link; resume files are never read through a "
                              "link") from None
            raise OSError(err.errno, f"{path}: {err.strerror}") from None
    finally:
        if fd is not None:
            os.close(fd)
    if not stat.S_ISREG(os.fstat(file_fd).st_mode):
        os.close(file_fd)
        raise OSError(f"{path} is not a regular file")
    return os.fdopen(file_fd, "rb")


def _write_atomic(path: Path, write: Callable[[IO[bytes]], Any], needed: SizeOf | None = None) -> None:
    """``write(file)`` into a new temporary file beside ``path``, fsync, rename to ``path``:
    ``path`` is whole or absent. The temporary is created with ``O_EXCL | O_NOFOLLOW``, so a link
    planted under its name in a shared store is never written through, and the rename replaces a
    link at ``path`` rather than following it. A full disk is an ``OSError(ENOSPC)`` naming
    ``path`` (``needed()``: the bytes it takes)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)  # a leftover of a killed process of the same id (a link itself goes, not its target)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        return
    except BaseException as err:
        # judged before the temporary goes; raised outside this block, which releases the failed writer
        full = disk_full_error(path, tmp, err, needed,
                               "; training then continues from its last saved epoch")
        tmp.unlink(missing_ok=True)
        if full is None:
            raise
    raise full


def _write_torch(path: Path, value: Any) -> None:
    """``torch.save`` through a Python file object: a full disk then raises the OSError itself (to
    a path, torch's C++ stream reports "unexpected pos" only); the records inside are named
    ``archive/`` instead of after the file, which nothing reads."""
    _write_atomic(path, lambda file: torch.save(value, file), lambda: torch_saved_size(value))


def _copy_file(source: Path) -> Callable[[IO[bytes]], None]:
    def copy(file: IO[bytes]) -> None:
        with open(source, "rb") as reader:
            shutil.copyfileobj(reader, file, 1 << 20)
    return copy


def restore_file(source: Path, out_dir: Path, name: str) -> Path:
    """Copy a file a resume state kept (``source``, from :meth:`ResumeStore.load`) to
    ``out_dir / name``, and return that path. ``name`` must be a bare kept name
    (:func:`file_name_problem`: anything else would write outside ``out_dir``), ``source`` is
    read without following a symbolic link, and the copy is renamed into place (never written
    through a link that ``out_dir / name`` may be)."""
    problem = file_name_problem(name)
    if problem is not None:
        raise ResumeError(f"resume file name {name!r} for {out_dir} is {problem}; nothing was copied")
    source, target = Path(source), Path(out_dir) / name
    try:  # the epoch folder, its files/ and the file itself: no link anywhere
        reader = _open_inside(source.parent.parent, source.parent.name, source.name)
    except OSError as err:
        raise ResumeError(f"resume file {source} cannot be copied to {target}: {err}") from None
    with reader:
        needed = os.fstat(reader.fileno()).st_size
        _write_atomic(target, lambda file: shutil.copyfileobj(reader, file, 1 << 20), lambda: needed)
    return target


def _kept_file_problem(folder: Path, name: str) -> str | None:
    """What is wrong with the kept file ``folder/files/name``, or ``None`` when it is a regular
    file reached through no symbolic link."""
    path = folder / "files" / name
    try:
        _open_inside(folder, "files", name).close()
    except FileNotFoundError:
        return f"it lacks {path}"
    except OSError as err:
        return str(err)
    return None


def _drop_link(path: Path) -> None:
    """Remove a symbolic link at ``path``, a folder the store is about to write into: planted in a
    shared store, it would have the state written wherever it points."""
    if path.is_symlink():
        path.unlink()


def dangling_link(path: Path) -> Path | None:
    """``path`` or the first of its parents that is a symbolic link to nothing, if any."""
    for candidate in (Path(path), *Path(path).parents):
        if candidate.is_symlink() and not candidate.exists():
            return candidate
    return None


def make_dirs(path: Path, hint: str = "") -> None:
    """``path.mkdir(parents=True, exist_ok=True)``, and when that fails because a folder on the
    way is a symbolic link to nothing (or a file), an error that says which and what to do
    (``hint``: another place to keep the states) instead of ``FileExistsError``."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except (FileExistsError, FileNotFoundError, NotADirectoryError):
        link = dangling_link(path)
        if link is not None:
            raise ResumeError(
                f"{link} is a dangling symbolic link (it points to {os.readlink(link)}, which does not exist), so "
                f"resume states cannot be kept in {path}: create the folder it points to, or remove the link "
                f"(a plain folder is then made in its place){hint}") from None
        blocking = next((p for p in (Path(path), *Path(path).parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise ResumeError(f"{blocking} is a file, not a folder, so resume states cannot be kept in {path}: "
                              f"move the file away{hint}") from None
        raise


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
        for name in files:
            problem = file_name_problem(name)
            if problem is not None:
                raise ValueError(f"resume store {self.directory}: file name {name!r} is {problem}")
        folder = self.directory / f"epoch-{epoch:04d}"
        _drop_link(folder)
        make_dirs(folder)
        _write_torch(folder / f"rng-{self.rank}.pt", capture_rng())
        if self.writes_shared:
            full = {"format": STATE_FORMAT, "key": self.key, "epoch": epoch, "world_size": self.world_size,
                    **state}
            _write_torch(folder / "state.pt", full)
            _drop_link(folder / "files")
            (folder / "files").mkdir(exist_ok=True)
            for name, path in files.items():
                _write_atomic(folder / "files" / name, _copy_file(path), lambda src=path: Path(src).stat().st_size)
        if barrier is not None:
            barrier()
        if self.writes_shared:
            marker = json.dumps({"key": self.key, "epoch": epoch, "files": sorted(files)}) + "\n"
            _write_atomic(folder / "COMPLETE", lambda file: file.write(marker.encode()))
            for old in self._epochs()[KEEP_EPOCHS:]:
                shutil.rmtree(old, ignore_errors=True)

    def load(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Path]] | None:
        """``(state, this process's random state, saved files)`` of the newest usable epoch, or
        ``None`` (nothing saved, or nothing usable: each skipped epoch is a warning)."""
        for folder in self._epochs():
            if not (folder / "COMPLETE").is_file() and not (folder / "COMPLETE").is_symlink():
                continue  # killed while saving: the previous epoch is the last whole one
            if folder.is_symlink():
                warnings.warn(f"resume state {folder} is a symbolic link (to {os.readlink(folder)}); resume folders "
                              "are never read through a link: trying the previous epoch", ResumeWarning, stacklevel=2)
                continue
            try:
                with _open_inside(folder, "COMPLETE") as file:
                    marker = json.loads(file.read())
                with _open_inside(folder, "state.pt") as file:
                    state = torch.load(file, map_location="cpu", weights_only=True)
                with _open_inside(folder, f"rng-{self.rank}.pt") as file:
                    rng = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as err:  # truncated, unreadable or a link: any error of torch.load's unpickler
                warnings.warn(f"resume state {folder} is unreadable ({type(err).__name__}: {err}); "
                              "trying the previous epoch", ResumeWarning, stacklevel=2)
                continue
            names = marker.get("files", []) if isinstance(marker, dict) else None
            if not isinstance(names, list):
                warnings.warn(f"resume state {folder}: its COMPLETE marker is not a store's marker (files: {names!r}); "
                              "trying the previous epoch", ResumeWarning, stacklevel=2)
                continue
            bad = [(name, problem) for name in names if (problem := file_name_problem(name)) is not None]
            if bad:
                name, problem = bad[0]
                warnings.warn(f"resume state {folder}: its COMPLETE marker names the file {name!r}, which is {problem}; "
                              "a state names only the files it keeps, so this one was not written by kdlib: "
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
            files = {name: folder / "files" / name for name in names}
            unusable = [problem for name in names if (problem := _kept_file_problem(folder, name)) is not None]
            if unusable:
                warnings.warn(f"resume state {folder}: {'; '.join(unusable)}; trying the previous epoch",
                              ResumeWarning, stacklevel=2)
                continue
            return state, rng, files
        return None

    def clear(self) -> None:
        """Remove every saved state of this run (it completed)."""
        shutil.rmtree(self.directory, ignore_errors=True)
