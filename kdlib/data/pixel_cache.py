"""A memory-mapped ``uint8`` pixel cache: every image decoded once, at short side ``size``.

``preload: true`` used to keep full-size decoded pixels in a Python list: 0.54 MiB per
500×375 image (3.2 GB for CUB, 64 GB for FoodX-251), copied into every process that does not
share it. This cache instead decodes each image once (reduced JPEG decode, then an antialiased
resize so the shorter side is exactly ``size``: :func:`kdlib.data.decode.decode_at_short_side`)
into ONE file, read through ``np.memmap``: every process, DataLoader workers included, maps the
same file, so the memory used is the kernel's page cache, shared, not a copy per process.

File layout (little-endian)::

    [0, 4096)          header: b"KDPIXC02", then JSON (format, key, count, size, channels,
                       pixel_bytes, index_offset, decoder), padded with spaces
    [4096, +P)         pixels: image i is C·H·W bytes in CHW order at pixels[offset_i:]
    [index_offset, +40N) index: int64 (offset, channels, height, width, crc32) per image
    (the file is exactly index_offset + 40·N bytes)

Variable aspect ratios are stored as they are (each image has its own height and width).

Identity: the file's name and the header's ``key`` are a sha256 over the format, the decoder
(Pillow, libjpeg, torch and torchvision versions), ``size``, ``channels`` and the records: each
path with its md5 (``index.csv`` carries one for every image), or, for records without md5,
the file's size and mtime and the data set's root. A changed image, split or size is a new file;
so is a new format (format 1 had no checksums: its files get other names and are never read).

Building is atomic and exclusive: under an ``flock`` on ``<name>.lock`` (a second builder, e.g.
the other ranks of a torchrun, waits, then opens the finished file), the cache is written to a
hidden ``.<name>.<pid>.partial``, fsynced, then linked to its final name. A killed build leaves
only a ``.partial`` file, never read, and removed by the next build. A file at the final name
that fails its checks (truncated, wrong key, inconsistent index, an image whose pixels do not
match their checksum) is reported (a warning naming the file and the problem) and rebuilt by
:func:`open_or_build`; opened lazily in a worker, it is refused (:class:`PixelCacheError` naming
the file) rather than rebuilt behind the main process.

Checksums: the header, the size and the index say nothing about the pixels, and a flipped or
overwritten byte inside an image (a disk or memory fault, a stray write) would train a different
model without a word. Each image's CHW bytes therefore carry ``zlib.crc32`` (an index column,
written by the build from the very bytes it writes), checked twice:

* at open, by :func:`open_or_build`, every image: the cost is one pass over the pixel section,
  ``pixel_bytes / r`` with ``r`` zlib's crc32 rate on one core (1.5–2.8 GiB/s with zlib 1.2.13
  on this project's shared 2-core machine, the lower figure with other work running:
  ``bench/loader.py``'s "verify pixel cache (256 px)" row, 6,000–11,000 images/s at 256 px,
  about 5 % of what building the cache costs), so 1–2 s for CUB's 11,788 images (2.9 GiB)
  from the page cache, more where they must come from disk (one
  more pass over what every epoch reads anyway), once per process that opens the cache (each
  torchrun rank). A mismatch is reported naming the file and the first bad image's index and
  path, and the cache is rebuilt;
* on every :meth:`PixelCache.image` read, of the copy it returns (so what is checked is exactly
  what is served, even if the file changes during the read): crc32 of a 0.25 MiB 256-px image
  still in the CPU cache after the copy, about 0.06 ms, took a bare read from 0.08 to 0.14 ms
  and a read plus an ``imagenet`` crop from 0.53 to 0.55 ms (5 %) on one core, measured
  interleaved against format 1. Checking once per process instead would miss what goes wrong
  after that first read (a worker lives for the whole run); this check is what makes a
  corruption after the open, e.g. seen by a DataLoader worker, an error instead of a silently
  different model. A mismatch raises :class:`PixelCacheError` naming the file and the image,
  and unlinks the file (if it is still the one mapped) so that the next run of the stage
  rebuilds it; mappings held by other processes stay valid (Linux keeps an unlinked file's
  pages while it is mapped), and each of them checks what it reads all the same.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import PIL
import torch
import torchvision
from PIL import features
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdlib.data.decode import decode_at_short_side
from kdlib.data.index import Record
from kdlib.logline import PhaseLog

MAGIC = b"KDPIXC02"
FORMAT = 2  # 2: a crc32 column in the index
HEADER_BYTES = 4096  # pixels start page-aligned
INDEX_COLUMNS = 5  # offset, channels, height, width, crc32 of the image's CHW bytes
SUFFIX = ".pixels"


class PixelCacheError(ValueError):
    """A pixel-cache file that is not a complete cache of what it is named for."""


def decoder_identity() -> str:
    """The libraries whose versions decide the cached pixels (JPEG IDCT, resize kernels)."""
    return (f"pillow {PIL.__version__} libjpeg {features.version('jpg')} torch {torch.__version__} "
            f"torchvision {torchvision.__version__}")


def cache_key(root: Path, records: Sequence[Record], size: int, channels: int) -> str:
    """sha256 hex of everything that decides the cached pixels (see the module docstring)."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": FORMAT, "decoder": decoder_identity(), "size": size,
                              "channels": channels}, sort_keys=True).encode())
    if any(not r.md5 for r in records):
        digest.update(f"\nroot\t{Path(root).resolve()}".encode())
    for r in records:
        if r.md5:
            identity = r.md5
        else:
            try:
                stat = (Path(root) / r.path).stat()
            except FileNotFoundError:
                raise FileNotFoundError(f"image listed in the index is missing: {Path(root) / r.path}") from None
            identity = f"{stat.st_size}:{stat.st_mtime_ns}"
        digest.update(f"\n{r.path}\t{identity}".encode())
    return digest.hexdigest()


