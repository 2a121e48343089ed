"""Download and extract a data set given by URLs and checksums, safely and idempotently.

Guarantees:

* **http and https only.** A URL with any other scheme (``file:``, ``data:``, ``ftp:``, ...) is
  refused with :class:`URLSchemeError` before anything is done, and so is a redirect to one: the
  download's opener has no handler for other schemes at all, and its redirect handler checks
  every ``Location`` before following it.
* **Verified or nothing.** :func:`fetch` requires a sha256 or md5 sum (both are checked when both
  are given). The download streams into ``<name>.<pid>.partial`` beside the final file while
  the checksum is computed; only a matching file is renamed to its final name. A failed or
  mismatching download deletes its ``.partial`` file; only a hard kill (``kill -9``, a crash, a
  power cut) can leave one, and the next download of that file resumes it with an HTTP
  ``Range`` request (the server answers 206), or restarts it cleanly when the server ignores
  the range (200) or refuses it (416). A resumed file is verified as a whole, like any other;
  when it mismatches, it is downloaded once more from the start. Leftovers whose pid is alive
  belong to a running download and are never touched.
* **Bounded.** A download larger than ``max_download_bytes`` is refused before its body is read
  when the server announces its length, and aborted as soon as more arrives otherwise. Before
  anything is extracted, every archive's member headers are read: more than
  ``max_archive_members`` members, more than ``max_extracted_bytes`` declared bytes, or (above
  :data:`RATIO_FLOOR_BYTES`) a declared total more than ``max_compression_ratio`` times the
  archive's size (a decompression bomb) are refused. zipfile never writes more than a member's
  declared size, and tar sizes are exact, so the declared total bounds what is written. Each
  error names the archive or URL, the figure, the limit and the key that raises it
  (:class:`Limits`; the data-set preset keys of the same names).
* **Atomic extraction.** :func:`extract_archives` extracts into the hidden folder
  ``.<dest>.<pid>.extracting`` beside ``dest`` and renames it to ``dest`` only when every member
  is out and the marker file ``.kdlib-extracted`` (holding the archives' sums) is written, so
  ``dest`` is either absent or complete. Leftover ``.extracting`` and ``.old`` folders of killed
  runs (their pid is dead) are removed by the next extraction to the same ``dest``.
* **Safe archives.** Members with absolute paths or ``..`` components, links that point outside
  the target, and device files are refused with :class:`UnsafeArchiveError` before anything is
  extracted; tar files are additionally extracted with tarfile's ``"data"`` filter where the
  Python version has it.
* **Normal file modes.** Downloaded files and every extracted file get ``0666 & ~umask`` and every
  extracted folder ``0777 & ~umask``, whatever modes the archive recorded (data sets need no
  executable, setuid or read-only bits).
* **Idempotent.** A file already present with the right checksum is not downloaded again (one
  with a wrong checksum is, with a warning); a ``dest`` whose marker matches the archives is left
  as it is.
* **No hangs, clear errors.** Every network wait is bounded by ``timeout_s``; offline and HTTP
  errors raise :class:`FetchError` naming the URL and the reason, and saying how to fetch the
  data by hand.
* **No printed credentials.** Every URL this module puts in an error or a log line goes through
  :func:`mask_url` (``https://user:***@host/...``), and so does every :class:`FetchError`'s
  message; ``scripts/push_run_cache.py`` masks DVC remote URLs with it too.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Sequence

from tqdm import tqdm

from kdlib.outputs import remove_path, swap_into_place
from kdlib.process import process_alive

log = logging.getLogger(__name__)

MARKER_NAME = ".kdlib-extracted"
CHUNK_SIZE = 1 << 20
# longest first: ".tar.gz" must win over ".gz"-less ".tar"
ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".txz", ".tar", ".zip")
ALLOWED_SCHEMES = ("http", "https")
_HEX_LENGTH = {"sha256": 64, "md5": 32}

GIB = 1 << 30
# Defaults fit every data set kdlib has a layout for (COCO train2014.zip: 13.5 GB, 82,783 files;
# FoodX-251: 118,475 train images) with room to spare; ImageNet-1k (~150 GB, 1.28M files) needs
# all three raised, on purpose: a preset that fetches that much should say so.
DEFAULT_MAX_DOWNLOAD_BYTES = 64 * GIB
DEFAULT_MAX_EXTRACTED_BYTES = 64 * GIB
DEFAULT_MAX_ARCHIVE_MEMBERS = 500_000
# Images barely compress (ratio ~1) and the most compressible real member, COCO's annotation
# json, reaches ~6; deflate's own ceiling is ~1030, so 100 tells a bomb from data.
DEFAULT_MAX_COMPRESSION_RATIO = 100.0
# Below this declared total an archive cannot hurt whatever its ratio (a small zip of text
# may compress 200-fold), so the ratio is only checked above it.
RATIO_FLOOR_BYTES = 64 << 20


MASK = "***"
# Query parameters that carry a credential (signed S3 / GCS URLs, Azure SAS, API keys and tokens)
_SECRET_PARAMS = ("password", "passwd", "pwd", "secret", "client_secret", "token", "access_token", "refresh_token",
                  "auth", "api_key", "apikey", "key", "sig", "signature", "x-amz-signature", "x-amz-credential",
                  "x-amz-security-token", "x-goog-signature", "x-goog-credential")
# scheme://user:password@ anywhere in a text; a password may hold ':' but not '/', '@' or blanks
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/?#@:'\"]*):[^\s/?#@'\"]*@")
_SECRET_QUERY = re.compile(r"(?P<head>[?&;](?:" + "|".join(map(re.escape, _SECRET_PARAMS)) + r")=)[^&;#\s'\"]+",
                           re.IGNORECASE)


def mask_url(text: str, *urls: str) -> str:
    """``text`` (a URL, or a message holding URLs) with the credentials of every URL in it masked:
    ``https://user:secret@host/x?token=abc`` becomes ``https://user:***@host/x?token=***``.

    The project prints URLs in errors and logs (data-set downloads, DVC remotes); a password in
    one would end up in terminals, CI logs and issue reports. The user name and host stay, so the
    message still says which remote or download failed. ``urls``: URLs whose password must also
    go where it appears without its URL, as ``http.client`` shows it (``nonnumeric port:
    'secret@host'`` for a URL with credentials); each ``password@`` becomes ``***@``."""
    for url in urls:
        try:
            password = urllib.parse.urlsplit(url).password if isinstance(url, str) else None
        except ValueError:
            password = None
        for secret in {password, urllib.parse.unquote(password or "")} - {None, ""}:
            text = text.replace(f"{secret}@", f"{MASK}@")
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['head']}{MASK}", text)


class FetchError(RuntimeError):
    """A download or extraction failed: network or HTTP error, checksum mismatch, bad archive.
    Its message never shows a URL's credentials (:func:`mask_url`)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(mask_url(a) if isinstance(a, str) else a for a in args))


