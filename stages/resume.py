"""Where a training stage keeps its resume state, and the key that says which run it belongs to.

The state must outlive a killed stage, so it cannot be a DVC output (DVC deletes a stage's
outputs before running it; a ``persist`` output turns the run cache off). It lives in
``.kdlib-resume/<stage>/<key>/`` of the repository — ignored by git and never declared to DVC
— or under ``$KDLIB_RESUME_DIR``. ``dvc exp run --queue`` runs each experiment in a fresh copy
under ``.dvc/tmp/exps/``; the repository that copy came from holds the states, so a rerun of the
same queued experiment finds its own. The key is a hash of the stage's command, of the values of
the parameters it declares in ``dvc.yaml`` and of the contents of its dependencies: only the
same run on the same inputs can pick a state up.

A ``.kdlib-resume`` (or ``$KDLIB_RESUME_DIR``) that is a symbolic link to nothing is an error
that names the link and what to do (:func:`kdlib.resume.make_dirs`), raised before training starts.

Two processes can run the same stage on the same key at once (two queued experiments that both need a
teacher DVC has not cached yet). Only one may own the state: the other's writes and its clean-up would
pull the files from under the first ("No such file or directory: .../epoch-0009/files/.best.pt.*.tmp").
The stage process that takes the state's lock (:func:`claim`, ``flock`` on ``<key>.lock`` beside it)
owns it; another one trains without resume (``KDLIB_RESUME_OFF``, inherited by its torchrun workers)
and leaves the state alone.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdlib import yamlfile
from kdlib.outputs import file_sha256

if TYPE_CHECKING:
    from kdlib.resume import ResumeStore
    from kdlib.runtime import Runtime

RESUME_DIR = ".kdlib-resume"
RESUME_ENV = "KDLIB_RESUME_DIR"
RESUME_OFF_ENV = "KDLIB_RESUME_OFF"  # set by a stage process that could not claim its state
_claimed: dict[Path, int] = {}  # lock file → descriptor, held until this process exits
_SKIP = ("__pycache__", ".pyc", ".egg-info")  # what .dvcignore leaves out of folder hashes


def resume_root(root: Path) -> Path:
    if os.environ.get(RESUME_ENV):
        return Path(os.environ[RESUME_ENV])
    resolved = Path(root).resolve()
    parts = resolved.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):  # a queued / temporary experiment's copy
            return Path(*parts[:i]) / RESUME_DIR
    return resolved / RESUME_DIR


def _lookup(values: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        values = values.get(key) if isinstance(values, dict) else None
    return values


def _resolve(text: str, values: dict[str, Any]) -> str:
    """``models.${student}`` with ``${student}`` replaced by its value (DVC's templating)."""
    return re.sub(r"\$\{([^}]+)\}", lambda m: str(_lookup(values, m.group(1).strip())), text)


def _dep_digest(path: Path) -> str:
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s in str(p) for s in _SKIP))
        listing = {p.relative_to(path).as_posix(): file_sha256(p) for p in files}
        return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
    return "missing"


def stage_key(root: Path, stage: str, params: dict[str, Any], item: str | None = None) -> str:
    """The hash of stage ``stage``'s command, declared parameter values and dependency contents
    (``item``: the ``foreach`` item of a templated stage); without a ``dvc.yaml`` at ``root``, of
    the stage's name and every parameter."""
    dvc_yaml = Path(root) / "dvc.yaml"
    if not dvc_yaml.is_file():  # stage scripts run outside a DVC project: every parameter counts
        blob = json.dumps({"stage": stage, "item": item, "params": params}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()
    body = yamlfile.load(dvc_yaml)["stages"][stage]
    fill = params
    if "foreach" in body and item is not None:  # a list gives ${item}; a mapping ${key} and ${item.<field>}
        each = body["foreach"]
        fill = {**params, "key": item, "item": each[item]} if isinstance(each, dict) else {**params, "item": item}
    body = body["do"] if "foreach" in body else body
    declared: dict[str, Any] = {}
    for entry in body.get("params", []):
        for name in ([entry] if isinstance(entry, str) else list(entry)):
            name = _resolve(name, fill)
            declared[name] = _lookup(params, name)
    deps = {_resolve(d, fill): _dep_digest(Path(root) / _resolve(d, fill)) for d in body.get("deps", [])}
    blob = json.dumps({"cmd": _resolve(body["cmd"], fill), "params": declared, "deps": deps}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def resume_dir(root: Path, stage: str, key: str) -> Path:
    return resume_root(root) / stage / key[:16]


def _other_place() -> str:
    """What else a user can do about an unusable resume folder (the end of an error message)."""
    if os.environ.get(RESUME_ENV):
        where = (f"; or point {RESUME_ENV} (now {os.environ[RESUME_ENV]}) at an existing folder, or unset it "
                 f"to keep the states in the repository's {RESUME_DIR}")
    else:
        where = f"; or set {RESUME_ENV} to a folder to keep the states elsewhere"
    return where + "; or turn resume off (runtime.resume: false)"


def _prepare(directory: Path) -> None:
    """Make ``directory`` (a run's state folder), or say clearly why it cannot be made: a
    ``.kdlib-resume`` or ``$KDLIB_RESUME_DIR`` that is a symbolic link to nothing made
    ``mkdir`` fail with a bare ``FileExistsError``."""
    from kdlib.resume import make_dirs

    make_dirs(directory, _other_place())


def claim(root: Path, stage: str, params: dict[str, Any]) -> bool:
    """Take the lock of this run's resume state for this process (held until it exits). False when
    another live process holds it: that one is running the same stage on the same inputs."""
    directory = resume_dir(root, stage, stage_key(root, stage, params))
    lock = directory.with_name(f"{directory.name}.lock")
    if lock in _claimed:
        return True
    _prepare(lock.parent)
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    _claimed[lock] = fd
    return True


def resume_store(root: Path, stage: str, params: dict[str, Any], runtime: "Runtime", enabled: bool
                 ) -> "ResumeStore | None":
    """The store of this run of ``stage`` for this process; ``None`` when resume is off, or when
    another stage process owns this run's state (``KDLIB_RESUME_OFF``)."""
    from kdlib.resume import ResumeStore

    if not enabled or os.environ.get(RESUME_OFF_ENV):
        return None
    key = stage_key(root, stage, params)
    directory = resume_dir(root, stage, key)
    _prepare(directory.parent)  # fails here, before training, rather than when the first epoch is saved
    others = sorted(p.name for p in directory.parent.glob("*") if p.is_dir() and p != directory) \
        if directory.parent.is_dir() else []
    if others and runtime.is_main:
        logging.getLogger(__name__).info(
            "%s: ignoring the resume states of %d other run(s) of this stage in %s (%s): their command, parameters "
            "or inputs differ from this run's; delete them when they are of no more use", stage, len(others),
            directory.parent, ", ".join(others))
    return ResumeStore(directory, key, runtime.rank, runtime.world_size, runtime.writes_outputs)


def clear_resume(root: Path, stage: str, params: dict[str, Any]) -> None:
    """Remove the state of the run of ``stage`` that just completed."""
    import shutil

    shutil.rmtree(resume_dir(root, stage, stage_key(root, stage, params)), ignore_errors=True)
