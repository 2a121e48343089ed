"""Download and extract a data set given by a URL and a checksum, safely and idempotently.

Guarantees:

* **Verified or nothing.** :func:`fetch` requires a sha256 or md5 sum (both are checked when both
  are given). The download streams into ``<name>.<random>.partial`` beside the final file while
  the checksum is computed; only a matching file is renamed to its final name. A failed,
  interrupted or mismatching download leaves no file that looks complete (its ``.partial`` file
  is deleted; only a hard kill can leave one, and it never carries the final name).
* **Atomic extraction.** :func:`extract_archive` extracts into a hidden temporary folder beside
  ``dest`` and renames it to ``dest`` only when every member is out and the marker file
  ``.kdlib-extracted`` (holding the archive's sums) is written, so ``dest`` is either absent or
  complete.
* **Safe archives.** Members with absolute paths or ``..`` components, links that point outside
  the target, and device files are refused with :class:`UnsafeArchiveError` before anything is
  extracted; tar files are additionally extracted with tarfile's ``"data"`` filter where the
  Python version has it.
* **Idempotent.** A file already present with the right checksum is not downloaded again (one
  with a wrong checksum is, with a warning); a ``dest`` whose marker matches the archive is left
  as it is.
* **No hangs, clear errors.** Every network wait is bounded by ``timeout_s``; offline and HTTP
  errors raise :class:`FetchError` naming the URL and the reason, and saying how to fetch the
  data by hand.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

log = logging.getLogger(__name__)

MARKER_NAME = ".kdlib-extracted"
CHUNK_SIZE = 1 << 20
# longest first: ".tar.gz" must win over ".gz"-less ".tar"
ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".txz", ".tar", ".zip")
_HEX_LENGTH = {"sha256": 64, "md5": 32}


class FetchError(RuntimeError):
    """A download or extraction failed: network or HTTP error, checksum mismatch, bad archive."""


class UnsafeArchiveError(FetchError):
    """An archive member would land outside the target folder (or is a device file)."""


def archive_stem(name: str) -> str:
    """``"foo.tar.gz"`` → ``"foo"``; a ``ValueError`` for a name without a supported suffix."""
    lower = name.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    raise ValueError(
        f"{name!r} is not a supported archive; expected one of {', '.join(ARCHIVE_SUFFIXES)} "
        "(or pass extract=False)"
    )


def file_checksums(path: Path, algorithms: tuple[str, ...] = ("sha256", "md5")) -> dict[str, str]:
    """The hex digests of ``path`` for each algorithm, computed in one streaming pass."""
    digests = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_SIZE):
            for digest in digests.values():
                digest.update(chunk)
    return {name: digest.hexdigest() for name, digest in digests.items()}


def fetch(
    url: str,
    dest_dir: Path,
    sha256: str | None = None,
    md5: str | None = None,
    filename: str | None = None,
    extract: bool = True,
    timeout_s: float = 30.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` into ``dest_dir``, verify it, and (by default) extract it.

    The file is saved as ``dest_dir/<filename>`` (default: the last component of the URL path).
    At least one of ``sha256`` and ``md5`` is required; every one given must match. A file
    already present with the right sums is not downloaded again; one with wrong sums is
    downloaded again and replaced. ``timeout_s`` bounds each network wait (connecting and every
    read), not the whole transfer. ``progress`` shows a tqdm bar on a terminal only.

    Returns the archive path if ``extract`` is false, else the extracted folder
    ``dest_dir/<filename without its archive suffix>`` (see :func:`extract_archive`). When that
    folder's marker already matches the given sums, it is returned without touching the archive
    (which may have been deleted to save space).

    Raises ``ValueError`` for a missing or malformed checksum or an unusable file name,
    :class:`FetchError` for network/HTTP errors and checksum mismatches, and
    :class:`UnsafeArchiveError` for archives with members that would escape the target folder.
    """
    expected = _expected_sums(sha256=sha256, md5=md5)
    name = filename if filename is not None else _url_basename(url)
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"file name {name!r} (for {url}) is not a plain file name; pass filename=")
    stem = archive_stem(name) if extract else None  # fail before downloading anything

    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    archive = dest_dir / name
    if stem is not None:
        extracted = dest_dir / stem
        marker = _read_marker(extracted)
        if marker is not None and all(marker.get(k) == v for k, v in expected.items()):
            return extracted

    if archive.exists():
        actual = file_checksums(archive, tuple(expected))
        if actual == expected:
            log.info("%s: present with the expected checksum; not downloading it again", archive)
        else:
            log.warning("%s: exists but %s; downloading it again from %s",
                        archive, _describe_mismatch(expected, actual), url)
            _download(url, archive, expected, timeout_s, progress)
    else:
        _download(url, archive, expected, timeout_s, progress)

    if stem is None:
        return archive
    return extract_archive(archive, dest_dir / stem)