class UnsafeArchiveError(FetchError):
    """An archive member would land outside the target folder (or is a device file)."""


class URLSchemeError(FetchError, ValueError):
    """A URL, or a redirect's target, whose scheme is not http or https."""


class LimitError(FetchError):
    """A download or an archive exceeds one of the :class:`Limits`."""


@dataclass(frozen=True)
class Limits:
    """How much one fetch may download and extract (see the module docstring).

    The field names are those of the data-set preset keys that set them, so an error can say
    which key to raise."""

    max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES  # per downloaded file
    max_extracted_bytes: int = DEFAULT_MAX_EXTRACTED_BYTES  # per archive: sum of declared member sizes
    max_archive_members: int = DEFAULT_MAX_ARCHIVE_MEMBERS  # per archive
    max_compression_ratio: float = DEFAULT_MAX_COMPRESSION_RATIO  # per archive: declared total / archive size


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Download:
    """One file of a data set shipped as several: its URL, sums, file name and where it goes.

    ``into`` is the sub-folder (``/``-separated, relative) of the data set's folder the archive
    is extracted into: ``""`` for the folder itself. ``filename`` defaults to the URL's last
    path component."""

    url: str
    sha256: str | None = None
    md5: str | None = None
    filename: str | None = None
    into: str = ""

    @property
    def name(self) -> str:
        return self.filename if self.filename is not None else url_basename(self.url)


