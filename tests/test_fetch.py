"""kdlib.data.fetch against a real local HTTP server and real archives (no mocked downloads)."""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import logging
import socket
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from kdlib.data import fetch as fetch_mod
from kdlib.data.fetch import MARKER_NAME, FetchError, UnsafeArchiveError, extract_archive, fetch

FILES = {
    "a.txt": b"alpha\n",
    "b.bin": bytes(range(256)) * 4,
    "nested/deeper/c.txt": b"gamma\n",
}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def build_tar(path: Path, top: str = "pkg", mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in FILES.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def build_zip(path: Path, top: str = "pkg", extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in {**{f"{top}/{k}": v for k, v in FILES.items()}, **(extra or {})}.items():
            zf.writestr(name, data)
    return path


def build_unsafe_tar(path: Path, kind: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("pkg/ok.txt")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"ok\n"))
        if kind == "dotdot":
            evil = tarfile.TarInfo("../evil")
        elif kind == "absolute":
            evil = tarfile.TarInfo("/tmp/kdlib-test-evil")
        elif kind == "symlink":
            evil = tarfile.TarInfo("pkg/passwd")
            evil.type, evil.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "relative-symlink":
            evil = tarfile.TarInfo("pkg/up")
            evil.type, evil.linkname = tarfile.SYMTYPE, "../../outside"
        elif kind == "chained-symlink":  # lexically inside, outside once "l1" is on disk
            first = tarfile.TarInfo("l1")
            first.type, first.linkname = tarfile.SYMTYPE, "."
            tar.addfile(first)
            evil = tarfile.TarInfo("l1/l2")
            evil.type, evil.linkname = tarfile.SYMTYPE, ".."
        elif kind == "hardlink":
            evil = tarfile.TarInfo("pkg/hard")
            evil.type, evil.linkname = tarfile.LNKTYPE, "../outside"
        else:
            raise AssertionError(kind)
        data = b"" if evil.issym() or evil.islnk() else b"evil\n"
        evil.size = len(data)
        tar.addfile(evil, io.BytesIO(data))
    return path


def assert_extracted(folder: Path) -> None:
    for name, data in FILES.items():
        assert (folder / "pkg" / name).read_bytes() == data
    assert (folder / MARKER_NAME).is_file()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".partial", ".extracting")))


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, counts requests, logs nothing; ``/truncated`` promises more than it sends."""

    def do_GET(self) -> None:
        self.server.hits.append(self.path)  # type: ignore[attr-defined]
        if self.path == "/truncated.tar.gz":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"x" * 100)
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


class Server:
    def __init__(self, root: Path, httpd: http.server.ThreadingHTTPServer) -> None:
        self.root, self.httpd = root, httpd
        self.base = f"http://127.0.0.1:{httpd.server_address[1]}"

    @property
    def hits(self) -> list[str]:
        return self.httpd.hits  # type: ignore[attr-defined]

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


@pytest.fixture
def server(tmp_path: Path):
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(CountingHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.hits = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield Server(root, httpd)
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "downloads"


# --- successful downloads -------------------------------------------------------------------


def test_fetch_tar_gz_with_sha256(server: Server, dest: Path) -> None:
    archive = build_tar(server.root / "data.tar.gz")
    out = fetch(server.url("data.tar.gz"), dest, sha256=sha256_of(archive), progress=False)
    assert out == dest / "data"
    assert_extracted(out)
    assert (dest / "data.tar.gz").read_bytes() == archive.read_bytes()
    assert leftovers(dest) == []


def test_fetch_zip_with_md5_and_filename(server: Server, dest: Path) -> None:
    archive = build_zip(server.root / "data.zip")
    out = fetch(server.url("data.zip"), dest, md5=md5_of(archive).upper(), filename="renamed.zip",
                progress=False)
    assert out == dest / "renamed"
    assert_extracted(out)


def test_fetch_without_extract_returns_the_archive(server: Server, dest: Path) -> None:
    archive = build_tar(server.root / "data.tar.gz")
    out = fetch(server.url("data.tar.gz"), dest, sha256=sha256_of(archive), md5=md5_of(archive),
                extract=False, progress=False)
    assert out == dest / "data.tar.gz" and out.read_bytes() == archive.read_bytes()
    assert not (dest / "data").exists()


def test_fetch_is_idempotent(server: Server, dest: Path) -> None:
    archive = build_tar(server.root / "data.tar.gz")
    digest = sha256_of(archive)
    first = fetch(server.url("data.tar.gz"), dest, sha256=digest)  # default progress: no bar off a tty
    assert len(server.hits) == 1
    (first / "pkg" / "a.txt").write_bytes(b"touched")  # proves the folder is not re-extracted
    assert fetch(server.url("data.tar.gz"), dest, sha256=digest, progress=False) == first
    assert fetch(server.url("data.tar.gz"), dest, sha256=digest, extract=False, progress=False).is_file()
    (dest / "data.tar.gz").unlink()  # the marker alone is enough once extracted
    assert fetch(server.url("data.tar.gz"), dest, sha256=digest, progress=False) == first
    assert len(server.hits) == 1
    assert (first / "pkg" / "a.txt").read_bytes() == b"touched"


def test_existing_file_with_wrong_checksum_is_replaced(
    server: Server, dest: Path, caplog: pytest.LogCaptureFixture
) -> None:
    archive = build_tar(server.root / "data.tar.gz")
    dest.mkdir()
    (dest / "data.tar.gz").write_bytes(b"stale or corrupt")
    with caplog.at_level(logging.WARNING, logger="kdlib.data.fetch"):
        out = fetch(server.url("data.tar.gz"), dest, sha256=sha256_of(archive), progress=False)
    assert len(server.hits) == 1
    assert "downloading it again" in caplog.text and "data.tar.gz" in caplog.text
    assert (dest / "data.tar.gz").read_bytes() == archive.read_bytes()
    assert_extracted(out)


@pytest.mark.parametrize("mode,suffix", [("w", ".tar"), ("w:bz2", ".tar.bz2"), ("w:xz", ".tar.xz"),
                                         ("w:gz", ".tgz")])
def test_extract_archive_tar_formats(tmp_path: Path, mode: str, suffix: str) -> None:
    archive = build_tar(tmp_path / f"data{suffix}", mode=mode)
    assert extract_archive(archive, tmp_path / "out") == tmp_path / "out"
    assert_extracted(tmp_path / "out")


# --- failures -------------------------------------------------------------------------------


def test_wrong_checksum_leaves_nothing(server: Server, dest: Path) -> None:
    archive = build_tar(server.root / "data.tar.gz")
    wrong = "0" * 64
    with pytest.raises(FetchError) as info:
        fetch(server.url("data.tar.gz"), dest, sha256=wrong, progress=False)
    message = str(info.value)
    assert str(dest / "data.tar.gz") in message and wrong in message and sha256_of(archive) in message
    assert list(dest.iterdir()) == []  # no archive, no .partial, no extracted folder


def test_http_404_names_the_url(server: Server, dest: Path) -> None:
    url = server.url("missing.tar.gz")
    with pytest.raises(FetchError, match="404") as info:
        fetch(url, dest, sha256="0" * 64, progress=False)
    assert url in str(info.value) and "root" in str(info.value)
    assert list(dest.iterdir()) == []


def test_unreachable_port_fails_fast(dest: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/data.tar.gz"
    start = time.monotonic()
    with pytest.raises(FetchError) as info:
        fetch(url, dest, sha256="0" * 64, timeout_s=3, progress=False)
    assert time.monotonic() - start < 5
    assert url in str(info.value) and "by hand" in str(info.value)
    assert list(dest.iterdir()) == []


def test_silent_server_times_out(dest: Path) -> None:
    with socket.socket() as sock:  # accepts connections (backlog) but never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/data.tar.gz"
        start = time.monotonic()
        with pytest.raises(FetchError, match="no response within 0.5 s"):
            fetch(url, dest, sha256="0" * 64, timeout_s=0.5, progress=False)
        assert time.monotonic() - start < 5
    assert list(dest.iterdir()) == []


def test_truncated_transfer(server: Server, dest: Path) -> None:
    with pytest.raises(FetchError, match="truncated.tar.gz"):
        fetch(server.url("truncated.tar.gz"), dest, sha256="0" * 64, progress=False)
    assert list(dest.iterdir()) == []


def test_checksum_required_and_well_formed(server: Server, dest: Path) -> None:
    with pytest.raises(ValueError, match="sha256 or md5"):
        fetch(server.url("data.tar.gz"), dest, progress=False)
    with pytest.raises(ValueError, match="64 hex digits"):
        fetch(server.url("data.tar.gz"), dest, sha256="abc", progress=False)
    with pytest.raises(ValueError, match="not a supported archive"):
        fetch(server.url("data.bin"), dest, sha256="0" * 64, progress=False)
    assert server.hits == []


# --- unsafe archives ------------------------------------------------------------------------


@pytest.fixture(params=["data-filter", "own-checks"])
def tar_checks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the tar tests with tarfile's data filter and with the fallback for older Pythons."""
    if request.param == "own-checks":
        monkeypatch.setattr(fetch_mod, "_tar_has_data_filter", lambda: False)
    elif not hasattr(tarfile, "data_filter"):
        pytest.skip("tarfile has no data filter on this Python")
    return request.param


