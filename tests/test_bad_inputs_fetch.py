"""Bad inputs to fetching and preparing: each is refused with a message naming the URL, file, key
or value and what was expected, and leaves nothing half-written (no ``.partial``, ``.extracting``
or ``.old`` entry, no extracted folder, no ``data/prepared``). Also: leftovers of killed runs are
cleaned (or resumed), files get normal modes, and ImageFolder roots do not leak through symlinks.

The HTTP server is real (a thread on 127.0.0.1) with routes that redirect, omit Content-Length,
honour or ignore ``Range``; nothing is mocked.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import stat
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
import numpy as np
from layout_fixtures import IMAGEFOLDER_CLASSES, build_dataset, class_pixels, save_image

from kdlib.data.fetch import (Download, FetchError, LimitError, Limits, URLSchemeError, extract_archive,
                              fetch, fetch_all)
from kdlib.data.prepare import prepare_dataset
from kdlib.data.spec import DatasetSpec
from kdlib.schema import SchemaError, parse

LEFTOVER_SUFFIXES = (".partial", ".extracting", ".old")


# --- a server with routes -------------------------------------------------------------------


class RouteHandler(http.server.BaseHTTPRequestHandler):
    """``server.routes[path]``: {"data": bytes, "ranges": bool, "length": bool} or {"redirect": url}."""

    protocol_version = "HTTP/1.0"  # the body ends when the connection closes: Content-Length is optional

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        server: Any = self.server
        server.log.append((self.path, self.headers.get("Range")))
        route = server.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        if "redirect" in route:
            self.send_response(302)
            self.send_header("Location", route["redirect"])
            self.end_headers()
            return
        data: bytes = route["data"]
        start = 0
        wanted = self.headers.get("Range")
        if wanted and route.get("ranges"):
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if route.get("length", True):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        chunk = 0
        try:
            for i in range(0, len(body), 1 << 16):
                # counted before the write: the client can read the last chunk and the test look at `sent`
                # before this thread runs again (seen on a loaded machine: 3 of 4 chunks counted)
                chunk = min(1 << 16, len(body) - i)
                server.sent += chunk
                self.wfile.write(body[i: i + chunk])
        except (BrokenPipeError, ConnectionResetError):
            server.sent -= chunk  # the client gave up (a size limit): expected; that chunk did not travel

    def log_message(self, format: str, *args: object) -> None:
        pass


class Server:
    def __init__(self) -> None:
        self.httpd: Any = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RouteHandler)
        self.httpd.routes, self.httpd.log, self.httpd.sent = {}, [], 0
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, path: str, **route: Any) -> str:
        self.httpd.routes[path] = route
        return self.base + path

    @property
    def log(self) -> list[tuple[str, str | None]]:
        return self.httpd.log

    @property
    def sent(self) -> int:
        return self.httpd.sent


@pytest.fixture
def server():
    srv = Server()
    thread = threading.Thread(target=srv.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()
    thread.join(timeout=5)


# --- helpers --------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_bytes(files: dict[str, bytes], mode: str = "w:gz", file_mode: int = 0o644) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), file_mode
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def assert_clean(folder: Path, allowed: tuple[str, ...] = ()) -> None:
    """No leftover entry anywhere under ``folder``, no prepared folder, and only ``allowed`` top entries."""
    if not folder.exists():
        return
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*")]
    assert not [n for n in names if n.endswith(LEFTOVER_SUFFIXES)], names
    assert not [n for n in names if n.split("/")[-1] == "prepared"], names
    top = sorted(p.name for p in folder.iterdir())
    assert all(name in allowed for name in top), (top, allowed)


def preset(layout: str = "cub200", **keys: Any) -> DatasetSpec:
    values = {"layout": layout, "image_size": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3,
              "augment": "none", "val_fraction": 0.25, **keys}
    return parse(DatasetSpec, values)


def problems_of(**keys: Any) -> str:
    with pytest.raises(SchemaError) as info:
        preset(**keys)
    return str(info.value)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


def prepare(spec: DatasetSpec, data: Path, name: str = "set") -> Any:
    return prepare_dataset(spec, name, data / "prepared", 0, data / "downloads")


# --- schemes --------------------------------------------------------------------------------


@pytest.mark.parametrize("url,scheme", [
    ("file:///etc/passwd.tar.gz", "file"),
    ("data:application/x-tar;base64,AAAA", "data"),
    ("ftp://ftp.example.org/pub/data.tar.gz", "ftp"),
    ("/local/path/data.tar.gz", "missing"),
], ids=["file-url", "data-url", "ftp-url", "bare-path"])
def test_non_http_url_is_refused_before_any_work(tmp_path: Path, url: str, scheme: str) -> None:
    dest = tmp_path / "downloads"
    with pytest.raises(URLSchemeError) as info:
        fetch(url, dest, sha256="0" * 64, progress=False)
    message = str(info.value)
    assert repr(url) in message and repr(scheme) in message and "only http and https" in message
    assert isinstance(info.value, ValueError)
    assert not dest.exists()  # not even the download folder
    # the preset is refused when validated, naming the key and the value
    text = problems_of(url=url, sha256="0" * 64)
    assert f"url = {url!r}" in text and "only http and https" in text


@pytest.mark.parametrize("target", ["ftp://ftp.example.org/data.tar.gz", "file:///etc/passwd"],
                         ids=["redirect-to-ftp", "redirect-to-file"])
def test_redirect_to_another_scheme_is_refused(server: Server, tmp_path: Path, target: str) -> None:
    url = server.add("/data.tar.gz", redirect=target)
    dest = tmp_path / "downloads"
    with pytest.raises(URLSchemeError) as info:
        fetch(url, dest, sha256="0" * 64, progress=False)
    message = str(info.value)
    assert url in message and repr(target) in message and "only http and https" in message
    assert server.log == [("/data.tar.gz", None)]
    assert list(dest.iterdir()) == []


def test_redirect_to_http_is_followed(server: Server, tmp_path: Path) -> None:
    """The refusal above is about the scheme: an http redirect still works."""
    payload = tar_bytes({"pkg/a.txt": b"alpha\n"})
    server.add("/real.tar.gz", data=payload)
    url = server.add("/moved.tar.gz", redirect=server.base + "/real.tar.gz")
    out = fetch(url, tmp_path / "d", sha256=sha256(payload), progress=False)
    assert (out / "pkg" / "a.txt").read_bytes() == b"alpha\n"


# --- download size --------------------------------------------------------------------------


def test_content_length_over_the_limit_is_refused_before_reading(server: Server, data: Path) -> None:
    payload = tar_bytes({"CUB_200_2011/images.txt": os.urandom(200_000)}, mode="w")
    url = server.add("/CUB_200_2011.tar", data=payload)
    spec = preset(url=url, sha256=sha256(payload), max_download_bytes=50_000)
    with pytest.raises(LimitError) as info:
        prepare(spec, data)
    message = str(info.value)
    assert url in message and f"{len(payload):,} bytes (Content-Length)" in message
    assert "max_download_bytes = 50,000" in message and "raise `max_download_bytes`" in message
    assert_clean(data, allowed=("downloads",))
    assert list((data / "downloads").iterdir()) == []


def test_stream_over_the_limit_without_content_length_is_aborted(server: Server, data: Path) -> None:
    payload = os.urandom(300_000)
    url = server.add("/big.tar", data=payload, length=False)
    spec = preset(url=url, sha256=sha256(payload), max_download_bytes=100_000)
    with pytest.raises(LimitError) as info:
        prepare(spec, data)
    message = str(info.value)
    assert url in message and "no length was announced" in message and "max_download_bytes = 100,000" in message
    assert_clean(data, allowed=("downloads",))
    assert list((data / "downloads").iterdir()) == []


def test_without_content_length_within_the_limit_downloads(server: Server, tmp_path: Path) -> None:
    payload = tar_bytes({"pkg/a.txt": b"alpha\n"})
    url = server.add("/ok.tar.gz", data=payload, length=False)
    out = fetch(url, tmp_path / "d", sha256=sha256(payload), progress=False, limits=Limits(max_download_bytes=10**6))
    assert (out / "pkg" / "a.txt").read_bytes() == b"alpha\n"


# --- archive limits -------------------------------------------------------------------------


def test_tar_extracted_total_over_the_limit(server: Server, data: Path) -> None:
    payload = tar_bytes({"CUB_200_2011/images.txt": b"x" * 40_000, "CUB_200_2011/classes.txt": b"y" * 40_000})
    url = server.add("/CUB_200_2011.tgz", data=payload)
    spec = preset(url=url, sha256=sha256(payload), max_extracted_bytes=50_000)
    with pytest.raises(LimitError) as info:
        prepare(spec, data)
    message = str(info.value)
    archive = data / "downloads" / "CUB_200_2011.tgz"
    assert str(archive) in message and "80,000 bytes" in message
    assert "max_extracted_bytes = 50,000" in message and "raise `max_extracted_bytes`" in message
    assert_clean(data, allowed=("downloads",))
    assert [p.name for p in (data / "downloads").iterdir()] == ["CUB_200_2011.tgz"]  # verified; not extracted


def test_zip_member_count_over_the_limit(server: Server, data: Path) -> None:
    payload = zip_bytes({f"set/file_{i:03d}.txt": b"%d" % i for i in range(30)})
    url = server.add("/set.zip", data=payload)
    spec = preset(url=url, sha256=sha256(payload), max_archive_members=20)
    with pytest.raises(LimitError) as info:
        prepare(spec, data)
    message = str(info.value)
    assert str(data / "downloads" / "set.zip") in message and "(30 read so far)" in message
    assert "max_archive_members = 20" in message and "raise `max_archive_members`" in message
    assert_clean(data, allowed=("downloads",))
    assert [p.name for p in (data / "downloads").iterdir()] == ["set.zip"]


def test_tar_member_count_stops_at_the_limit(tmp_path: Path) -> None:
    archive = tmp_path / "many.tar"
    archive.write_bytes(tar_bytes({f"m/{i}": b"" for i in range(50)}, mode="w"))
    with pytest.raises(LimitError, match=r"more than max_archive_members = 10 members \(11 read so far\)"):
        extract_archive(archive, tmp_path / "out", Limits(max_archive_members=10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.tar"]


def test_zip_bomb_is_refused_by_its_compression_ratio(server: Server, data: Path) -> None:
    """80 MiB of zeros deflate to ~80 KB: within the default size limits, not within the ratio."""
    payload = zip_bytes({"bomb/zeros.bin": bytes(80 << 20)})
    assert len(payload) < 200_000
    url = server.add("/bomb.zip", data=payload)
    spec = preset(url=url, sha256=sha256(payload))
    with pytest.raises(LimitError) as info:
        prepare(spec, data)
    message = str(info.value)
    assert str(data / "downloads" / "bomb.zip") in message and f"{80 << 20:,} bytes" in message
    assert "max_compression_ratio = 100" in message and "decompression bomb" in message
    assert_clean(data, allowed=("downloads",))
    assert [p.name for p in (data / "downloads").iterdir()] == ["bomb.zip"]


# --- leftovers of killed runs and resuming --------------------------------------------------


def test_dead_partial_is_resumed_with_a_range_request(server: Server, tmp_path: Path) -> None:
    payload = tar_bytes({"pkg/big.bin": os.urandom(400_000)}, mode="w")
    url = server.add("/data.tar", data=payload, ranges=True)
    dest = tmp_path / "d"
    dest.mkdir()
    cut = 150_000
    (dest / f"data.tar.{dead_pid()}.partial").write_bytes(payload[:cut])  # a kill -9 mid-download
    out = fetch(url, dest, sha256=sha256(payload), progress=False)
    assert server.log == [("/data.tar", f"bytes={cut}-")]
    assert server.sent == len(payload) - cut  # only the rest travelled
    assert (dest / "data.tar").read_bytes() == payload and (out / "pkg" / "big.bin").is_file()
    assert_clean(dest, allowed=("data.tar", "data"))


def test_dead_partial_restarts_cleanly_when_the_server_ignores_range(server: Server, tmp_path: Path) -> None:
    payload = tar_bytes({"pkg/big.bin": os.urandom(200_000)}, mode="w")
    url = server.add("/data.tar", data=payload, ranges=False)  # answers 200 with the whole file
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / f"data.tar.{dead_pid()}.partial").write_bytes(b"garbage that must not be kept" * 100)
    (dest / f"data.tar.{dead_pid()}.partial").write_bytes(b"a second, smaller leftover")
    fetch(url, dest, sha256=sha256(payload), progress=False)
    assert server.log[0][1] is not None and server.sent == len(payload)
    assert (dest / "data.tar").read_bytes() == payload
    assert_clean(dest, allowed=("data.tar", "data"))


def test_corrupt_resumed_partial_is_downloaded_again(server: Server, tmp_path: Path) -> None:
    payload = tar_bytes({"pkg/big.bin": os.urandom(200_000)}, mode="w")
    url = server.add("/data.tar", data=payload, ranges=True)
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / f"data.tar.{dead_pid()}.partial").write_bytes(b"\0" * 50_000)  # right length, wrong bytes
    fetch(url, dest, sha256=sha256(payload), progress=False)
    assert [r for _, r in server.log] == ["bytes=50000-", None]  # resumed, mismatched, restarted whole
    assert (dest / "data.tar").read_bytes() == payload
    assert_clean(dest, allowed=("data.tar", "data"))


def test_partial_longer_than_the_file_gets_416_and_restarts(server: Server, tmp_path: Path) -> None:
    payload = tar_bytes({"pkg/a.txt": b"alpha\n"}, mode="w")
    url = server.add("/data.tar", data=payload, ranges=True)
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / f"data.tar.{dead_pid()}.partial").write_bytes(b"x" * (len(payload) + 10))
    fetch(url, dest, sha256=sha256(payload), progress=False)
    assert [r for _, r in server.log] == [f"bytes={len(payload) + 10}-", None]
    assert (dest / "data.tar").read_bytes() == payload
    assert_clean(dest, allowed=("data.tar", "data"))


def test_partial_of_a_live_process_is_left_alone(server: Server, tmp_path: Path) -> None:
    payload = tar_bytes({"pkg/a.txt": b"alpha\n"}, mode="w")
    url = server.add("/data.tar", data=payload, ranges=True)
    dest = tmp_path / "d"
    dest.mkdir()
    live = dest / f"data.tar.{os.getppid()}.partial"  # our parent runs: another download in progress
    live.write_bytes(b"in progress")
    fetch(url, dest, sha256=sha256(payload), progress=False)
    assert server.log == [("/data.tar", None)]
    assert live.read_bytes() == b"in progress"


def test_dead_partial_is_removed_when_nothing_needs_downloading(server: Server, tmp_path: Path) -> None:
    payload = tar_bytes({"pkg/a.txt": b"alpha\n"}, mode="w")
    url = server.add("/data.tar", data=payload, ranges=True)
    dest = tmp_path / "d"
    fetch(url, dest, sha256=sha256(payload), progress=False)
    stale = dest / f"data.tar.{dead_pid()}.partial"  # a killed re-download of the same file
    stale.write_bytes(payload[:10])
    fetch(url, dest, sha256=sha256(payload), progress=False)
    assert not stale.exists() and len(server.log) == 1
    assert_clean(dest, allowed=("data.tar", "data"))


def test_dead_extracting_and_old_folders_are_removed(tmp_path: Path) -> None:
    archive = tmp_path / "data.tar.gz"
    archive.write_bytes(tar_bytes({"pkg/a.txt": b"alpha\n"}))
    stale = [tmp_path / f".data.{dead_pid()}.extracting", tmp_path / f".data.{dead_pid()}.old"]
    live = tmp_path / f".data.{os.getppid()}.extracting"
    for folder in (*stale, live):
        (folder / "pkg").mkdir(parents=True)
        (folder / "pkg" / "half.txt").write_text("half")
    extract_archive(archive, tmp_path / "data")
    assert not any(p.exists() for p in stale)
    assert live.is_dir()  # a running extraction's folder is not ours to remove
    assert (tmp_path / "data" / "pkg" / "a.txt").read_bytes() == b"alpha\n"


def test_killed_prepare_staging_is_removed_by_the_next_prepare(tmp_path: Path, data: Path) -> None:
    build_dataset("cub200", tmp_path / "cub")
    data.mkdir()
    stale = data / f".prepared.{dead_pid()}.partial"
    (stale / "images").mkdir(parents=True)
    legacy = data / "prepared.partial"  # the staging name of older versions
    legacy.mkdir()
    prepare(preset(root=str(tmp_path / "cub")), data)
    assert not stale.exists() and not legacy.exists()
    assert sorted(p.name for p in data.iterdir()) == ["prepared"]
    prepare(preset(root=str(tmp_path / "cub")), data)  # replacing a prepared folder leaves no .old
    assert sorted(p.name for p in data.iterdir()) == ["prepared"]


# --- file modes -----------------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o027], ids=["umask-022", "umask-027"])
def umask(request: pytest.FixtureRequest):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_downloads_extractions_and_prepared_files_get_normal_modes(server: Server, tmp_path: Path,
                                                                   umask: int) -> None:
    src = tmp_path / "src"
    build_dataset("cub200", src / "CUB_200_2011")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        def odd_modes(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.mode = 0o700 if info.isdir() else 0o600  # as mkstemp/mkdtemp or a careless packer make them
            return info
        tar.add(src / "CUB_200_2011", arcname="CUB_200_2011", filter=odd_modes)
    payload = buffer.getvalue()
    url = server.add("/CUB_200_2011.tgz", data=payload)
    data = tmp_path / "data"
    prepare(preset(url=url, sha256=sha256(payload)), data)
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    checked = 0
    for path in [data / "downloads", *(data / "downloads").rglob("*"), data / "prepared",
                 *(data / "prepared").rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode == (dir_mode if path.is_dir() else file_mode), (path, oct(mode))
        checked += 1
    assert checked > 30


# --- symlinks in ImageFolder and Intel roots ------------------------------------------------


def build_outside(folder: Path) -> None:
    """An ImageFolder tree whose images differ from the fixture's (no md5 shared with it)."""
    rng = np.random.default_rng(99)
    for split, count in (("train", 6), ("test", 2)):
        for c, name in enumerate(IMAGEFOLDER_CLASSES):
            for k in range(count):
                save_image(folder / split / name / f"out_{k}.jpg", class_pixels(rng, c))


