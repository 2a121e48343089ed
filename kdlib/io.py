"""Files written so that a reader (or DVC's cache) never sees half of one.

A write that fails because the disk is full says so, with the file and the space it needed
(:func:`disk_full_error`): torch's own error for it ("enforce fail at inline_container.cc ...
unexpected pos") names neither, and the temporary file is removed either way.
"""
from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

# writes whose errors are checked for a full disk call this to learn how many bytes they needed
SizeOf = Callable[[], int]


def _errno_in_chain(err: BaseException, code: int) -> bool:
    """Whether ``err`` or an exception it was raised from/while handling is an OSError ``code``:
    torch.save through a Python file object raises a RuntimeError whose context is the OSError."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == code:
            return True
        current = current.__cause__ or current.__context__
    return False


def _free_bytes(directory: Path) -> tuple[int, int] | None:
    """``(bytes this process may still write, block size)`` on ``directory``'s file system (root
    may use the blocks reserved for it), or None when the file system cannot tell."""
    try:
        stats = os.statvfs(directory)
    except OSError:
        return None
    blocks = stats.f_bfree if os.geteuid() == 0 else stats.f_bavail
    return blocks * stats.f_frsize, stats.f_frsize


def disk_full_error(path: Path, tmp: Path, err: BaseException, needed: SizeOf | None = None,
                    hint: str = "") -> OSError | None:
    """The ``OSError(ENOSPC)`` to raise instead of ``err``, the failure of writing ``path``
    through the temporary file ``tmp`` (call it before removing ``tmp``), when the disk was
    full; ``None`` when it was something else.

    Python's own writes (and ``shutil``'s copies) raise ENOSPC themselves, but ``torch.save`` to
    a path writes through a C++ stream whose error ("enforce fail ... unexpected pos") carries
    no errno. So when there is no ENOSPC in the exception chain, the free space decides: the
    bytes free now plus those the partial ``tmp`` holds (free again once it is removed) are
    fewer than the write needs (``needed()``; when that cannot be computed, less than one block
    free counts as full).
    """
    path, tmp = Path(path), Path(tmp)
    if not isinstance(err, (OSError, RuntimeError)):  # an interrupt, a bug: not a full disk
        return None
    space = _free_bytes(tmp.parent if tmp.parent.is_dir() else path.parent)
    try:
        partial = tmp.lstat().st_blocks * 512
    except OSError:
        partial = 0
    size: int | None = None
    if needed is not None:
        try:
            size = needed()
        except Exception:  # the estimate may re-serialize; if that fails, the free space alone decides
            size = None
    free = None if space is None else space[0] + partial
    if _errno_in_chain(err, errno.ENOSPC):
        full = True
    elif free is None or space is None:
        full = False
    elif size is not None:
        full = free < size
    else:
        full = space[0] < space[1]
    if not full:
        return None
    figures = ([f"it needs about {size} bytes"] if size is not None else []) + \
        ([f"{free} bytes are free there"] if free is not None else [])
    detail = f" ({', '.join(figures)})" if figures else ""
    message = (f"{path}: no space left on device{detail}; the file was not written. Free some space on the "
               f"file system of {path.parent} and run again{hint}")
    return OSError(errno.ENOSPC, message)  # no filename argument: str() would name the file twice


class _ByteCounter:
    """A write-only file that keeps only the number of bytes written to it."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self.size += n
        return n

    def flush(self) -> None:
        pass


def torch_saved_size(value: Any) -> int:
    """About how many bytes ``torch.save(value, path)`` writes (exactly, but for the name of the
    archive's records, which follows the file name): it serializes once more, into nothing."""
    import torch  # here: kdlib.io is imported by code that does not need torch

    counter = _ByteCounter()
    torch.save(value, counter)
    return counter.size


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place; a full disk
    is an ``OSError(ENOSPC)`` naming ``path``, and leaves neither ``path`` nor the temporary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share one
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
        return
    except BaseException as err:
        # judged before the temporary goes (its blocks count as free once it does); raised below,
        # outside this block, so that the new error does not keep the failed write alive
        full = disk_full_error(path, tmp, err, lambda: len(text.encode()))
        tmp.unlink(missing_ok=True)
        if full is None:
            raise
    raise full


def _first_non_finite(data: Any, where: str = "") -> tuple[str, float] | None:
    """``(dotted key path, value)`` of the first NaN or ±inf in ``data``, in the order JSON
    would write it; list items are ``[i]``."""
    if isinstance(data, float):
        return None if math.isfinite(data) else (where or "(the whole value)", data)
    if isinstance(data, dict):
        for key, value in data.items():
            found = _first_non_finite(value, f"{where}.{key}" if where else str(key))
            if found is not None:
                return found
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            found = _first_non_finite(value, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON (:func:`write_text`). NaN and ±inf are refused with a ValueError
    naming the file and the key, and nothing is written: Python would write them as ``NaN`` /
    ``Infinity``, which is not JSON (DVC, browsers and ``jq`` reject the file) and would record
    a diverged run as a result. A value that is legitimately undefined belongs in the file as
    ``null``."""
    found = _first_non_finite(data)
    if found is not None:
        where, value = found
        raise ValueError(f"{path}: {where} = {float(value)!r}: a non-finite number; nothing was written "
                         "(a value that is undefined should be None, written as null)")
    try:
        text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False)
    except ValueError as err:  # a float subclass or a structure the walk above does not know
        raise ValueError(f"{path}: {err}; nothing was written") from None
    write_text(path, text + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