@pytest.mark.parametrize("kind,member", [
    ("dotdot", "../evil"),
    ("absolute", "/tmp/kdlib-test-evil"),
    ("symlink", "pkg/passwd"),
    ("relative-symlink", "pkg/up"),
    ("hardlink", "pkg/hard"),
    ("chained-symlink", "l1/l2"),
])
def test_unsafe_tar_is_refused(tmp_path: Path, tar_checks: str, kind: str, member: str) -> None:
    archive = build_unsafe_tar(tmp_path / "evil.tar.gz", kind)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(UnsafeArchiveError, match=repr(member).replace(".", r"\.")):
        extract_archive(archive, work / "out")
    assert list(work.iterdir()) == []  # no dest, no temporary folder
    assert not (tmp_path / "evil").exists() and not (tmp_path / "outside").exists()


def test_unsafe_tar_via_fetch_leaves_no_folder(server: Server, dest: Path) -> None:
    archive = build_unsafe_tar(server.root / "evil.tar.gz", "symlink")
    with pytest.raises(UnsafeArchiveError, match="passwd"):
        fetch(server.url("evil.tar.gz"), dest, sha256=sha256_of(archive), progress=False)
    assert sorted(p.name for p in dest.iterdir()) == ["evil.tar.gz"]  # verified archive only