def imagefolder_with_link(tmp_path: Path, kind: str) -> tuple[Path, Path, Path]:
    """An imagefolder root plus one link of ``kind``; returns (root, link, its target)."""
    root = tmp_path / "root"
    build_dataset("imagefolder", root)
    outside = tmp_path / "outside"
    build_outside(outside)
    if kind == "file":
        target = next((outside / "train" / "apple").iterdir())
        link = root / "train" / "apple" / "elsewhere.jpg"
    elif kind == "class-folder":
        target = outside / "train" / "banana"
        link = root / "train" / "durian"
    elif kind == "sub-folder":
        target = outside / "train" / "cherry"
        link = root / "train" / "cherry" / "more"
    else:  # a link inside the root pointing at a link leaving it
        hop = root / ".hop"
        hop.symlink_to(outside / "test" / "apple")
        target = outside / "test" / "apple"
        link = root / "test" / "apple" / "via_hop"
        link.symlink_to(hop)
        return root, link, target
    link.symlink_to(target)
    return root, link, target


@pytest.mark.parametrize("kind", ["file", "class-folder", "sub-folder", "chain"])
def test_imagefolder_symlink_leaving_the_root_is_refused(tmp_path: Path, kind: str, data: Path) -> None:
    root, link, target = imagefolder_with_link(tmp_path, kind)
    with pytest.raises(ValueError) as info:
        prepare(preset("imagefolder", root=str(root)), data)
    message = str(info.value)
    assert str(link) in message and str(target.resolve()) in message and "follow_symlinks: true" in message
    assert_clean(data)


