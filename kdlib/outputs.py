"""Outputs that appear complete or not at all: built in a staging folder, moved into place together.

A job declares the files and folders it produces. :class:`StagedOutputs` gives it a private
staging path for each (``staged(final)``); nothing is written at a final path until
:meth:`StagedOutputs.commit`, which checks that every declared output was produced, writes a
``manifest.json`` into the output folders named in ``manifests`` (each file's size and sha256, so
a reader can tell a folder whose files were written together, e.g. the best and last checkpoint of
one run, from one assembled from two runs), and then moves the outputs into place. On an exception (a crash, :class:`kdlib.process.Terminated` from a cancel) the
staging folder is deleted and the final paths are left as they were, so a cache that hashes the
final paths (DVC's) never sees half an output.

Staging folders live in ``<root>/.kdlib-staging/<tag>.<pid>.<start time>``; one left behind by a
process that was killed outright (SIGKILL, power loss) is removed by the next
:class:`StagedOutputs` under the same root, once that process is gone.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable

from kdlib.process import process_alive, process_start_time

STAGING_DIR = ".kdlib-staging"
MANIFEST_NAME = "manifest.json"


class OutputError(RuntimeError):
    """A declared output is missing, or an output folder disagrees with its manifest."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def folder_manifest(folder: Path) -> dict[str, Any]:
    """``{"files": {relative path: {"bytes", "sha256"}}}`` for every file under ``folder``, sorted
    (deterministic: the same files give the same manifest, byte for byte)."""
    files = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return {"files": files}


def check_manifest(folder: Path, names: Iterable[str] | None = None, hashes: bool = True) -> None:
    """Raise :class:`OutputError` if ``folder``'s files (or just ``names``) differ from its manifest.

    A folder without a manifest passes (it was not written by :class:`StagedOutputs`)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return
    try:
        listed = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise OutputError(f"{manifest_path}: not a readable manifest ({err})") from None
    for name in (listed if names is None else names):
        path = folder / name
        entry = listed.get(name)
        if entry is None:
            raise OutputError(f"{path} is not listed in {manifest_path}: it was not written with the other files "
                              "of that folder")
        if not path.is_file():
            raise OutputError(f"{path} is listed in {manifest_path} but missing")
        if path.stat().st_size != entry["bytes"] or (hashes and file_sha256(path) != entry["sha256"]):
            raise OutputError(f"{path} differs from what {manifest_path} recorded (size or sha256): the folder "
                              "mixes files of different runs or was edited")


def remove_path(path: Path) -> None:
    """Delete a file, a folder or a symlink (never what a symlink points to)."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def swap_into_place(source: Path, final: Path) -> None:
    """Rename ``source`` to ``final`` (same file system); an existing ``final`` (file, folder or
    symlink) is first renamed aside as ``.<name>.<pid>.old`` and deleted after, so ``final`` is
    always either the old one or the new one, never a mix."""
    source, final = Path(source), Path(final)
    if not (final.exists() or final.is_symlink()):
        os.replace(source, final)
        return
    old = final.with_name(f".{final.name}.{os.getpid()}.old")
    remove_path(old)
    os.replace(final, old)
    os.replace(source, final)
    remove_path(old)


def _move(source: Path, final: Path) -> None:
    """:func:`swap_into_place` when on one file system; otherwise copy beside ``final`` and rename there."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        swap_into_place(source, final)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        incoming = final.with_name(f".{final.name}.{os.getpid()}.incoming")
        remove_path(incoming)
        if source.is_dir():
            shutil.copytree(source, incoming, symlinks=True)
        else:
            shutil.copy2(source, incoming)
        swap_into_place(incoming, final)
        remove_path(source)


def remove_stale_staging(root: Path) -> list[Path]:
    """Delete the staging folders under ``root`` whose process is gone; returns what was removed."""
    base = Path(root) / STAGING_DIR
    removed = []
    if not base.is_dir():
        return removed
    for entry in base.iterdir():
        parts = entry.name.rsplit(".", 2)
        if len(parts) != 3 or not (parts[1].isdigit() and parts[2].isdigit()):
            continue
        if not process_alive(int(parts[1]), int(parts[2])):
            remove_path(entry)
            removed.append(entry)
    return removed


class StagedOutputs:
    """Build ``outputs`` (final paths, files or folders, under ``root``) in a staging folder.

    Use as a context manager; ``staged(path)`` maps any path under ``root`` to its staging twin
    (a declared output, or a folder above some, e.g. DVCLive's directory). Leaving the block
    without an exception commits; with one, discards. ``commit`` may be called earlier, with
    ``before_move`` (e.g. a check that the job's inputs did not change while it ran)."""

    def __init__(self, outputs: Iterable[Path], tag: str, root: Path = Path("."),
                 manifests: Iterable[Path] = ()) -> None:
        self.root = Path(root)
        self.outputs = [Path(p) for p in outputs]
        self.manifests = [Path(p) for p in manifests]
        for path in self.outputs:
            self._relative(path)  # fail now for a path outside root
        if not set(self.manifests) <= set(self.outputs):
            raise ValueError(f"manifests {[str(p) for p in self.manifests]} must be among the outputs")
        pid = os.getpid()
        self.staging = self.root / STAGING_DIR / f"{tag}.{pid}.{process_start_time(pid) or 0}"
        self.committed = False

    def _relative(self, path: Path) -> Path:
        relative = Path(os.path.relpath(Path(path).absolute(), self.root.absolute()))
        if relative.parts[:1] == ("..",) or relative == Path("."):
            raise ValueError(f"output {path} is not inside {self.root.absolute()}")
        return relative

    def staged(self, path: Path) -> Path:
        """Where to write ``path`` until commit (its parent folders exist)."""
        twin = self.staging / self._relative(path)
        twin.parent.mkdir(parents=True, exist_ok=True)
        return twin

    __call__ = staged

    def __enter__(self) -> "StagedOutputs":
        remove_stale_staging(self.root)
        remove_path(self.staging)
        self.staging.mkdir(parents=True)
        return self

    def commit(self, before_move: Any = None) -> None:
        """Check every output was produced, write the folder manifests, run ``before_move()``,
        then move every output into place (each move is a rename: an output is whole or absent)."""
        if self.committed:
            return
        missing = [str(p) for p in self.outputs if not (self.staging / self._relative(p)).exists()]
        if missing:
            raise OutputError(f"the job did not produce {', '.join(missing)}; nothing was moved into place")
        for path in self.manifests:
            twin = self.staging / self._relative(path)
            if twin.is_dir():
                (twin / MANIFEST_NAME).write_text(json.dumps(folder_manifest(twin), indent=1) + "\n")
        if before_move is not None:
            before_move()
        for path in self.outputs:
            _move(self.staging / self._relative(path), path)
        self.committed = True
        remove_path(self.staging)

    def discard(self) -> None:
        remove_path(self.staging)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if kind is None:
            try:
                self.commit()
            except BaseException:
                self.discard()
                raise
        else:
            self.discard()
