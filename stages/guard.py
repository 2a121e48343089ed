"""How every stage runs: outputs staged and moved into place only when complete, a cancel cleans
up, the stage dies with the ``dvc`` that started it, and it never writes results of parameters
that changed under it.

``with stage_outputs(tag, *outputs, ws=ws) as out:`` — write each output at ``out(path)``; on leaving the
block the outputs are checked, given folder manifests and renamed into place
(:class:`kdlib.outputs.StagedOutputs`). Before that move, and before any work, ``params.yaml`` is
compared with what the stage read when it started and with what the first stage of the same ``dvc``
run read (and with the ``-S`` values that ``dvc exp run`` was given): a second ``dvc exp run``
started in the same workspace rewrites ``params.yaml`` before DVC's lock refuses it, and without
this check the first run would go on training with the second one's values.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from kdlib import yamlfile
from kdlib.outputs import STAGING_DIR, StagedOutputs
from kdlib.process import (Terminated, ancestors, command_line, die_with_parent, process_alive,
                           process_start_time, raise_on_termination, watch_process)

if TYPE_CHECKING:  # importing the workspace imports torch: tests start stages of this module in a fraction of that
    from stages.workspace import Workspace

PARAMS_FILE = Path("params.yaml")
# the parent when the stage started: if it is gone by the time the stage body begins, the stage
# is already an orphan (die_with_parent then signals at once)
_PARENT_AT_START = os.getppid()

QUEUE_ADVICE = ("run concurrent experiments through DVC's queue instead: `dvc exp run --queue -S ...` for each, "
                "then `dvc queue start -j N`")


class ParamsChanged(RuntimeError):
    """``params.yaml`` is not what this stage (or this ``dvc`` run) started with."""


def params_digest(path: Path = PARAMS_FILE) -> tuple[str, Any]:
    """(sha256 of the parsed parameters, the parameters): comments and key order do not count."""
    values = yamlfile.load(path)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest(), values


def dvc_ancestor() -> tuple[int, int] | None:
    """(pid, start time) of the ``dvc`` process this stage runs under, or None outside DVC."""
    if "DVC_STAGE" not in os.environ:
        return None
    for pid in ancestors():
        argv = command_line(pid)
        names = [os.path.basename(a) for a in argv[:3]]
        if "dvc" in names or ("-m" in argv[:3] and "dvc" in argv[:4]):
            start = process_start_time(pid)
            return (pid, start) if start is not None else None
    return None


def _lookup(values: Any, dotted: str) -> tuple[bool, Any]:
    for key in dotted.split("."):
        if not isinstance(values, dict) or key not in values:
            return False, None
        values = values[key]
    return True, values


def _same_value(actual: Any, wanted: Any, text: str) -> bool:
    """Whether params.yaml's value is what ``-S key=text`` set; DVC's override grammar reads
    ``1e-3`` as a number where YAML 1.1 reads a string, so numbers compare by value."""
    if actual == wanted or str(actual) == text.strip().strip("'\""):
        return True
    try:
        return not isinstance(actual, bool) and float(actual) == float(text)
    except (TypeError, ValueError):
        return False


def set_params_mismatches(argv: list[str], values: Any, params_file: Path = PARAMS_FILE) -> list[str]:
    """The ``-S key=value`` / ``--set-param`` overrides of a ``dvc exp run`` command line that
    ``values`` (the parsed ``params.yaml``) does not hold. Overrides of other files and Hydra's
    sweep/append/delete syntax are not checked."""
    found = []
    for i, arg in enumerate(argv):
        if arg in ("-S", "--set-param") and i + 1 < len(argv):
            override = argv[i + 1]
        elif arg.startswith("--set-param="):
            override = arg.split("=", 1)[1]
        else:
            continue
        file, sep, rest = override.partition(":")
        if sep and "=" not in file:
            if Path(file).name != params_file.name:
                continue
            override = rest
        key, eq, text = override.partition("=")
        if not eq or key[:1] in "+~" or any(c in text for c in "(,*") or text.startswith("["):
            continue
        try:
            wanted = yamlfile.scalar(text)
        except yamlfile.YamlError:
            continue
        present, actual = _lookup(values, key.strip())
        if present and not _same_value(actual, wanted, text):
            found.append(f"{key}={text} (params.yaml has {actual!r})")
    return found


def _run_record(root: Path, dvc: tuple[int, int]) -> Path:
    exp = os.environ.get("DVC_EXP_NAME", "")
    return root / STAGING_DIR / "dvc-runs" / f"{dvc[0]}.{dvc[1]}{'.' + exp if exp else ''}.json"


def check_dvc_run(ws: "Workspace", tag: str, digest: str, values: Any) -> None:
    """Record (first stage of a ``dvc`` run) or compare (later stages) the parameters' digest."""
    dvc = dvc_ancestor()
    if dvc is None:
        return
    record = _run_record(ws.root, dvc)
    record.parent.mkdir(parents=True, exist_ok=True)
    for old in record.parent.glob("*.json"):  # records of dvc runs that are over
        pid, _, rest = old.name.partition(".")
        if pid.isdigit() and not process_alive(int(pid), int(rest.split(".")[0]) if rest[:1].isdigit() else None):
            old.unlink(missing_ok=True)
    wrong = set_params_mismatches(command_line(dvc[0]), values)
    if wrong:
        raise ParamsChanged(f"{tag}: `dvc` (pid {dvc[0]}) was started with {'; '.join(wrong)}: another command "
                            f"rewrote params.yaml since; nothing was written. {QUEUE_ADVICE}")
    try:
        with open(record, "x") as file:
            json.dump({"digest": digest, "stage": tag}, file)
        return
    except FileExistsError:
        first = json.loads(record.read_text() or "{}")
    if first.get("digest") != digest:
        raise ParamsChanged(f"{tag}: params.yaml differs from what stage {first.get('stage')!r} of this `dvc` run "
                            f"(pid {dvc[0]}) read: something rewrote it mid-run (a second `dvc exp run` in this "
                            f"workspace does, before DVC's lock refuses it); nothing was written. {QUEUE_ADVICE}")