def test_imagefolder_symlinks_allowed_with_follow_symlinks(tmp_path: Path, data: Path) -> None:
    root, _, _ = imagefolder_with_link(tmp_path, "class-folder")
    (root / "train" / "apple" / "x.jpg").symlink_to(next((tmp_path / "outside" / "test" / "cherry").iterdir()))
    (root / "train" / "cherry" / "more").symlink_to(tmp_path / "outside" / "train" / "cherry")
    index = prepare(preset("imagefolder", root=str(root), options={"follow_symlinks": True}), data)
    paths = [r.path for r in index.records]
    assert "train/apple/x.jpg" in paths
    assert sum(p.startswith("train/durian/") for p in paths) == 6  # the linked class folder
    assert sum(p.startswith("train/cherry/more/") for p in paths) == 6  # the linked sub-folder
    assert "durian" in index.meta.classes


def test_imagefolder_symlinks_inside_the_root_are_read(tmp_path: Path, data: Path) -> None:
    root = tmp_path / "root"
    build_dataset("imagefolder", root)
    spare = root / ".spare"
    spare.mkdir()
    image = next((root / "test" / "banana").iterdir())
    (spare / "kept.jpg").write_bytes(image.read_bytes() + b"\0")  # distinct bytes, same decode
    (root / "test" / "banana" / "linked.jpg").symlink_to(spare / "kept.jpg")
    index = prepare(preset("imagefolder", root=str(root)), data)
    assert "test/banana/linked.jpg" in [r.path for r in index.records]


