"""Hostile or broken resume stores, and writes that cannot complete (issue 27).

A resume store may live in a shared folder (``$KDLIB_RESUME_DIR``), so its ``COMPLETE`` marker
and its files are input: a marker naming ``../../README.md`` once had the next run copy a file
over the repository's README. A ``.kdlib-resume`` that is a link to nothing, a full disk and a
NaN in a result each end in an error that names the path and what to do, with nothing written.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import kdlib.checkpoint
import kdlib.io
from kdlib.checkpoint import ModelRecord, save_checkpoint
from kdlib.io import write_json, write_text
from kdlib.resume import ResumeError, ResumeStore, ResumeWarning, restore_file
from kdlib.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]


def _no_temporaries(folder: Path) -> list[str]:
    """What under ``folder`` looks like a temporary file (``*.tmp``): nothing, after any write."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp"))


def _saved(store_dir: Path, epochs: tuple[int, ...] = (1, 2)) -> ResumeStore:
    """A store with ``epochs`` saved, each keeping a ``best.pt`` whose bytes say its epoch."""
    store = ResumeStore(store_dir, "key")
    for epoch in epochs:
        best = store_dir.parent / f"best-{epoch}.pt"
        best.write_bytes(f"best of epoch {epoch}".encode())
        store.save(epoch, {"marker": epoch}, {"best.pt": best})
    return store


def _set_marker_files(folder: Path, names: object) -> None:
    marker = json.loads((folder / "COMPLETE").read_text())
    marker["files"] = names
    (folder / "COMPLETE").write_text(json.dumps(marker))


# ------------------------------------------------------------------------------ COMPLETE names paths

@pytest.mark.parametrize("name, reason", [
    ("../../README.md", "not a bare file name"),
    ("../../../../stages/injected.py", "not a bare file name"),
    ("/etc/passwd", "not a bare file name"),
    ("files/best.pt", "not a bare file name"),
    ("..\\..\\README.md", "not a bare file name"),
    ("best.pt\x00", "not a bare file name"),
    (".", "not a bare file name"),
    ("..", "not a bare file name"),
    ("", "not a bare file name"),
    (".best.pt.123.tmp", "not a bare file name"),  # the store's own temporary: hidden names are refused
    (7, "not a bare file name"),
    ("last.pt", "not one of the files a resume state keeps"),
])
def test_a_marker_naming_anything_but_a_kept_file_skips_its_epoch(tmp_path: Path, name: object, reason: str) -> None:
    store = _saved(tmp_path / "store")
    newest = tmp_path / "store" / "epoch-0002"
    _set_marker_files(newest, ["best.pt", name])
    with pytest.warns(ResumeWarning) as caught:
        state, _, files = store.load()
    message = str(caught[0].message)
    assert str(newest) in message and repr(name) in message and reason in message, message
    assert state["epoch"] == 1 and set(files) == {"best.pt"}  # the previous epoch, as for an unreadable state
    assert files["best.pt"].read_bytes() == b"best of epoch 1"


def test_a_marker_that_is_not_a_list_of_names_skips_its_epoch(tmp_path: Path) -> None:
    store = _saved(tmp_path / "store", (1,))
    _set_marker_files(tmp_path / "store" / "epoch-0001", "../../README.md")
    with pytest.warns(ResumeWarning, match="epoch-0001: its COMPLETE marker is not a store's marker"):
        assert store.load() is None  # nothing before it: a fresh start