@contextmanager
def stage_outputs(tag: str, *outputs: Path, ws: "Workspace", manifests: tuple[Path, ...] = (),
                  params_file: Path | None = None) -> Iterator[StagedOutputs]:
    """Run a stage body that writes ``outputs`` (see the module docstring); exits 128 + signal
    number on SIGTERM/SIGHUP, or 3 if ``params.yaml`` changed, leaving no output behind."""
    params_file = ws.root / PARAMS_FILE if params_file is None else params_file
    raise_on_termination()
    # kdlib's INFO lines (progress of a long phase, resumed epochs) on stderr; a no-op where a
    # multi-process stage configured it per rank already
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    changed = ParamsChanged(f"{tag}: params.yaml changed while this stage ran; its outputs were discarded "
                            f"(a second `dvc exp run` in this workspace rewrites it). {QUEUE_ADVICE}")
    watch: ParamsWatch | None = None
    try:
        die_with_parent(signal.SIGTERM, expected_parent=_PARENT_AT_START)
        dvc = dvc_ancestor()
        if dvc is not None:
            watch_process(*dvc)  # kill -9 of dvc must not leave this stage running as an orphan
        digest, values = params_digest(params_file)
        check_dvc_run(ws, tag, digest, values)
        watch = running = ParamsWatch(params_file, digest)  # stops a long training as soon as the file changes

        def unchanged() -> None:
            running.stop()
            if params_digest(params_file)[0] != digest:
                raise changed

        with StagedOutputs(outputs, tag, ws.root, manifests) as out:
            yield out
            out.commit(before_move=unchanged)
    except Terminated as stop:
        if watch is not None and watch.changed:
            raise SystemExit(_report(changed, 3)) from None
        print(f"{tag}: stopped by {signal.Signals(stop.signum).name}; nothing was written", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    except ParamsChanged as err:
        raise SystemExit(_report(err, 3)) from None
    except yamlfile.YamlError as err:  # params.yaml unreadable (a duplicate key, an alias bomb): before any work
        raise SystemExit(_report(err, 2)) from None
    except FloatingPointError as err:  # kdlib.train.NonFiniteError: a diverged run, its message says where
        raise SystemExit(_report(err, 1)) from None
    finally:
        if watch is not None:
            watch.stop()


def _report(err: Exception, code: int) -> int:
    print(f"error: {err}", file=sys.stderr)
    return code


class ParamsWatch:
    """A daemon thread that compares ``params.yaml`` with ``digest`` every ``interval_s`` (parsing
    it only when its size or mtime moved) and sends SIGTERM to this process on a change, so a
    stage does not train for hours on parameters that are no longer the workspace's."""

    def __init__(self, path: Path, digest: str, interval_s: float = 1.0) -> None:
        self.path, self.digest, self.interval_s = Path(path), digest, interval_s
        self.changed = False
        self._stopped = threading.Event()
        self._last = self._stamp()
        threading.Thread(target=self._run, name="params-watch", daemon=True).start()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_size, stat.st_mtime_ns

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            stamp = self._stamp()
            if stamp == self._last:
                continue
            self._last = stamp
            try:
                same = params_digest(self.path)[0] == self.digest
            except (OSError, yamlfile.YamlError):
                continue  # caught mid-write; the next poll or the check at commit decides
            if not same and not self._stopped.is_set():
                self.changed = True
                os.kill(os.getpid(), signal.SIGTERM)
                return

    def stop(self) -> None:
        self._stopped.set()


def _dvc_cache_dir(root: Path) -> Path:
    """The project's DVC cache: ``cache.dir`` from .dvc/config.local or .dvc/config (relative to
    .dvc/, as DVC reads it; a queued experiment's temporary copy names the workspace's cache
    there), else .dvc/cache."""
    import configparser

    for name in ("config.local", "config"):
        config = configparser.ConfigParser(interpolation=None)
        try:
            config.read(root / ".dvc" / name)
        except configparser.Error:
            continue  # DVC itself reports a broken config
        if config.has_option("cache", "dir"):
            return (root / ".dvc" / config.get("cache", "dir").strip("'\"")).resolve()
    return root / ".dvc" / "cache"


def _uncached_paths(stage: dict, item: str) -> set[str]:
    """The ``cache: false`` outputs a dvc.yaml stage declares (``${item}``, or ``${key}`` of a foreach
    over a mapping, filled in)."""
    paths = set()
    for kind in ("outs", "metrics", "plots"):
        for declared in stage.get(kind) or []:
            if isinstance(declared, dict):
                path, options = next(iter(declared.items()))
                if isinstance(options, dict) and options.get("cache") is False:
                    paths.add(path.replace("${item}", item).replace("${key}", item))
    return paths


def missing_outputs(root: Path = Path(".")) -> dict[str, list[str]]:
    """The cached outputs that ``dvc.lock`` records for the stages of ``dvc.yaml`` and that are in
    neither the workspace nor the DVC cache, by stage: what a fresh ``git clone`` lacks until a
    ``dvc pull``. Entries of stages no longer in dvc.yaml (DVC leaves them in the lock) are
    skipped, and so are ``cache: false`` outputs: git carries them (and DVC has just deleted those
    of the stage now running)."""
    lock_path, pipeline_path = root / "dvc.lock", root / "dvc.yaml"
    if not lock_path.is_file() or not pipeline_path.is_file():
        return {}
    lock, pipeline = yamlfile.load(lock_path) or {}, yamlfile.load(pipeline_path) or {}
    defined = pipeline.get("stages") or {}
    objects = _dvc_cache_dir(root) / "files" / "md5"
    missing: dict[str, list[str]] = {}
    for name, entry in (lock.get("stages") or {}).items():
        base, at, item = name.partition("@")
        if base not in defined or bool(at) != ("foreach" in defined[base] or "matrix" in defined[base]):
            continue
        uncached = _uncached_paths(defined[base].get("do", defined[base]), item)
        for out in entry.get("outs") or []:
            digest = str(out.get("md5", ""))
            if not digest or out["path"] in uncached or (root / out["path"]).exists():
                continue
            if not (objects / digest[:2] / digest[2:]).is_file():
                missing.setdefault(name, []).append(out["path"])
    return missing


def missing_outputs_advice(missing: dict[str, list[str]]) -> str:
    """What to tell the user when ``missing_outputs`` found some (empty when none)."""
    if not missing:
        return ""
    paths = [path for outs in missing.values() for path in outs]
    shown = ", ".join(paths[:6]) + (f" and {len(paths) - 6} more" if len(paths) > 6 else "")
    return (f"warning: dvc.lock records {len(paths)} output(s) that are in neither the workspace nor the DVC cache "
            f"({shown}; stages {', '.join(missing)}), as in a fresh clone: any stage of this run that needs them "
            f"runs again, training from scratch, and `dvc exp apply` of a queued or --temp experiment cannot check "
            f"them out. To reuse the team's results, stop (Ctrl-C) and run `dvc pull` first (a remote: README, "
            f"Sharing results), or pass --pull to `dvc exp run` / `dvc repro`.")