def test_follow_symlinks_must_be_a_bool() -> None:
    text = problems_of(layout="imagefolder", root="/x", options={"follow_symlinks": "yes"})
    assert "options.follow_symlinks = 'yes': expected true or false" in text


def test_intel_scenes_symlink_leaving_the_root_is_refused(tmp_path: Path, data: Path) -> None:
    root = tmp_path / "intel"
    build_dataset("intel_scenes", root)
    target = tmp_path / "photo.jpg"
    target.write_bytes(next((root / "seg_test" / "seg_test" / "sea").iterdir()).read_bytes() + b"\0")
    link = root / "seg_train" / "seg_train" / "sea" / "linked.jpg"
    link.symlink_to(target)
    with pytest.raises(ValueError) as info:
        prepare(preset("intel_scenes", root=str(root)), data)
    assert str(link) in str(info.value) and str(target) in str(info.value)
    assert_clean(data)
    index = prepare(preset("intel_scenes", root=str(root), options={"follow_symlinks": True}), data)
    assert "seg_train/seg_train/sea/linked.jpg" in [r.path for r in index.records]


# --- finding the root -----------------------------------------------------------------------


def test_archive_without_the_root_marker_lists_its_top_levels(server: Server, data: Path) -> None:
    payload = tar_bytes({"Birds/readme.txt": b"not CUB\n", "Birds/pictures/1.jpg": b"x", "notes.txt": b"n"})
    url = server.add("/birds.tgz", data=payload)
    with pytest.raises(FileNotFoundError) as info:
        prepare(preset(url=url, sha256=sha256(payload)), data)
    message = str(info.value)
    assert str(data / "downloads" / "birds") in message and "images.txt, images" in message
    assert "Birds/ (pictures/, readme.txt), notes.txt" in message and "archive_subdir" in message
    assert_clean(data, allowed=("downloads",))