def test_unsafe_zip_is_refused(tmp_path: Path) -> None:
    archive = build_zip(tmp_path / "evil.zip", extra={"../evil": b"evil\n"})
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(UnsafeArchiveError, match=r"'\.\./evil'"):
        extract_archive(archive, work / "out")
    assert list(work.iterdir()) == [] and not (tmp_path / "evil").exists()


# --- extract_archive bookkeeping ------------------------------------------------------------


def test_extract_archive_marker_and_foreign_folders(tmp_path: Path) -> None:
    old = build_tar(tmp_path / "old.tar.gz", top="old")
    new = build_tar(tmp_path / "new.tar.gz", top="pkg")
    out = tmp_path / "out"
    extract_archive(old, out)
    assert (out / "old").is_dir()
    marker = (out / MARKER_NAME).read_text()
    assert sha256_of(old) in marker and md5_of(old) in marker
    # same archive again: untouched
    (out / "old" / "a.txt").write_bytes(b"touched")
    extract_archive(old, out)
    assert (out / "old" / "a.txt").read_bytes() == b"touched"
    # another version of the archive: replaced as a whole
    extract_archive(new, out)
    assert not (out / "old").exists()
    assert_extracted(out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # a folder kdlib did not make is never touched
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    with pytest.raises(FetchError, match="no .kdlib-extracted marker"):
        extract_archive(new, foreign)
    assert (foreign / "mine.txt").read_text() == "keep"


# --- several archives into one folder -------------------------------------------------------


def test_fetch_all_merges_archives_and_is_idempotent(server: Server, dest: Path) -> None:
    from kdlib.data.fetch import Download, fetch_all

    images = build_tar(server.root / "images.tar", top="Images", mode="w")
    lists = build_zip(server.root / "lists.zip", top="lists")
    downloads = [Download(server.url("images.tar"), sha256=sha256_of(images)),
                 Download(server.url("lists.zip"), md5=md5_of(lists), into="splits")]
    out = fetch_all(downloads, dest, "dogs", progress=False)
    assert out == dest / "dogs"
    assert (out / "Images" / "a.txt").read_bytes() == FILES["a.txt"]
    assert (out / "splits" / "lists" / "nested" / "deeper" / "c.txt").read_bytes() == FILES["nested/deeper/c.txt"]
    marker = (out / MARKER_NAME).read_text()
    assert sha256_of(images) in marker and md5_of(lists) in marker and '"into": "splits"' in marker
    (dest / "images.tar").unlink()  # the marker alone is enough once extracted
    assert fetch_all(downloads, dest, "dogs", progress=False) == out
    assert len(server.hits) == 2
    # a new version of one archive: downloaded, and the folder replaced as a whole
    newer = build_tar(server.root / "images.tar", top="Images2", mode="w")
    downloads[0] = Download(server.url("images.tar"), sha256=sha256_of(newer))
    fetch_all(downloads, dest, "dogs", progress=False)
    assert (out / "Images2" / "a.txt").is_file() and not (out / "Images").exists()
    assert len(server.hits) == 3 and leftovers(dest) == []
    assert sorted(p.name for p in dest.iterdir() if p.name.startswith(".")) == []