def check_url(url: str) -> None:
    """Raise :class:`URLSchemeError` naming ``url`` unless its scheme is http or https."""
    scheme = urllib.parse.urlsplit(url).scheme.lower() if isinstance(url, str) else ""
    if scheme not in ALLOWED_SCHEMES:
        raise URLSchemeError(
            f"refusing to download {url!r}: its scheme is {scheme or 'missing'!r}, and only "
            f"{' and '.join(ALLOWED_SCHEMES)} URLs are allowed (a local file is given as `root`, not as a URL)"
        )


def check_into(into: str) -> str:
    """``into`` when it is a safe relative ``/``-separated folder (``""`` allowed), else ValueError."""
    if not isinstance(into, str) or into.startswith(("/", "\\")) or "\\" in into or "\0" in into \
            or ".." in into.split("/") or (len(into) > 1 and into[1] == ":"):
        raise ValueError(f"into = {into!r}: expected a relative folder inside the data set folder, without '..'")
    return into.strip("/")


def check_filename(name: str, url: str, extract: bool = True) -> str | None:
    """The archive stem of the plain file name ``name`` (None when ``extract`` is false), else ValueError."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(mask_url(f"file name {name!r} (for {url}) is not a plain file name; pass filename="))
    return archive_stem(name) if extract else None


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


def expected_sums(sha256: str | None = None, md5: str | None = None) -> dict[str, str]:
    """The given sums, lower-cased; ValueError when none is given or one is not hex of the right length."""
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


# --- leftovers of killed runs ---------------------------------------------------------------


def tagged_path(folder: Path, base: str, suffix: str) -> Path:
    """``folder/<base>.<this pid><suffix>``: a name a later run can tell is a leftover once we are dead."""
    return Path(folder) / f"{base}.{os.getpid()}{suffix}"


def dead_leftovers(folder: Path, base: str, suffix: str) -> list[Path]:
    """The ``<base>.<pid><suffix>`` entries of ``folder`` whose pid is no running process, sorted."""
    pattern = re.compile(re.escape(base) + r"\.(\d+)" + re.escape(suffix) + r"\Z")
    try:
        entries = list(Path(folder).iterdir())
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        match = pattern.match(entry.name)
        if match and not process_alive(int(match.group(1))):
            found.append(entry)
    return sorted(found)


def remove_dead_leftovers(folder: Path, base: str, suffix: str) -> list[Path]:
    """Delete (files or whole folders) what :func:`dead_leftovers` finds; return what was removed."""
    removed = dead_leftovers(folder, base, suffix)
    for path in removed:
        log.info("%s: removing the leftover of a killed run", path)
        remove_path(path)
    return removed


def _umask() -> int:
    try:  # Linux states it without changing it (changing it races with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_modes() -> tuple[int, int]:
    """(file mode, folder mode) a plain ``open`` and ``mkdir`` would give: 0666 and 0777 less the umask."""
    mask = _umask()
    return 0o666 & ~mask, 0o777 & ~mask


def normalize_modes(root: Path) -> None:
    """Give every regular file under ``root`` 0666 & ~umask and every folder (``root`` too) 0777 & ~umask.

    Symbolic links are neither followed nor changed."""
    file_mode, dir_mode = normal_modes()
    os.chmod(root, dir_mode)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, dir_mode)
        for name in files:
            path = os.path.join(folder, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.chmod(path, file_mode)


# --- fetching -------------------------------------------------------------------------------


def fetch(
    url: str,
    dest_dir: Path,
    sha256: str | None = None,
    md5: str | None = None,
    filename: str | None = None,
    extract: bool = True,
    timeout_s: float = 30.0,
    progress: bool = True,
    limits: Limits = DEFAULT_LIMITS,
) -> Path:
    """Download ``url`` into ``dest_dir``, verify it, and (by default) extract it.

    The file is saved as ``dest_dir/<filename>`` (default: the last component of the URL path).
    At least one of ``sha256`` and ``md5`` is required; every one given must match. A file
    already present with the right sums is not downloaded again; one with wrong sums is
    downloaded again and replaced. ``timeout_s`` bounds each network wait (connecting and every
    read), not the whole transfer. ``progress`` shows a tqdm bar on a terminal only. ``limits``
    bounds the download and the extraction.

    Returns the archive path if ``extract`` is false, else the extracted folder
    ``dest_dir/<filename without its archive suffix>`` (see :func:`extract_archive`). When that
    folder's marker already matches the given sums, it is returned without touching the archive
    (which may have been deleted to save space).

    Raises :class:`URLSchemeError` (a ``ValueError`` too) for a URL that is not http(s), and
    ``ValueError`` for a missing or malformed checksum or an unusable file name, all before any
    work; :class:`FetchError` for network/HTTP errors, checksum mismatches and exceeded limits
    (:class:`LimitError`), and :class:`UnsafeArchiveError` for archives with members that would
    escape the target folder.
    """
    check_url(url)
    expected = expected_sums(sha256=sha256, md5=md5)
    name = filename if filename is not None else url_basename(url)
    stem = check_filename(name, url, extract)  # fail before downloading anything

    dest_dir = Path(dest_dir)
    if stem is not None:
        marker = _read_marker(dest_dir / stem)
        if marker is not None and all(marker.get(k) == v for k, v in expected.items()):
            remove_dead_leftovers(dest_dir, name, ".partial")  # nothing left to resume
            return dest_dir / stem
    archive = _ensure_downloaded(url, dest_dir / name, expected, timeout_s, progress, limits)
    if stem is None:
        return archive
    return extract_archive(archive, dest_dir / stem, limits)


def fetch_all(
    downloads: Sequence[Download],
    dest_dir: Path,
    folder: str,
    timeout_s: float = 30.0,
    progress: bool = True,
    limits: Limits = DEFAULT_LIMITS,
) -> Path:
    """Download every archive of ``downloads`` into ``dest_dir`` and extract them all into the one
    folder ``dest_dir/<folder>``, each into its ``into`` sub-folder; return that folder.

    Every entry is checked (scheme, sums, file name, ``into``; distinct file names) before
    anything is downloaded, and every archive's members before anything is extracted. The folder
    appears complete or not at all, with one marker for all the archives; when that marker
    already matches the entries, the folder is returned without downloading anything. Archives
    extracted to the same place are merged, a later one's file replacing an earlier one's.
    Errors as :func:`fetch`.
    """
    if not downloads:
        raise ValueError("fetch_all needs at least one download")
    plans = []
    for i, item in enumerate(downloads):
        check_url(item.url)
        sums = expected_sums(sha256=item.sha256, md5=item.md5)
        check_filename(item.name, item.url)
        plans.append((item, sums, check_into(item.into)))
    names = [item.name for item, _, _ in plans]
    if len(set(names)) != len(names):
        raise ValueError(f"downloads: file names {names} are not distinct; give `filename` to tell them apart")
    dest_dir = Path(dest_dir)
    dest = dest_dir / folder
    recorded = _read_multi_marker(dest)
    if recorded is not None and len(recorded) == len(plans) and all(
        entry.get("filename") == item.name and entry.get("into") == into
        and all(entry.get(k) == v for k, v in sums.items())
        for entry, (item, sums, into) in zip(recorded, plans)
    ):
        for name in names:
            remove_dead_leftovers(dest_dir, name, ".partial")  # nothing left to resume
        return dest
    archives = [(_ensure_downloaded(item.url, dest_dir / item.name, sums, timeout_s, progress, limits), into)
                for item, sums, into in plans]
    return extract_archives(archives, dest, limits)


def url_basename(url: str) -> str:
    """The last component of ``url``'s path, percent-decoded."""
    return urllib.parse.unquote(PurePosixPath(urllib.parse.urlsplit(url).path).name)