def test_archive_subdir_naming_a_missing_folder(server: Server, data: Path) -> None:
    payload = tar_bytes({"CUB_200_2011/images.txt": b"1 a/b.jpg\n", "attributes.txt": b"1 x\n"})
    url = server.add("/CUB_200_2011.tgz", data=payload)
    with pytest.raises(FileNotFoundError) as info:
        prepare(preset(url=url, sha256=sha256(payload), archive_subdir="CUB-200-2011"), data)
    message = str(info.value)
    assert "archive_subdir = 'CUB-200-2011'" in message and "CUB_200_2011/ (images.txt), attributes.txt" in message
    assert_clean(data, allowed=("downloads",))


# --- downloads lists, validated before anything is fetched ---------------------------------


@pytest.mark.parametrize("entries,expected", [
    ([{"url": "http://h/images.tar"}], "downloads[0] = {'url': 'http://h/images.tar'}: http://h/images.tar: "
                                       "a download needs `sha256` or `md5`"),
    ([{"url": "ftp://h/a.tar", "md5": "0" * 32}], "downloads[0] = {'url': 'ftp://h/a.tar', 'md5': '" + "0" * 32
     + "'}: refusing to download 'ftp://h/a.tar': its scheme is 'ftp', and only http and https URLs are allowed"),
    ([{"url": "http://h/a.tar", "md5": "abc"}], "md5 checksum 'abc' is not 32 hex digits"),
    ([{"url": "http://h/a.tar", "md5": 123}], "md5 = 123: expected a quoted string of hex digits"),
    ([{"url": "http://h/a.tar", "md5": "0" * 32, "into": "../up"}], "into = '../up': expected a relative folder"),
    ([{"url": "http://h/a.bin", "md5": "0" * 32}], "'a.bin' is not a supported archive"),
    ([{"url": "http://h/a.tar", "md5": "0" * 32, "size": 3}], "unknown key 'size'; expected only url, sha256"),
    ([{"md5": "0" * 32}], "expected `url`, an http or https URL"),
    ([{"url": "http://h/x/a.tar", "md5": "0" * 32}, {"url": "http://h/y/a.tar", "md5": "1" * 32}],
     "file names ['a.tar', 'a.tar'] are not distinct"),
], ids=["no-checksum", "ftp-entry", "short-md5", "numeric-md5", "into-escapes", "not-an-archive", "unknown-key",
        "no-url", "same-file-name"])