def cache_file(cache_dir: Path, key: str, size: int, channels: int) -> Path:
    return Path(cache_dir) / f"{key[:32]}-{size}px-{channels}ch{SUFFIX}"


class PixelCache:
    """The read side: ``image(i)`` is image ``i`` as a ``uint8`` CHW tensor (a copy, so a
    transform may write to it), checked against its crc32. Opened lazily in each process; pickles
    without its mapping, so DataLoader workers (fork or spawn) each map the file themselves."""

    def __init__(self, path: Path, header: dict[str, Any], index: np.ndarray) -> None:
        self.path = Path(path)
        self.header = header
        self.index = index
        self._entries = index.tolist()  # Python ints: indexing numpy per item costs more
        self._pixels: np.memmap | None = None
        self._pid: int | None = None
        self._mapped_file: tuple[int, int] | None = None  # (st_dev, st_ino) of the file mapped

    @property
    def size(self) -> int:
        return int(self.header["size"])

    @property
    def channels(self) -> int:
        return int(self.header["channels"])

    @property
    def nbytes(self) -> int:
        return int(self.header["pixel_bytes"])

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def open(cls, path: Path, key: str, count: int, size: int, channels: int, verify: bool = True,
             names: Sequence[str] | None = None) -> "PixelCache":
        """Open and check ``path`` against what it must hold: header, size, index and, with
        ``verify``, every image's crc32 (one pass over the pixels: see the module docstring).
        :class:`PixelCacheError` names the file and the first problem found (the first bad
        image by index, and by ``names[i]`` where given)."""
        header, index = _read_checked(Path(path), key, count, size, channels)
        cache = cls(path, header, index)
        if verify:
            cache.verify(names)
        return cache

    def verify(self, names: Sequence[str] | None = None) -> None:
        """Check every image's pixels against its crc32; :class:`PixelCacheError` names the first
        that differs. One ``zlib.crc32`` call per image, over a ``memoryview`` slice of the mapping
        (no copy; zlib releases the GIL), so the cost is the crc32 pass itself."""
        if not self._entries:
            return  # nothing to check, and no pixel section to map
        pixels = memoryview(self._mapped())
        for i, (offset, c, h, w, expected) in enumerate(self._entries):
            actual = zlib.crc32(pixels[offset:offset + c * h * w])
            if actual != expected:
                name = f" ({names[i]})" if names is not None else ""
                raise PixelCacheError(f"pixel cache {self.path}: image {i}{name} has crc32 {actual:08x}, expected "
                                      f"{expected:08x} (its pixels changed after the cache was written)")

    def _mapped(self) -> np.memmap:
        if self._pixels is None or self._pid != os.getpid():
            expected = _file_bytes(self.header)
            try:
                with open(self.path, "rb") as handle:
                    stat = os.fstat(handle.fileno())
                    head = handle.read(HEADER_BYTES)
                    if stat.st_size != expected or _parse_header(head, self.path)["key"] != self.header["key"]:
                        raise PixelCacheError(f"pixel cache {self.path} changed after it was checked "
                                              f"({stat.st_size} bytes, expected {expected}); rerun the stage "
                                              "to rebuild it")
                    self._pixels = np.memmap(handle, dtype=np.uint8, mode="r", offset=HEADER_BYTES,
                                             shape=(max(self.nbytes, 1),))
            except FileNotFoundError:
                raise PixelCacheError(f"pixel cache {self.path} disappeared after it was opened; "
                                      "rerun the stage to rebuild it") from None
            self._mapped_file = (stat.st_dev, stat.st_ino)
            self._pid = os.getpid()
        return self._pixels

    def image(self, i: int) -> Tensor:
        """Image ``i``, its crc32 checked on the copy returned (what is checked is what is
        served); a mismatch removes the file (see :meth:`_refuse`) and raises."""
        offset, c, h, w, expected = self._entries[i]
        pixels = np.array(self._mapped()[offset:offset + c * h * w])
        actual = zlib.crc32(pixels)
        if actual != expected:
            self._refuse(i, actual, expected)
        return torch.from_numpy(pixels.reshape(c, h, w))

    def _refuse(self, i: int, actual: int, expected: int) -> None:
        """Unlink the file if it is still the one this process mapped (a rebuilt file under the
        same name is another inode, and is left alone: a builder only links a new file once the
        old name is gone, so the window is one ``stat`` to one ``unlink``), then raise."""
        try:
            stat = os.stat(self.path)
            removed = (stat.st_dev, stat.st_ino) == self._mapped_file
            if removed:
                os.unlink(self.path)
            done = "removed it" if removed else "it was already replaced"
        except FileNotFoundError:
            done = "it was already removed"
        except OSError as err:
            done = f"could not remove it ({err}): remove it by hand"
        raise PixelCacheError(f"pixel cache {self.path}: image {i} has crc32 {actual:08x}, expected {expected:08x} "
                              f"(its pixels changed after the cache was checked); {done}, so rerun the stage to "
                              "rebuild the cache")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pixels"], state["_pid"], state["_mapped_file"] = None, None, None  # each process maps it itself
        return state