def extract_archive(archive: Path, dest: Path) -> Path:
    """Extract a .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz or .zip ``archive`` into the folder ``dest``.

    Extraction goes to a hidden temporary folder beside ``dest``, which gets the marker file
    ``.kdlib-extracted`` (the archive's sha256 and md5) last and is then renamed to ``dest``:
    ``dest`` never holds a partial extraction. If ``dest`` already holds a marker with the
    archive's sums, nothing is done. A ``dest`` with a marker from another archive (an earlier
    extraction of an older version) is replaced; a ``dest`` without a marker was not made here
    and is never touched (:class:`FetchError`).

    Every member is checked before anything is written: absolute paths, ``..`` components, links
    pointing outside ``dest`` and device files raise :class:`UnsafeArchiveError` naming the
    member. Returns ``dest``.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise FileNotFoundError(f"archive not found: {archive}")
    sums = file_checksums(archive)
    marker_text = "".join(f"{k} {v}\n" for k, v in sums.items())
    old_marker = _read_marker(dest)
    if old_marker == sums:
        return dest
    if dest.exists() and old_marker is None:
        raise FetchError(
            f"{dest} exists but has no {MARKER_NAME} marker, so it was not extracted by kdlib "
            f"from {archive.name}; remove it (or point the data set's root at it) and try again"
        )

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".extracting", dir=dest.parent))
    try:
        lower = archive.name.lower()
        if lower.endswith(".zip"):
            _extract_zip(archive, tmp)
        else:
            archive_stem(archive.name)  # a clear ValueError for unsupported suffixes
            _extract_tar(archive, tmp)
        (tmp / MARKER_NAME).write_text(marker_text)
        if dest.exists():  # an extraction of another archive version: swap it out
            log.warning("%s: was extracted from another version of %s; replacing it", dest, archive.name)
            old = dest.with_name(f".{dest.name}.{os.getpid()}.old")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# --- download -------------------------------------------------------------------------------


def _expected_sums(sha256: str | None, md5: str | None) -> dict[str, str]:
    given = {k: v for k, v in (("sha256", sha256), ("md5", md5)) if v is not None}
    if not given:
        raise ValueError("fetch needs a sha256 or md5 checksum: unverified downloads are never used")
    for algorithm, value in given.items():
        value = value.strip().lower()
        if len(value) != _HEX_LENGTH[algorithm] or any(c not in "0123456789abcdef" for c in value):
            raise ValueError(
                f"{algorithm} checksum {given[algorithm]!r} is not {_HEX_LENGTH[algorithm]} hex digits"
            )
        given[algorithm] = value
    return given


def _url_basename(url: str) -> str:
    return urllib.parse.unquote(PurePosixPath(urllib.parse.urlsplit(url).path).name)


def _describe_mismatch(expected: dict[str, str], actual: dict[str, str]) -> str:
    return "; ".join(
        f"its {k} is {actual[k]}, expected {v}" for k, v in expected.items() if actual[k] != v
    )


def _network_error(url: str, reason: str) -> FetchError:
    return FetchError(
        f"could not download {url}: {reason}. If this machine is offline or the server refuses, "
        "download and extract the file by hand and point the data set's `root` at the extracted "
        "folder"
    )


def _download(url: str, target: Path, expected: dict[str, str], timeout_s: float, progress: bool) -> None:
    """Stream ``url`` into a ``.partial`` file beside ``target``; rename it only if the sums match."""
    request = urllib.request.Request(url, headers={"User-Agent": "kdlib-fetch"})
    log.info("downloading %s to %s", url, target)
    fd, partial_name = tempfile.mkstemp(prefix=f"{target.name}.", suffix=".partial", dir=target.parent)
    partial = Path(partial_name)
    try:
        digests = {name: hashlib.new(name) for name in expected}
        received = 0
        try:
            response = urllib.request.urlopen(request, timeout=timeout_s)
        except urllib.error.HTTPError as err:
            err.close()
            raise _network_error(url, f"HTTP {err.code} {err.reason}") from None
        except urllib.error.URLError as err:
            raise _network_error(url, _reason(err.reason, timeout_s)) from None
        except (OSError, http.client.HTTPException) as err:
            raise _network_error(url, _reason(err, timeout_s)) from None
        with response, os.fdopen(fd, "wb") as out:
            fd = -1  # owned by ``out`` now
            length_header = response.headers.get("Content-Length")
            total = int(length_header) if length_header and length_header.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name,
                      leave=False, disable=None if progress else True) as bar:
                while True:
                    try:
                        chunk = response.read(CHUNK_SIZE)
                    except (OSError, http.client.HTTPException) as err:
                        raise _network_error(
                            url, f"the transfer broke after {received} bytes ({_reason(err, timeout_s)})"
                        ) from None
                    if not chunk:
                        break
                    out.write(chunk)
                    for digest in digests.values():
                        digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise _network_error(url, f"the server closed the connection after {received} of {total} bytes")
        actual = {name: digest.hexdigest() for name, digest in digests.items()}
        if actual != expected:
            raise FetchError(
                f"checksum mismatch for {target} (downloaded from {url}): "
                f"{_describe_mismatch(expected, actual)}. The download is deleted; the file at the "
                "URL is corrupt or has changed, or the checksum is wrong"
            )
        os.replace(partial, target)
    except BaseException:
        if fd != -1:
            os.close(fd)
        partial.unlink(missing_ok=True)
        raise


def _reason(err: object, timeout_s: float) -> str:
    if isinstance(err, TimeoutError):  # socket.timeout is TimeoutError since Python 3.10
        return f"no response within {timeout_s:g} s"
    return str(err) or type(err).__name__


# --- extraction -----------------------------------------------------------------------------


def _read_marker(dest: Path) -> dict[str, str] | None:
    try:
        text = (dest / MARKER_NAME).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    sums = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key and value:
            sums[key] = value.strip()
    return sums


def _unsafe_name(name: str) -> str | None:
    """Why a member name is unsafe (absolute, a drive, ``..``), or ``None`` if it is not."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[0].isalpha() and name[1] == ":"):
        return "has an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "has a '..' component"
    return None