def test_bad_downloads_entries_are_refused_by_validation(entries: list, expected: str) -> None:
    text = problems_of(downloads=entries)
    assert expected in text, text


def test_url_and_downloads_together_are_refused() -> None:
    text = problems_of(url="http://h/a.tar", md5="0" * 32, downloads=[{"url": "http://h/b.tar", "md5": "0" * 32}])
    assert "downloads" in text and "either `url` (one archive) or `downloads` (several), not both" in text


def test_archive_subdir_with_root_or_escaping_is_refused() -> None:
    assert "archive_subdir = 'x': only used with `url` or `downloads`" in problems_of(root="/d", archive_subdir="x")
    text = problems_of(url="http://h/a.tar", md5="0" * 32, archive_subdir="../x")
    assert "archive_subdir = '../x': expected a relative folder inside the extracted archive" in text


def test_fetch_all_checks_every_entry_before_downloading(server: Server, tmp_path: Path) -> None:
    good = tar_bytes({"Images/a.txt": b"a"})
    server.add("/images.tar", data=good)
    downloads = [Download(server.base + "/images.tar", sha256=sha256(good)),
                 Download("file:///etc/lists.tar", md5="0" * 32)]
    with pytest.raises(URLSchemeError, match=r"'file:///etc/lists.tar'"):
        fetch_all(downloads, tmp_path / "d", "dogs", progress=False)
    assert server.log == [] and not (tmp_path / "d").exists()