def test_the_store_refuses_to_keep_a_file_under_a_path_name(tmp_path: Path) -> None:
    (tmp_path / "x.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"file name '\.\./x\.pt' is not a bare file name"):
        ResumeStore(tmp_path / "store", "key").save(1, {}, {"../x.pt": tmp_path / "x.pt"})
    assert not (tmp_path / "store" / "epoch-0001").exists()


def test_restore_file_writes_only_a_bare_name_inside_the_output_folder(tmp_path: Path) -> None:
    source = tmp_path / "kept.pt"
    source.write_bytes(b"kept")
    out = tmp_path / "repo" / "models" / "teacher"
    readme = tmp_path / "repo" / "README.md"
    out.mkdir(parents=True)
    readme.write_text("readme\n")
    for name in ("../../README.md", str(readme), "sub/best.pt", ".."):
        with pytest.raises(ResumeError, match=re.escape(f"resume file name {name!r} for {out} is not a bare file name")):
            restore_file(source, out, name)
    assert readme.read_text() == "readme\n" and sorted(os.listdir(out)) == []
    assert restore_file(source, out, "best.pt").read_bytes() == b"kept"


def test_restore_file_replaces_a_link_at_the_target_instead_of_writing_through_it(tmp_path: Path) -> None:
    source, outside, out = tmp_path / "kept.pt", tmp_path / "outside.txt", tmp_path / "out"
    source.write_bytes(b"kept")
    outside.write_text("outside\n")
    out.mkdir()
    (out / "best.pt").symlink_to(outside)
    restore_file(source, out, "best.pt")
    assert outside.read_text() == "outside\n"
    assert not (out / "best.pt").is_symlink() and (out / "best.pt").read_bytes() == b"kept"


# the smallest training fit resumes: 12 images of 16x16, one class per brightness
RECORD = ModelRecord(arch="cnn_small", num_classes=3, in_chans=1, model_kwargs={}, input_size=16, mean=[0.5],
                     std=[0.25], classes=["a", "b", "c"])


def _fit(images: Path, out: Path, epochs: int, resume: ResumeStore) -> int:
    """Train a tiny model for ``epochs`` into ``out``; the epoch it resumed after."""
    from kdlib.data import BatchNormalizer, IndexedImageDataset, Record, build_transforms
    from kdlib.losses import build_objective
    from kdlib.models import build_model
    from kdlib.runtime import seed_everything
    from kdlib.train import Recipe, TrainData, fit

    records = [Record(f"{i}.png", i % 3, "train" if i < 9 else "val") for i in range(12)]
    augment = build_transforms("shift", 16, 16, True, {"shift_px": 2})
    train = IndexedImageDataset(images, records[:9], 1, augment.sample, preload=True, batch_transform=augment.batch)
    val = IndexedImageDataset(images, records[9:], 1, None, preload=True)
    seed_everything(0)
    result = fit(build_model("cnn_small", 3, 1), build_objective("ce"),
                 Recipe(epochs=epochs, batch_size=4, lr=0.05, warmup_epochs=0),
                 TrainData(train, val, BatchNormalizer([0.5], [0.25])), out, RECORD, seed=0, progress=False,
                 resume=resume)
    return result.resumed_from_epoch


def test_a_crafted_marker_neither_overwrites_nor_creates_files_outside_the_run(tmp_path: Path) -> None:
    """The issue's attack, end to end through ``fit``: before the fix, README.md held the planted
    text and stages/injected.py existed after the second run."""
    images = tmp_path / "images"
    images.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(12):
        pixels = (torch.rand(16, 16, generator=gen) * 80 + 80 * (i % 3)).to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(images / f"{i}.png")
    repo, shared = tmp_path / "repo", tmp_path / "shared" / "teacher" / "abcd"
    (repo / "stages").mkdir(parents=True)
    (repo / "README.md").write_text("the real README\n")
    out = repo / "models" / "teacher"
    assert _fit(images, out, 1, ResumeStore(shared, "key")) == 0  # leaves the state of epoch 1
    # the attacker writes beside the store and lists those files, relative to files/ and to out
    (shared / "README.md").write_text("planted\n")
    (shared / "stages").mkdir()
    (shared / "stages" / "injected.py").write_text("print('planted code')\n")
    _set_marker_files(shared / "epoch-0001", ["best.pt", "../../README.md", "../../stages/injected.py"])
    before = sorted(p.relative_to(repo) for p in repo.rglob("*") if "models" not in p.parts)
    with pytest.warns(ResumeWarning, match=r"epoch-0001: its COMPLETE marker names the file '\.\./\.\./README\.md', "
                                           "which is not a bare file name"):
        resumed_after = _fit(images, out, 2, ResumeStore(shared, "key"))
    assert resumed_after == 0  # the epoch was skipped: trained from the start
    assert (repo / "README.md").read_text() == "the real README\n"
    assert not (repo / "stages" / "injected.py").exists()
    assert sorted(p.relative_to(repo) for p in repo.rglob("*") if "models" not in p.parts) == before
    assert sorted(os.listdir(out)) == ["best.pt", "last.pt"]


# ------------------------------------------------------------------------------ symbolic links in the store

def test_a_kept_file_that_is_a_link_is_never_followed(tmp_path: Path) -> None:
    store = _saved(tmp_path / "store")
    secret = tmp_path / "secret.txt"
    secret.write_text("not the run's\n")
    kept = tmp_path / "store" / "epoch-0002" / "files" / "best.pt"
    kept.unlink()
    kept.symlink_to(secret)
    with pytest.warns(ResumeWarning, match=re.escape(f"{kept} is a symbolic link; resume files are never read through "
                                                     "a link")):
        state, _, files = store.load()
    assert state["epoch"] == 1 and files["best.pt"].read_bytes() == b"best of epoch 1"


@pytest.mark.parametrize("name", ["state.pt", "rng-0.pt", "COMPLETE"])
def test_a_state_file_that_is_a_link_skips_its_epoch_even_when_its_target_is_valid(tmp_path: Path,
                                                                                     name: str) -> None:
    store = _saved(tmp_path / "store")
    newest = tmp_path / "store" / "epoch-0002"
    valid = tmp_path / f"valid-{name}"
    shutil.move(newest / name, valid)  # the file itself, readable: only the link is wrong
    (newest / name).symlink_to(valid)
    with pytest.warns(ResumeWarning, match=f"{re.escape(str(newest))}.*{re.escape(str(newest / name))} is a symbolic link"):
        state, _, _ = store.load()
    assert state["epoch"] == 1


def test_a_files_folder_or_epoch_folder_that_is_a_link_is_never_followed(tmp_path: Path) -> None:
    store = _saved(tmp_path / "store", (1, 2, 3))  # keeps epochs 2 and 3
    elsewhere = tmp_path / "elsewhere"
    shutil.move(tmp_path / "store" / "epoch-0003" / "files", elsewhere)
    (tmp_path / "store" / "epoch-0003" / "files").symlink_to(elsewhere)
    shutil.move(tmp_path / "store" / "epoch-0002", tmp_path / "epoch-2-elsewhere")
    (tmp_path / "store" / "epoch-0002").symlink_to(tmp_path / "epoch-2-elsewhere")
    with pytest.warns(ResumeWarning) as caught:
        assert store.load() is None
    messages = [str(w.message) for w in caught]
    assert "files is a symbolic link or not a folder" in messages[0] and "epoch-0003" in messages[0], messages
    assert "epoch-0002 is a symbolic link" in messages[1], messages


def test_restore_file_refuses_a_source_that_became_a_link(tmp_path: Path) -> None:
    """A link swapped in between ``load`` and the copy is refused too (``O_NOFOLLOW``)."""
    secret, source, out = tmp_path / "secret.txt", tmp_path / "best.pt", tmp_path / "out"
    secret.write_text("secret\n")
    source.symlink_to(secret)
    out.mkdir()
    with pytest.raises(ResumeError, match=f"resume file {re.escape(str(source))} cannot be copied.*is a symbolic link"):
        restore_file(source, out, "best.pt")
    assert os.listdir(out) == []


def test_links_planted_where_the_store_writes_are_replaced_never_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "state.pt").write_text("the victim's\n")
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    (store_dir / "epoch-0001").symlink_to(victim)  # an epoch folder
    (store_dir / "epoch-0002").mkdir()
    (store_dir / "epoch-0002" / f".state.pt.{os.getpid()}.tmp").symlink_to(victim / "state.pt")  # a temporary
    (store_dir / "epoch-0002" / "files").symlink_to(victim)  # the kept files' folder
    store = _saved(store_dir)
    assert sorted(os.listdir(victim)) == ["state.pt"] and (victim / "state.pt").read_text() == "the victim's\n"
    assert not any(p.is_symlink() for p in store_dir.rglob("*")) and _no_temporaries(store_dir) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state, _, files = store.load()
    assert state["epoch"] == 2 and files["best.pt"].read_bytes() == b"best of epoch 2"