def _ensure_downloaded(url: str, archive: Path, expected: dict[str, str], timeout_s: float, progress: bool,
                       limits: Limits) -> Path:
    archive.parent.mkdir(parents=True, exist_ok=True)
    if archive.exists():
        actual = file_checksums(archive, tuple(expected))
        if actual == expected:
            log.info("%s: present with the expected checksum; not downloading it again", archive)
            return archive
        log.warning("%s: exists but %s; downloading it again from %s",
                    archive, _describe_mismatch(expected, actual), mask_url(url))
    _download(url, archive, expected, timeout_s, progress, limits.max_download_bytes)
    return archive


def _describe_mismatch(expected: dict[str, str], actual: dict[str, str]) -> str:
    return "; ".join(
        f"its {k} is {actual[k]}, expected {v}" for k, v in expected.items() if actual[k] != v
    )


def _network_error(url: str, reason: str) -> FetchError:
    return FetchError(mask_url(  # the reason may show the password without its URL (http.client's InvalidURL)
        f"could not download {url}: {reason}. If this machine is offline or the server refuses, "
        "download and extract the file by hand and point the data set's `root` at the extracted "
        "folder", url))


def _too_big(url: str, what: str, limit: int) -> LimitError:
    return LimitError(
        f"{url}: {what}, more than max_download_bytes = {limit:,}; the download is refused and "
        "nothing of it is kept. If the file is what you expect, raise `max_download_bytes` in the "
        "data set's preset (Limits.max_download_bytes)"
    )


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) URLs only: urllib's own handler also follows ``ftp:`` ones."""

    def http_error_302(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any) -> Any:
        location = headers.get("location") or headers.get("uri")
        if location is not None:
            target = urllib.parse.urljoin(req.full_url, location)
            if urllib.parse.urlsplit(target).scheme.lower() not in ALLOWED_SCHEMES:
                fp.close()
                raise URLSchemeError(
                    f"refusing the redirect ({code}) from {req.full_url} to {target!r}: only "
                    f"{' and '.join(ALLOWED_SCHEMES)} URLs are allowed, also after redirects"
                )
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_302
    http_error_308 = http_error_302