def _file_bytes(header: dict[str, Any]) -> int:
    return int(header["index_offset"]) + INDEX_COLUMNS * 8 * int(header["count"])


def _parse_header(head: bytes, path: Path) -> dict[str, Any]:
    if len(head) < HEADER_BYTES or not head.startswith(MAGIC):
        raise PixelCacheError(f"pixel cache {path}: no {MAGIC.decode()} header in its first {HEADER_BYTES} bytes "
                              "(not a complete pixel cache)")
    try:
        header = json.loads(head[len(MAGIC):].decode("utf-8").strip())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PixelCacheError(f"pixel cache {path}: unreadable header ({err})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise PixelCacheError(f"pixel cache {path}: header format {header.get('format') if isinstance(header, dict) else header!r}, "
                              f"expected {FORMAT}")
    return header


def _read_checked(path: Path, key: str, count: int, size: int, channels: int) -> tuple[dict[str, Any], np.ndarray]:
    try:
        actual = path.stat().st_size
        with open(path, "rb") as handle:
            header = _parse_header(handle.read(HEADER_BYTES), path)
            expected_fields = {"key": key, "count": count, "size": size, "channels": channels}
            for name, value in expected_fields.items():
                if header.get(name) != value:
                    raise PixelCacheError(f"pixel cache {path}: {name} {header.get(name)!r}, expected {value!r} "
                                          "(the file is not the cache of these images at this size)")
            expected = _file_bytes(header)
            if actual != expected:
                raise PixelCacheError(f"pixel cache {path}: {actual} bytes, expected {expected} "
                                      "(truncated or overwritten)")
            handle.seek(int(header["index_offset"]))
            index = np.frombuffer(handle.read(INDEX_COLUMNS * 8 * count), dtype="<i8").reshape(count, INDEX_COLUMNS)
    except FileNotFoundError:
        raise PixelCacheError(f"pixel cache {path} does not exist") from None
    index = index.astype(np.int64)
    if count:
        lengths = index[:, 1] * index[:, 2] * index[:, 3]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        problems = []
        if not np.array_equal(index[:, 0], starts) or int(lengths.sum()) != int(header["pixel_bytes"]):
            problems.append("image offsets do not tile the pixel section")
        if (index[:, 1] != channels).any():
            problems.append(f"an image with other than {channels} channels")
        if (np.minimum(index[:, 2], index[:, 3]) > size).any() or (index[:, 2:4] < 1).any():
            problems.append(f"an image whose shorter side is not in [1, {size}]")
        if ((index[:, 4] < 0) | (index[:, 4] >= 2**32)).any():
            problems.append("a crc32 outside [0, 2**32)")
        if problems:
            raise PixelCacheError(f"pixel cache {path}: inconsistent index ({'; '.join(problems)})")
    return header, index