# ------------------------------------------------------------------------------ a dangling .kdlib-resume

def test_a_dangling_resume_link_in_the_repository_is_a_clear_error(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.resume import claim, resume_store

    monkeypatch.delenv("KDLIB_RESUME_DIR", raising=False)
    monkeypatch.delenv("KDLIB_RESUME_OFF", raising=False)
    gone = tmp_path / "scratch" / "gone"
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / ".kdlib-resume").symlink_to(gone)
    link = (tmp_path / "repo").resolve() / ".kdlib-resume"
    expected = (re.escape(f"{link} is a dangling symbolic link (it points to {gone}, which does not exist)") +
                ".*create the folder it points to, or remove the link.*set KDLIB_RESUME_DIR")
    with pytest.raises(ResumeError, match=expected):
        claim(tmp_path / "repo", "teacher", {"seed": 0})
    with pytest.raises(ResumeError, match=expected):
        resume_store(tmp_path / "repo", "teacher", {"seed": 0}, Runtime(), enabled=True)
    assert not gone.exists() and not (tmp_path / "scratch").exists()


def test_a_resume_dir_variable_naming_a_dangling_link_is_a_clear_error(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.resume import claim

    (tmp_path / "states").symlink_to(tmp_path / "unmounted")
    monkeypatch.setenv("KDLIB_RESUME_DIR", str(tmp_path / "states"))
    states = tmp_path / "states"
    with pytest.raises(ResumeError, match=re.escape(f"{states} is a dangling symbolic link") + ".*" +
                       re.escape(f"point KDLIB_RESUME_DIR (now {states}) at an existing folder")):
        claim(tmp_path, "teacher", {"seed": 0})
    assert not (tmp_path / "unmounted").exists()


def test_a_resume_dir_that_is_a_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.resume import claim

    (tmp_path / "states").write_text("not a folder")
    monkeypatch.setenv("KDLIB_RESUME_DIR", str(tmp_path / "states"))
    with pytest.raises(ResumeError, match=re.escape(f"{tmp_path / 'states'} is a file, not a folder")):
        claim(tmp_path, "teacher", {"seed": 0})
    assert (tmp_path / "states").read_text() == "not a folder"


# ------------------------------------------------------------------------------ a full disk

FULL_DISK_SCRIPT = r"""
import json, os, sys
from pathlib import Path
import torch
from torch import nn
from kdlib.checkpoint import save_checkpoint
from kdlib.io import write_json, write_text
from kdlib.resume import ResumeStore

disk = Path(sys.argv[1])
def free():
    stats = os.statvfs(disk)
    return stats.f_bfree * stats.f_frsize
(disk / "models").mkdir()
(disk / "models" / "best.pt").write_bytes(b"the previous best")
report = {}
writes = {
    "checkpoint": lambda: save_checkpoint(disk / "models" / "best.pt", nn.Linear(512, 512), {"epoch": 1}),
    "resume state": lambda: ResumeStore(disk / "store", "key").save(1, {"w": torch.zeros(300_000)}),
    "text": lambda: write_text(disk / "reports" / "big.md", "x" * 600_000),
    "json": lambda: write_json(disk / "reports" / "big.json", {"rows": list(range(100_000))}),
}
def files():
    return {p: p.stat().st_blocks * 512 for p in disk.rglob("*") if p.is_file()}
for what, write in writes.items():
    before, had = free(), files()
    try:
        write()
        report[what] = {"error": None}
    except Exception as err:
        report[what] = {"error": type(err).__name__, "errno": getattr(err, "errno", None), "message": str(err)}
    # the failed write's file was closed and removed: only the files it left (an epoch's rng state) hold space
    kept = sum(size for p, size in files().items() if p not in had)
    report[what]["freed"] = free() + kept == before
report["files"] = sorted(str(p.relative_to(disk)) for p in disk.rglob("*"))
report["best"] = (disk / "models" / "best.pt").read_text()
print(json.dumps(report))
"""


def _mount_tiny_tmpfs_and_run(tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    """``script`` run with a 256 KiB tmpfs mounted on its first argument, in a mount namespace of
    its own (``unshare -rm``: nothing is mounted for other processes, and it goes when they end)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    (tmp_path / "script.py").write_text(script)
    command = f'mount -t tmpfs -o size=256k kdlib-test "{disk}" && exec "{sys.executable}" "{tmp_path / "script.py"}" "{disk}"'
    return subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)


def test_a_full_file_system_is_enospc_naming_the_file_with_nothing_left_behind(tmp_path: Path) -> None:
    """On a real, tiny file system: torch.save's own error there is "enforce fail at
    inline_container.cc ... unexpected pos" with no errno."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) here to mount a tiny tmpfs in a namespace of the test's own")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k probe '{tmp_path}'"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"this machine does not let the test mount a tmpfs in a user+mount namespace "
                    f"(unshare -rm; mount -t tmpfs): {probe.stderr.strip()}")
    done = _mount_tiny_tmpfs_and_run(tmp_path, FULL_DISK_SCRIPT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    disk = tmp_path / "disk"
    for what, file in (("checkpoint", "models/best.pt"), ("resume state", "store/epoch-0001/state.pt"),
                       ("text", "reports/big.md"), ("json", "reports/big.json")):
        got = report[what]
        assert got["error"] == "OSError" and got["errno"] == errno.ENOSPC, (what, got)
        assert got["message"].startswith(f"[Errno 28] {disk / file}: no space left on device (it needs about "), got
        assert "bytes are free there" in got["message"] and got["freed"], (what, got)
    assert "training then continues from its last saved epoch" in report["resume state"]["message"]
    assert report["best"] == "the previous best"  # the old checkpoint is untouched
    # no temporary, no half-written file; the rng state and folders of epoch 1 (without COMPLETE) stay
    assert report["files"] == ["models", "models/best.pt", "reports", "store", "store/epoch-0001",
                               "store/epoch-0001/rng-0.pt"]


def test_a_python_write_refused_with_enospc_names_the_file(tmp_path: Path) -> None:
    """``/dev/full`` refuses every write with ENOSPC, as a full disk does: the temporary file
    :func:`write_text` writes through is made a link to it."""
    target = tmp_path / "reports" / "summary.md"
    target.parent.mkdir()
    target.write_text("previous\n")
    (target.parent / f".summary.md.{os.getpid()}.tmp").symlink_to("/dev/full")
    with pytest.raises(OSError, match=re.escape(f"{target}: no space left on device (it needs about 7 bytes, ")) as caught:
        write_text(target, "summary")
    assert caught.value.errno == errno.ENOSPC
    assert target.read_text() == "previous\n" and sorted(os.listdir(target.parent)) == ["summary.md"]


def test_torch_save_failing_with_no_space_free_is_enospc_and_otherwise_its_own_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save's error carries no errno; the free space decides. With room left, the
    original error comes through unchanged (not every failure is a full disk)."""

    def failing_save(value: object, path: object) -> None:
        Path(str(path)).write_bytes(b"partial")  # what the C++ writer left before failing
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(kdlib.checkpoint, "torch_saved_size", lambda value: 1_000_000)
    target = tmp_path / "best.pt"
    monkeypatch.setattr(kdlib.io, "_free_bytes", lambda directory: (0, 4096))
    with pytest.raises(OSError, match=re.escape(f"{target}: no space left on device (it needs about 1000000 bytes, ") +
                       r"\d+ bytes are free there\); the file was not written") as caught:
        save_checkpoint(target, nn.Linear(2, 2), {"epoch": 1})
    assert caught.value.errno == errno.ENOSPC and os.listdir(tmp_path) == []
    monkeypatch.setattr(kdlib.io, "_free_bytes", lambda directory: (10_000_000, 4096))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save_checkpoint(target, nn.Linear(2, 2), {"epoch": 1})
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------ NaN in a result

@pytest.mark.parametrize("data, where, shown", [
    ({"best": {"test": {"loss": math.nan, "top1": 50.0}}}, "best.test.loss", "nan"),
    ({"history": [{"loss": 1.0}, {"loss": math.inf}]}, "history[1].loss", "inf"),
    ({"rows": [[1.0, -math.inf]]}, "rows[0][1]", "-inf"),
    ({"score": np.float64("nan")}, "score", "nan"),
    (math.nan, "(the whole value)", "nan"),
])
def test_write_json_refuses_a_non_finite_number_and_writes_nothing(tmp_path: Path, data: object, where: str,
                                                                   shown: str) -> None:
    path = tmp_path / "reports" / "evaluate" / "distill.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"previous": true}\n')
    with pytest.raises(ValueError) as caught:
        write_json(path, data)
    assert str(caught.value).startswith(f"{path}: {where} = {shown}: a non-finite number; nothing was written")
    assert path.read_text() == '{"previous": true}\n' and sorted(os.listdir(path.parent)) == ["distill.json"]


def test_write_json_writes_an_undefined_value_as_null(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"best": {"test": {"loss": None, "top1": 50.0}}})
    assert json.loads((tmp_path / "a.json").read_text()) == {"best": {"test": {"loss": None, "top1": 50.0}}}