def _opener() -> urllib.request.OpenerDirector:
    """An opener that can speak http and https only (no file, ftp or data handler to be reached)."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), urllib.request.HTTPHandler(),
                    urllib.request.HTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(), _HTTPOnlyRedirects(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def _claim_leftover(target: Path, partial: Path) -> int:
    """Take over the largest partial download of ``target`` left by a dead process (renamed to
    ``partial``) and delete the others; return how many bytes it holds (0: none)."""
    leftovers = dead_leftovers(target.parent, target.name, ".partial")
    if partial.exists():  # ours, from an earlier attempt in this process
        leftovers.append(partial)
    leftovers = [p for p in leftovers if p.is_file() and not p.is_symlink()]
    if not leftovers:
        return 0
    best = max(leftovers, key=lambda p: p.stat().st_size)
    for other in leftovers:
        if other != best:
            other.unlink(missing_ok=True)
    try:
        os.replace(best, partial)  # atomic: if another process claimed it first, we start afresh
    except FileNotFoundError:
        return 0
    return partial.stat().st_size


def _open_partial(partial: Path, append: bool) -> BinaryIO:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    return os.fdopen(os.open(partial, flags, 0o666), "ab" if append else "wb")  # 0666: the umask applies


def _hash_prefix(partial: Path, algorithms: Sequence[str]) -> dict[str, Any]:
    digests = {name: hashlib.new(name) for name in algorithms}
    with open(partial, "rb") as file:
        while chunk := file.read(CHUNK_SIZE):
            for digest in digests.values():
                digest.update(chunk)
    return digests


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)\Z")


def _download(url: str, target: Path, expected: dict[str, str], timeout_s: float, progress: bool,
              max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES) -> None:
    """Stream ``url`` into ``<target>.<pid>.partial`` (resuming a dead run's), rename it if the sums match."""
    check_url(url)
    partial = tagged_path(target.parent, target.name, ".partial")
    try:
        offset = _claim_leftover(target, partial)
        if offset > max_bytes:
            offset = 0
        resumed = offset > 0
        while True:
            actual = _transfer(url, target, partial, offset, expected, timeout_s, progress, max_bytes)
            if actual == expected:
                break
            if resumed:  # the leftover may have been corrupt: one clean try before blaming the URL
                log.warning("%s: the resumed download %s; downloading it again from the start",
                            target, _describe_mismatch(expected, actual))
                offset, resumed = 0, False
                continue
            raise FetchError(
                f"checksum mismatch for {target} (downloaded from {url}): "
                f"{_describe_mismatch(expected, actual)}. The download is deleted; the file at the "
                "URL is corrupt or has changed, or the checksum is wrong"
            )
        os.chmod(partial, normal_modes()[0])
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _transfer(url: str, target: Path, partial: Path, offset: int, expected: dict[str, str], timeout_s: float,
              progress: bool, max_bytes: int) -> dict[str, str]:
    """Fetch ``url`` into ``partial`` from byte ``offset`` (0: the whole file); return the file's sums."""
    headers = {"User-Agent": "kdlib-fetch"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    log.info("downloading %s to %s%s", mask_url(url), target, f" (resuming at byte {offset:,})" if offset else "")
    try:
        response = _opener().open(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as err:
        err.close()
        if offset and err.code == 416:  # the leftover does not fit the file (changed, or complete)
            log.warning("%s: the server refuses to resume at byte %d (HTTP 416); restarting", mask_url(url), offset)
            return _transfer(url, target, partial, 0, expected, timeout_s, progress, max_bytes)
        raise _network_error(url, f"HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise _network_error(url, _reason(err.reason, timeout_s)) from None
    except (OSError, http.client.HTTPException) as err:
        raise _network_error(url, _reason(err, timeout_s)) from None
    with response:
        check_url(response.geturl())  # the redirect handler already refused others; never trust one check
        if offset:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", "").strip())
            if response.status != 206 or match is None or int(match.group(1)) != offset:
                log.warning("%s: the server does not resume at byte %d (HTTP %d); restarting from the start",
                            mask_url(url), offset, response.status)
                offset = 0
        length_header = response.headers.get("Content-Length")
        total = offset + int(length_header) if length_header and length_header.isdigit() else None
        if total is not None and total > max_bytes:
            raise _too_big(url, f"the server announces {total:,} bytes (Content-Length)", max_bytes)
        digests = _hash_prefix(partial, tuple(expected)) if offset else {n: hashlib.new(n) for n in expected}
        received = offset
        with _open_partial(partial, append=offset > 0) as out, \
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name,
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
                received += len(chunk)
                if received > max_bytes:
                    raise _too_big(url, f"more than {max_bytes:,} bytes arrived (no length was announced)",
                                   max_bytes)
                out.write(chunk)
                for digest in digests.values():
                    digest.update(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise _network_error(url, f"the server closed the connection after {received} of {total} bytes")
    return {name: digest.hexdigest() for name, digest in digests.items()}


def _reason(err: object, timeout_s: float) -> str:
    if isinstance(err, TimeoutError):  # socket.timeout is TimeoutError since Python 3.10
        return f"no response within {timeout_s:g} s"
    return str(err) or type(err).__name__


# --- extraction -----------------------------------------------------------------------------


def extract_archive(archive: Path, dest: Path, limits: Limits = DEFAULT_LIMITS) -> Path:
    """Extract a .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz or .zip ``archive`` into the folder ``dest``.

    :func:`extract_archives` with the one archive extracted into ``dest`` itself; its marker is
    the archive's sha256 and md5, one ``<algorithm> <hex>`` line each. Returns ``dest``.
    """
    return extract_archives([(Path(archive), "")], dest, limits)


def extract_archives(parts: Sequence[tuple[Path, str]], dest: Path, limits: Limits = DEFAULT_LIMITS) -> Path:
    """Extract every ``(archive, into)`` of ``parts`` into ``dest/<into>``, all or nothing.

    Extraction goes to the hidden folder ``.<dest name>.<pid>.extracting`` beside ``dest``, which
    gets the marker file ``.kdlib-extracted`` (the archives' sums) last and is then renamed to
    ``dest``: ``dest`` never holds a partial extraction. If ``dest`` already holds the marker of
    these archives, nothing is done. A ``dest`` with a marker of other archives (an earlier
    extraction of an older version) is replaced; a ``dest`` without a marker was not made here
    and is never touched (:class:`FetchError`).

    Every member of every archive is checked before anything is written: absolute paths, ``..``
    components, links pointing outside the target and device files raise
    :class:`UnsafeArchiveError` naming the member; too many members, too many declared bytes or
    too high a compression ratio raise :class:`LimitError`. Returns ``dest``.
    """
    dest = Path(dest)
    parts = [(Path(archive), check_into(into)) for archive, into in parts]
    for archive, _ in parts:
        if not archive.is_file():
            raise FileNotFoundError(f"archive not found: {archive}")
        archive_stem(archive.name)  # a clear ValueError for unsupported suffixes
    sums = [file_checksums(archive) for archive, _ in parts]
    marker_text = _marker_text(parts, sums)
    old_marker = _read_marker_text(dest)
    if old_marker == marker_text:
        return dest
    if dest.exists() and old_marker is None:
        raise FetchError(
            f"{dest} exists but has no {MARKER_NAME} marker, so it was not extracted by kdlib "
            f"from {', '.join(a.name for a, _ in parts)}; remove it (or point the data set's root at it) "
            "and try again"
        )

    dest.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".extracting", ".old"):
        remove_dead_leftovers(dest.parent, f".{dest.name}", suffix)
    tmp = tagged_path(dest.parent, f".{dest.name}", ".extracting")
    remove_path(tmp)  # ours, from an earlier attempt in this process
    with contextlib.ExitStack() as stack:
        # read and check every archive's members before writing anything
        opened = [(_open_checked(archive, limits, stack), archive, into) for archive, into in parts]
        os.mkdir(tmp, 0o777)  # the umask applies (mkdtemp would make it 0700)
        try:
            for handle, archive, into in opened:
                target = tmp / into if into else tmp
                target.mkdir(parents=True, exist_ok=True)
                _extract_opened(handle, archive, target)
            normalize_modes(tmp)
            (tmp / MARKER_NAME).write_text(marker_text)
            if dest.exists():  # an extraction of other archive versions: swap it out
                log.warning("%s: was extracted from other versions of %s; replacing it",
                            dest, ", ".join(a.name for a, _ in parts))
            swap_into_place(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def _marker_text(parts: Sequence[tuple[Path, str]], sums: Sequence[dict[str, str]]) -> str:
    if len(parts) == 1 and parts[0][1] == "":  # the format of single-archive markers, kept readable
        return "".join(f"{k} {v}\n" for k, v in sums[0].items())
    entries = [{"filename": archive.name, "into": into, **s} for (archive, into), s in zip(parts, sums)]
    return json.dumps({"archives": entries}, indent=1) + "\n"


def _read_marker_text(dest: Path) -> str | None:
    try:
        return (dest / MARKER_NAME).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _read_marker(dest: Path) -> dict[str, str] | None:
    text = _read_marker_text(dest)
    if text is None:
        return None
    sums = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key and value:
            sums[key] = value.strip()
    return sums


def _read_multi_marker(dest: Path) -> list[dict[str, str]] | None:
    text = _read_marker_text(dest)
    if text is None:
        return None
    try:
        entries = json.loads(text)["archives"]
    except (ValueError, KeyError, TypeError):
        return None
    return entries if isinstance(entries, list) and all(isinstance(e, dict) for e in entries) else None


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


def _check_totals(archive: Path, total: int, limits: Limits) -> None:
    if total > limits.max_extracted_bytes:
        raise LimitError(
            f"{archive}: its members declare at least {total:,} bytes, more than max_extracted_bytes = "
            f"{limits.max_extracted_bytes:,}; nothing was extracted. If the archive is what you expect, "
            "raise `max_extracted_bytes` in the data set's preset (Limits.max_extracted_bytes)"
        )
    size = max(archive.stat().st_size, 1)
    if total > RATIO_FLOOR_BYTES and total > limits.max_compression_ratio * size:
        raise LimitError(
            f"{archive}: its members declare {total:,} bytes from {size:,} bytes of archive, a compression "
            f"ratio of {total / size:,.0f}, above max_compression_ratio = {limits.max_compression_ratio:g}; "
            "refused as a likely decompression bomb, nothing was extracted. If the archive is what you "
            "expect, raise `max_compression_ratio` in the data set's preset (Limits.max_compression_ratio)"
        )


def _too_many(archive: Path, count: int, limits: Limits) -> LimitError:
    return LimitError(
        f"{archive}: holds more than max_archive_members = {limits.max_archive_members:,} members "
        f"({count:,} read so far); nothing was extracted. If the archive is what you expect, raise "
        "`max_archive_members` in the data set's preset (Limits.max_archive_members)"
    )


def _open_checked(archive: Path, limits: Limits, stack: contextlib.ExitStack) -> Any:
    """The archive opened (closed by ``stack``) with every member checked for safety and limits."""
    if archive.name.lower().endswith(".zip"):
        try:
            zf = stack.enter_context(zipfile.ZipFile(archive))
        except zipfile.BadZipFile as err:
            raise FetchError(f"{archive}: not a readable zip archive ({err})") from None
        infos = zf.infolist()
        if len(infos) > limits.max_archive_members:
            raise _too_many(archive, len(infos), limits)
        for info in infos:  # zipfile writes symlink members as plain files: only names matter
            why = _unsafe_name(info.filename)
            if why is not None:
                raise UnsafeArchiveError(f"{archive}: member {info.filename!r} {why}; nothing was extracted")
        _check_totals(archive, sum(info.file_size for info in infos), limits)
        return zf
    strict = not _tar_has_data_filter()
    try:
        tar = stack.enter_context(tarfile.open(archive))
        count = total = 0
        # header by header, stopping at the first limit: a bomb's member list is never held whole
        for member in tar:
            count += 1
            if count > limits.max_archive_members:
                raise _too_many(archive, count, limits)
            _check_tar_member(member, archive, strict_links=strict)
            if member.isreg():
                total += member.size
                if total > limits.max_extracted_bytes:
                    _check_totals(archive, total, limits)
        _check_totals(archive, total, limits)
    except tarfile.TarError as err:
        raise FetchError(f"{archive}: not a readable tar archive ({err})") from None
    except EOFError:
        raise FetchError(f"{archive}: the tar archive is truncated") from None
    return tar


def _extract_opened(handle: Any, archive: Path, target: Path) -> None:
    if isinstance(handle, zipfile.ZipFile):
        try:
            handle.extractall(target)
        except zipfile.BadZipFile as err:
            raise FetchError(f"{archive}: not a readable zip archive ({err})") from None
        return
    members = handle.getmembers()  # read while checking: no second pass over the headers
    try:
        if _tar_has_data_filter():
            try:
                handle.extractall(target, members=members, filter="data")
            except tarfile.FilterError as err:
                raise UnsafeArchiveError(
                    f"{archive}: member {err.tarinfo.name!r} refused by tarfile's data filter "
                    f"({err}); nothing was extracted"
                ) from None
        else:
            handle.extractall(target, members=members)
    except tarfile.TarError as err:
        raise FetchError(f"{archive}: not a readable tar archive ({err})") from None
    except EOFError:
        raise FetchError(f"{archive}: the tar archive is truncated") from None