def test_one_bad_archive_of_several_extracts_nothing(server: Server, data: Path) -> None:
    images = tar_bytes({"Images/n1-a/1.jpg": b"x"}, mode="w")
    lists = tar_bytes({"train_list.mat": b"y" * 5000}, mode="w")
    downloads = [{"url": server.add("/images.tar", data=images), "sha256": sha256(images)},
                 {"url": server.add("/lists.tar", data=lists), "sha256": sha256(lists), "into": "splits"}]
    with pytest.raises(LimitError, match="lists.tar"):
        prepare(preset("stanford_dogs", downloads=downloads, max_extracted_bytes=4000), data, "dogs")
    assert_clean(data, allowed=("downloads",))
    assert sorted(p.name for p in (data / "downloads").iterdir()) == ["images.tar", "lists.tar"]
    assert not (data / "downloads" / "dogs").exists()


def test_wrong_checksum_in_downloads_names_the_entry_file(server: Server, data: Path) -> None:
    images = tar_bytes({"Images/n1-a/1.jpg": b"x"}, mode="w")
    url = server.add("/images.tar", data=images)
    with pytest.raises(FetchError) as info:
        prepare(preset("stanford_dogs", downloads=[{"url": url, "md5": "0" * 32}]), data, "dogs")
    message = str(info.value)
    assert str(data / "downloads" / "images.tar") in message and "0" * 32 in message and url in message
    assert_clean(data, allowed=("downloads",))
    assert list((data / "downloads").iterdir()) == []