def _inside(root_relative: str) -> bool:
    """Whether a ``/``-separated path relative to the target stays inside it (lexically)."""
    normal = os.path.normpath(root_relative)
    return not (normal == ".." or normal.startswith("../") or os.path.isabs(normal))


def _tar_has_data_filter() -> bool:
    return hasattr(tarfile, "data_filter")


def _check_tar_member(member: tarfile.TarInfo, archive: Path, strict_links: bool) -> None:
    def refuse(why: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(f"{archive}: member {member.name!r} {why}; nothing was extracted")

    why = _unsafe_name(member.name)
    if why is not None:
        raise refuse(why)
    if member.ischr() or member.isblk() or member.isfifo():
        raise refuse("is a device file or fifo")
    if member.issym() or member.islnk():
        target = member.linkname
        if target.startswith("/") or os.path.isabs(target):
            raise refuse(f"links to the absolute path {target!r}")
        # a symlink resolves relative to its own folder, a hard link relative to the archive root
        base = os.path.dirname(member.name) if member.issym() else ""
        if not _inside(os.path.join(base, target)):
            raise refuse(f"links to {target!r}, outside the target folder")
        if strict_links and ".." in target.split("/"):
            # without tarfile's data filter, symlink chains could escape a lexical check
            raise refuse(f"links to {target!r} through '..' (refused on this Python version)")


def _extract_tar(archive: Path, target: Path) -> None:
    has_filter = _tar_has_data_filter()
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                _check_tar_member(member, archive, strict_links=not has_filter)
            if has_filter:
                try:
                    tar.extractall(target, members=members, filter="data")
                except tarfile.FilterError as err:
                    raise UnsafeArchiveError(
                        f"{archive}: member {err.tarinfo.name!r} refused by tarfile's data filter "
                        f"({err}); nothing was extracted"
                    ) from None
            else:
                tar.extractall(target, members=members)
    except tarfile.TarError as err:
        raise FetchError(f"{archive}: not a readable tar archive ({err})") from None
    except EOFError:
        raise FetchError(f"{archive}: the tar archive is truncated") from None


def _extract_zip(archive: Path, target: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:  # zipfile writes symlink members as plain files: only names matter
                why = _unsafe_name(info.filename)
                if why is not None:
                    raise UnsafeArchiveError(
                        f"{archive}: member {info.filename!r} {why}; nothing was extracted"
                    )
            zf.extractall(target, members=infos)
    except zipfile.BadZipFile as err:
        raise FetchError(f"{archive}: not a readable zip archive ({err})") from None