class _Decoded(Dataset):
    """Image ``i`` of ``records`` at short side ``size``: what a build writes, in order."""

    def __init__(self, root: Path, records: Sequence[Record], channels: int, size: int) -> None:
        self.paths = [Path(root) / r.path for r in records]
        self.channels, self.size = channels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        return decode_at_short_side(self.paths[i], self.channels, self.size)


def decoded_images(root: Path, records: Sequence[Record], channels: int, size: int,
                   num_workers: int = 0) -> Iterator[Tensor]:
    """Every record's image at short side ``size``, in order; ``num_workers`` decoding processes
    (a DataLoader: forked workers with one thread each, in order)."""
    source = _Decoded(root, records, channels, size)
    if num_workers <= 0:
        yield from (source[i] for i in range(len(source)))
        return
    yield from DataLoader(source, batch_size=None, num_workers=num_workers, prefetch_factor=8)


def build(path: Path, root: Path, records: Sequence[Record], size: int, channels: int, key: str,
          num_workers: int = 0) -> None:
    """Write the cache of ``records`` to ``path`` atomically (a hidden ``.partial`` file, then a
    link to ``path``); the caller holds the build lock. If ``path`` appears meanwhile (a builder
    that does not take the lock), that file is kept and ours discarded."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    index = np.zeros((len(records), INDEX_COLUMNS), dtype="<i8")
    try:
        with open(partial, "wb") as handle:
            handle.write(b"\0" * HEADER_BYTES)  # no magic until the end: an unfinished file never parses
            offset = 0
            phase = PhaseLog(f"pixel cache {path.name}", len(records))
            for i, image in enumerate(decoded_images(root, records, channels, size, num_workers)):
                c, h, w = image.shape
                data = image.contiguous().numpy().tobytes()
                handle.write(data)
                index[i] = (offset, c, h, w, zlib.crc32(data))  # of the bytes written, not recomputed
                offset += c * h * w
                phase.update()
            index_offset = HEADER_BYTES + offset + (-offset % 8)
            handle.write(b"\0" * (-offset % 8))
            handle.write(index.tobytes())
            header = {"format": FORMAT, "key": key, "count": len(records), "size": size, "channels": channels,
                      "pixel_bytes": offset, "index_offset": index_offset, "decoder": decoder_identity()}
            text = MAGIC + json.dumps(header, sort_keys=True).encode()
            if len(text) > HEADER_BYTES:
                raise AssertionError(f"pixel-cache header of {len(text)} bytes exceeds {HEADER_BYTES}")
            handle.seek(0)
            handle.write(text.ljust(HEADER_BYTES, b" "))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(partial, path)  # atomic, and never replaces a finished file
        except FileExistsError:
            pass
        except OSError as err:  # a file system without hard links
            if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
                raise
            os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


class _BuildLock:
    """An exclusive ``flock`` on ``<cache>.lock``, released by the kernel if the holder dies."""

    def __init__(self, path: Path) -> None:
        self.path = path.with_name(path.name + ".lock")

    def __enter__(self) -> "_BuildLock":
        self.handle = open(self.path, "a+b")
        fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
        self.handle.close()


def open_or_build(cache_dir: Path, root: Path, records: Sequence[Record], size: int, channels: int,
                  num_workers: int = 0) -> PixelCache:
    """The pixel cache of ``records`` at short side ``size`` in ``cache_dir``: opened if a
    complete one is there, its every image checked against its crc32, else built (once, whoever
    else asks at the same time). A file that fails a check is rebuilt with a warning naming it
    and the problem (for pixels, the first bad image's index and path). A cache this call built
    is not read back: its crc32s were taken from the bytes written, and reading them back from
    the page cache would check only the page cache (each read checks its image anyway)."""
    if size < 1:
        raise ValueError(f"pixel-cache size must be a positive number of pixels, got {size}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(root, records, size, channels)
    path = cache_file(cache_dir, key, size, channels)
    names = [r.path for r in records]
    if path.exists():
        try:
            return PixelCache.open(path, key, len(records), size, channels, names=names)
        except PixelCacheError:
            pass  # checked again, and rebuilt, under the lock
    with _BuildLock(path):
        for stale in cache_dir.glob(f".{path.name}.*.partial"):  # left by a killed build
            stale.unlink(missing_ok=True)
        if path.exists():
            try:
                return PixelCache.open(path, key, len(records), size, channels, names=names)
            except PixelCacheError as err:
                warnings.warn(f"{err}; rebuilding it", stacklevel=2)
                path.unlink()
        build(path, root, records, size, channels, key, num_workers)
        return PixelCache.open(path, key, len(records), size, channels, verify=False)


__all__ = ["PixelCache", "PixelCacheError", "build", "cache_file", "cache_key", "decoded_images", "open_or_build"]
