"""Studies: a named grid of parameter overrides × seeds (``studies/<name>.yaml``) run as DVC experiments.

    python -m stages.study list
    python -m stages.study run NAME [-S key=value]... [--seeds 0,1,2] [--only axis=v1,v2] [-j N] [--no-wait] [--dry-run]
    python -m stages.study report NAME [-S key=value]... [--seeds 0,1,2] [--only axis=v1,v2]
    python -m stages.study backfill NAME... [--force]

``run`` checks every experiment's parameters first (as the stages will) and every ``-S`` argument it
will pass (parsed back with Hydra's override parser, the one DVC uses: one value, the intended one),
then queues the missing ones (``dvc exp run --queue -n <name> report -S ...``; finished, queued and
recorded ones are skipped, failed ones and records made with other parameters or code are queued
again), starts ``dvc queue start -j N`` and waits. ``report`` reads the finished experiments of the
same overrides through ``dvc.api`` (their summary.json, costs.json and quantization.json), and those
DVC no longer has from ``reports/studies/NAME/records.json`` (what an earlier report stored: a study
can be run over several machines or sessions, the report folder committed between them), and writes
``reports/studies/NAME/`` (kdlib.study.report), keeping in records.json the records of experiments it
was not asked for. ``backfill`` gives the records of an older records.json their digests
(kdlib.study.provenance) from the commit each ran on.

One ``run`` (not ``--dry-run``), ``report`` or ``backfill`` of a study at a time: each holds
``.dvc/tmp/study-NAME.lock`` (flock) while it works; a second one says which process holds it and exits
with status 2, as for every refusal made before anything is done (a bad study file, ``-S`` value or
grid). Status 1: experiments failed, or DVC's queue could not be read.

The report folder is written in a staging folder and swapped into place (kdlib.outputs); what a
killed report left (a staging folder, the previous report set aside as ``.NAME.<pid>.old``) is
cleaned up, or put back, by the next ``run`` or ``report`` of the study.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping

from kdlib import yamlfile
from kdlib.outputs import StagedOutputs, remove_path
from kdlib.study.page import study_page
from kdlib.study.provenance import (CODE_PATHS, Standing, code_digest, differences, is_code, params_digest, standing,
                                    standing_line, used_params)
from kdlib.study.records import RecordsError, load_records, stored_experiments
from kdlib.study.report import write_report
from kdlib.study.spec import (Experiment, Study, StudyError, apply_overrides, canonical, hydra_value, load_study,
                              override_arg, study_names)
from kdlib.study.table import Record
from stages import exp_queue
from stages.params import PARAMS_FILE, ParamError, read_params, resolve

STUDIES, REPORTS = Path("studies"), Path("reports") / "studies"
SUMMARY, COSTS, QUANTIZATION = "reports/summary.json", "reports/costs.json", "reports/quantization.json"
PENDING = {"Queued", "Running"}
# What an experiment reproduces: the report stage and everything it needs. Not `export` (the ONNX files
# and their int8 calibration, a minute per experiment on the default data), which no table reads.
TARGET = "report"
MAX_REQUEUES, MAX_WORKER_STARTS = 2, 10


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def worker_threads(jobs: int, environ: Mapping[str, str] = os.environ,
                   cores: int | None = None) -> dict[str, str]:
    """Thread limits for queue workers that run ``jobs`` experiments at once: each experiment's torch
    gets ``cores // jobs`` intra-op threads (at least one). By default every process takes one thread per
    core, and OpenMP threads that outnumber the cores spin while they wait: two experiments on two
    cores, with other work beside them, took 587.8 s and 599.1 s for a baseline that trains in 18.24 s
    alone. A limit the user set in the environment is kept; ``jobs`` = 1 sets none."""
    if jobs <= 1:
        return {}
    per = str(max(1, (cores or os.cpu_count() or 1) // jobs))
    return {var: per for var in THREAD_VARS if var not in environ}


def dvc(*args: str, detach: bool = False, extra_env: dict[str, str] | None = None) -> str:
    """Run ``dvc ARGS``; ``detach``: its output to a log, not a pipe (``dvc queue start`` leaves a
    worker behind that inherits the pipe, and reading it would wait for the whole queue)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", **(extra_env or {}),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if detach:
        log = Path(".dvc") / "tmp" / "study-queue.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.run(["dvc", *args], env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise SystemExit(f"error: dvc {' '.join(args)} failed (its output: {log})")
        return ""
    proc = subprocess.run(["dvc", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc.stdout


# ---- -S arguments, as DVC will read them -------------------------------------------------------------

@lru_cache(maxsize=1)
def _hydra() -> Any:
    """Hydra's override parser, the one ``dvc exp run -S`` hands every argument to (dvc.utils.hydra)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


class _DuplicateKey(Exception):
    pass


def _refuse_duplicate_keys(text: str) -> None:
    """Hydra builds a mapping with ``dict(pairs)``: of a key stated twice the last silently wins. The
    same parse, with a visitor that stops at the second one."""
    from hydra.core.override_parser.overrides_parser import (CommonTokenStream, InputStream, OverrideLexer,
                                                             OverrideParser)
    from hydra.core.override_parser.overrides_visitor import HydraOverrideVisitor

    class Strict(HydraOverrideVisitor):  # type: ignore[misc]
        def visitDictContainer(self, ctx: Any) -> dict[str, Any]:
            pairs = [self.visitDictKeyValuePair(ctx.getChild(i)) for i in range(1, ctx.getChildCount() - 1, 2)]
            keys = [k for k, _ in pairs]
            for i, key in enumerate(keys):
                if key in keys[:i]:
                    raise _DuplicateKey(key)
            return dict(pairs)

    lexer = OverrideLexer(InputStream(text))
    lexer.removeErrorListeners()
    parser = OverrideParser(CommonTokenStream(lexer))
    parser.removeErrorListeners()
    try:
        Strict(_hydra().functions).visit(parser.override())
    except _DuplicateKey as dup:
        raise ValueError(f"its mapping states the key {dup.args[0]!r} twice; DVC would keep the last one "
                         "silently: state each key once") from None


def parse_override(text: str) -> Any:
    """``key=value`` parsed as ``dvc exp run -S`` parses it (a Hydra ``Override``); ValueError with
    Hydra's own message when it cannot be parsed, or when a mapping in it states a key twice."""
    from hydra.errors import HydraException

    try:
        override = _hydra().parse_overrides([text])[0]
    except HydraException as err:
        raise ValueError(" ".join(str(err).split("See https://")[0].split())) from None
    if "{" in text:
        _refuse_duplicate_keys(text)
    return override


def same_value(a: Any, b: Any) -> bool:
    """Equal with types: ``1``, ``1.0``, ``True`` and ``"1"`` are four values (as in params.yaml)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_value(a[k], b[k]) for k in a)
    return bool(a == b)


def round_trip(key: str, value: Any) -> str | None:
    """Why ``-S key=value``, as :func:`kdlib.study.spec.override_arg` writes it, would not reach
    params.yaml as exactly ``value`` (None: it would). DVC splits ``-S`` at the first ``=``, reads a
    ``:`` before it as a file name, parses the rest with Hydra (an unquoted comma makes a sweep: one
    experiment per value) and writes the parsed value through OmegaConf (which resolves ``${...}``)."""
    arg = override_arg(key, value)
    if ":" in key:
        return "DVC reads the part of the key before ':' as the name of a parameters file"
    try:
        override = parse_override(arg)
    except ValueError as err:
        return f"Hydra cannot parse {arg!r}: {err}"
    if override.is_sweep_override():
        return f"Hydra reads {arg!r} as a sweep ({override.value_type.name}): DVC would queue one experiment per value"
    if override.type.name != "CHANGE" or override.package is not None or override.key_or_group != key:
        return f"Hydra reads the key of {arg!r} as {override.get_key_element()!r}"
    parsed = override.value()
    if not same_value(parsed, value):
        return f"Hydra reads {arg!r} as {parsed!r} ({type(parsed).__name__})"
    try:
        from omegaconf import OmegaConf

        written = OmegaConf.to_object(OmegaConf.create({"v": parsed}, flags={"allow_objects": True}))["v"]
    except Exception as err:  # noqa: BLE001 — any failure there is a value DVC cannot write
        return f"OmegaConf, through which DVC writes params.yaml, fails on it ({type(err).__name__}: " \
               f"{str(err).splitlines()[0] if str(err) else ''})"
    if not same_value(written, value):
        return f"OmegaConf, through which DVC writes params.yaml, turns it into {written!r}"
    return None


def check_arguments(study: Study, experiments: list[Experiment], from_cli: Mapping[str, Any]) -> None:
    """Every ``-S`` argument the experiments will be queued with reads back as its value, type
    included; :class:`StudyError` names the study file, the key and the value otherwise."""
    seen: set[tuple[str, str]] = set()
    for exp in experiments:
        for key, value in exp.overrides.items():
            token = (key, canonical(value))
            if token in seen:
                continue
            seen.add(token)
            try:
                why = round_trip(key, value)
            except StudyError as err:  # a type -S cannot carry
                why = str(err)
            if why:
                origin = " (from -S)" if key in from_cli else ""
                raise StudyError(f"{study.path}: {key} = {value!r}{origin}: cannot be passed to `dvc exp run -S` as "
                                 f"this one value: {why}")


def parse_set(items: list[str]) -> dict[str, Any]:
    """The command line's ``-S key=value`` arguments, each value read as DVC will read it (Hydra's
    grammar: ``1e-5`` is a float, ``'1.0'`` a string). Refused: a sweep (``a,b``, ``choice(...)``,
    ``range(...)``: DVC would queue one experiment per value, none of them the study's), a key given
    twice, a mapping with a key twice, and ``+``/``~``/``@`` forms (a study only sets existing keys)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise StudyError(f"-S {item!r}: expected key=value")
        try:
            override = parse_override(item)
        except ValueError as err:
            raise StudyError(f"-S {item!r}: not a value DVC can read: {err}") from None
        if override.is_sweep_override():
            raise StudyError(f"-S {item!r}: DVC reads this as a sweep ({override.value_type.name}: an unquoted comma, "
                             "or choice/range/interval/glob), one experiment per value, none of them this study's; "
                             f"quote it for one string (-S \"{key.strip()}='{raw.strip()}'\"), or sweep the key in the "
                             "study's grid")
        if override.type.name != "CHANGE" or override.package is not None:
            raise StudyError(f"-S {item!r}: expected key=value for a key params.yaml has (no +, ++, ~ or @package)")
        if override.key_or_group in out:
            raise StudyError(f"-S {override.key_or_group} is given twice; expected each key once (only the last "
                             "would count)")
        out[override.key_or_group] = override.value()
    return out


def parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise StudyError(f"--seeds {text}: expected comma-separated integers >= 0, e.g. 0,1,2") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise StudyError(f"--seeds {text}: expected distinct integers >= 0")
    return seeds


# ---- git: the parameters and code an experiment ran with ---------------------------------------------

def git(*args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(["git", *args], capture_output=True, text=True, input=stdin)
    if proc.returncode != 0:
        raise StudyError(f"git {' '.join(args)} failed: {proc.stderr.strip()[-500:] or proc.returncode}")
    return proc.stdout


@lru_cache(maxsize=None)
def params_at(rev: str) -> dict[str, Any]:
    """``params.yaml`` at ``rev``, read as DVC reads it (do not change the mapping: it is cached)."""
    return yamlfile.loads(git("show", f"{rev}:params.yaml"), f"{rev[:12]}:params.yaml")


@lru_cache(maxsize=None)
def commit_code_digest(rev: str) -> str:
    """The code digest of ``rev``'s tree (``git ls-tree -r``: each file's blob id)."""
    blobs = []
    for entry in git("ls-tree", "-r", "-z", rev, "--", *CODE_PATHS).split("\0"):
        if entry:
            meta, path = entry.split("\t", 1)
            if meta.split()[1] == "blob":
                blobs.append((path, meta.split()[2]))
    return code_digest(blobs)


def worktree_code_digest() -> str:
    """The code digest of what a queued experiment would run: the tracked files as they are in the
    working tree (DVC's queue stashes tracked changes into the experiment, and leaves untracked files
    out), each hashed by ``git hash-object`` as a commit would store it."""
    listed = git("ls-files", "-z", "--cached", "--", *CODE_PATHS).split("\0")
    paths = [p for p in dict.fromkeys(listed) if p and is_code(p) and os.path.isfile(p)]
    blobs = git("hash-object", "--stdin-paths", stdin="".join(f"{p}\n" for p in paths)).split()
    return code_digest(zip(paths, blobs))


def experiment_digests(rev: str) -> dict[str, str]:
    """A finished experiment's digests from its own commit: the params.yaml DVC wrote for it (the
    overrides applied) and the code of its tree."""
    values = yamlfile.loads(git("show", f"{rev}:params.yaml"), f"{rev[:12]}:params.yaml")
    return {"params": params_digest(values), "code": commit_code_digest(rev)}


# ---- one run, report or backfill of a study at a time ------------------------------------------------

LOCKS = Path(".dvc") / "tmp"


class StudyBusy(RuntimeError):
    """Another process holds the study's lock."""


@contextmanager
def study_lock(name: str, command: str) -> Iterator[Path]:
    """Hold ``.dvc/tmp/study-NAME.lock`` (an flock, let go when the process ends, however it ends);
    :class:`StudyBusy` naming the holder's pid and command when another process holds it. Two ``run``
    at once listed the same missing experiments and both queued them; two ``report`` replaced each
    other's folder."""
    path = LOCKS / f"study-{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text(errors="replace").strip() or "a process that has not written its pid yet"
            raise StudyBusy(f"study {name} is busy: {holder} holds {path}; one run, report or backfill of a study "
                            "at a time (two would queue the same experiments twice, or replace each other's "
                            "report): try again when it has finished") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} (`python -m stages.study {command} {name}`, started "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
        yield path
    finally:
        os.close(fd)


# ---- the report folder and its records.json ----------------------------------------------------------

_ASIDE = re.compile(r"^\.(?P<name>[a-z][a-z0-9_]*)\.(?P<pid>\d+)\.old$")  # kdlib.outputs.swap_into_place
_MKDTEMP = re.compile(r"^\.(?P<name>[a-z][a-z0-9_]*)-[a-z0-9_]{8}$")  # tempfile.mkdtemp, before the swap


def _set_aside(name: str) -> list[Path]:
    """Earlier reports of study ``name`` set aside by a swap that did not finish, newest first."""
    if not REPORTS.is_dir():
        return []
    found = [p for p in REPORTS.iterdir() if (m := _ASIDE.match(p.name)) and m["name"] == name]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def clean_leftovers(name: str) -> list[str]:
    """What killed reports of study ``name`` left, dealt with (call it holding the study's lock, so that
    none of it belongs to a live report): the report a swap set aside (``.NAME.<pid>.old``) is put back
    when the folder is missing (the kill came between the swap's two renames) and removed otherwise;
    an older report's staging folder (``.NAME-xxxxxxxx``) is removed. (Staging folders under
    ``.kdlib-staging/`` are removed by kdlib.outputs once their process is gone.) Says what it did."""
    out, said = REPORTS / name, []
    for aside in _set_aside(name):
        if not (out.exists() or out.is_symlink()):
            os.replace(aside, out)
            said.append(f"{out}: put back from {aside.name} (a report was killed while replacing it)")
        else:
            remove_path(aside)
            said.append(f"removed {aside} (left by a killed report)")
    if REPORTS.is_dir():
        for tmp in sorted(REPORTS.iterdir()):
            m = _MKDTEMP.match(tmp.name)
            if m and m["name"] == name and tmp.is_dir():
                remove_path(tmp)
                said.append(f"removed {tmp} (the staging folder of a killed report)")
    return said


def stored_document(name: str) -> tuple[Path, dict[str, Any]]:
    """(path, document) of the study's ``records.json``; an empty document when there is none. Without
    the study's lock (``run --dry-run``) a report may be swapping the folder: the report it set aside
    is read then."""
    path = REPORTS / name / "records.json"
    for candidate in [path, *(p / "records.json" for p in _set_aside(name)), path]:
        try:
            text = candidate.read_text()
        except (FileNotFoundError, NotADirectoryError):
            continue
        try:
            document = json.loads(text)
            stored_experiments(document, str(candidate))
        except ValueError as err:  # RecordsError, or not JSON
            raise StudyError(f"{err}" if isinstance(err, RecordsError) else f"{candidate}: not JSON ({err})") from None
        return candidate, document
    return path, {"format": 1, "experiments": {}}


def recorded(study: Study, experiments: list[Experiment]) -> tuple[Path, dict[str, Any], dict[str, Record]]:
    """The study's records.json: (path, document, {name: Record} of ``experiments`` it holds)."""
    path, document = stored_document(study.name)
    try:
        return path, document, load_records(document, experiments, str(path))
    except RecordsError as err:
        raise StudyError(str(err)) from None


# ---- the plan -------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """A study's experiments as asked for, checked, with the parameter digest each would run with now."""

    study: Study
    experiments: list[Experiment]
    overrides: dict[str, Any]  # the command line's -S
    base: dict[str, Any]  # params.yaml of the working tree
    params: dict[str, str]  # experiment name -> params digest
    _code: list[str] = field(default_factory=list)

    @property
    def code(self) -> str:
        """The working tree's code digest (computed once)."""
        if not self._code:
            self._code.append(worktree_code_digest())
        return self._code[0]

    def standing(self, exp: Experiment, digests: Mapping[str, str] | None) -> Standing:
        return standing(digests, self.params[exp.name], self.code)


def planned(args: argparse.Namespace) -> Plan:
    """The study, its experiments, the -S overrides; every experiment's parameters checked as the
    stages will check them, and every -S argument as DVC will read it."""
    study = load_study(STUDIES / f"{args.name}.yaml")
    overrides = parse_set(args.set)
    experiments = study.experiments(overrides, parse_seeds(args.seeds))
    cells = study.cells()
    for item in args.only:
        key, _, values = item.partition("=")
        try:
            wanted = yamlfile.scalar(f"[{values}]", f"--only {item}")
        except yamlfile.YamlError as err:
            raise StudyError(f"{study.path}: --only {item}: {err}") from None
        if key not in study.axes or not all(any(c.values.get(key) == w for c in cells) for w in wanted):
            raise StudyError(f"{study.path}: --only {item}: expected an axis of the grid ({', '.join(study.axes)}) "
                             "and some of its values")
        experiments = [e for e in experiments if any(e.cell.values.get(key) == w for w in wanted)]
    check_arguments(study, experiments, overrides)
    try:
        base = read_params(PARAMS_FILE)
    except (yamlfile.YamlError, FileNotFoundError) as err:
        raise StudyError(f"{PARAMS_FILE}: {err}") from None
    digests = {}
    for exp in experiments:
        try:
            values = apply_overrides(base, exp.overrides, f"{study.path} ({exp.cell.label}, seed {exp.seed})")
            resolve(values)
        except ParamError as err:
            raise StudyError(f"{study.path}: experiment {exp.name} ({exp.cell.label}, seed {exp.seed}): {err}")
        digests[exp.name] = params_digest(values)
    return Plan(study, experiments, overrides, base, digests)


def _short(value: Any, width: int = 40) -> str:
    text = hydra_value(value) if not isinstance(value, (dict, list)) else canonical(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def stale_lines(plan: Plan, path: Path, stale: list[tuple[Experiment, Record, Standing]]) -> list[str]:
    """Why the records in ``stale`` are not reused: how many ran on other code (and on which commits),
    how many with other parameters (a few of the keys that differ, old → new, from the commit each
    ran on: its params.yaml with the record's overrides), how many carry no digests."""
    lines = [f"  {len(stale)} recorded in {path} ran with other parameters or code than this run would: "
             "queued again"]
    code = [r for _, r, s in stale if s.code is False]
    if code:
        commits: dict[str, int] = {}
        for r in code:
            c = str((r.source or {}).get("commit") or "unknown")[:7]
            commits[c] = commits.get(c, 0) + 1
        lines.append(f"    other code: {len(code)} (they ran on commit "
                     + ", ".join(f"`{c}` ({n})" for c, n in sorted(commits.items()))
                     + f"; the code now: {', '.join(CODE_PATHS)} in the working tree)")
    params = [(e, r) for e, r, s in stale if s.params is False]
    if params:
        keys: dict[str, tuple[Any, Any]] = {}
        unknown: set[str] = set()
        for exp, r in params:
            commit = str((r.source or {}).get("commit") or "")
            try:
                old = apply_overrides(params_at(commit), r.experiment.overrides, f"{commit[:7]}:params.yaml") \
                    if commit else None
            except StudyError:
                old = None
            if old is None:
                unknown.add(commit[:7] or "unknown")
                continue
            for key, before, now in differences(used_params(old), used_params(apply_overrides(plan.base, exp.overrides,
                                                                                          str(PARAMS_FILE)))):
                keys.setdefault(key, (before, now))
        shown = [f"{k}: {_short(a)} → {_short(b)}" for k, (a, b) in list(keys.items())[:4]]
        if len(keys) > 4:
            shown.append(f"and {len(keys) - 4} more keys")
        if unknown:
            shown.append(f"keys not known for commit {', '.join(sorted(unknown))} (not in this clone)")
        why = "; ".join(shown) or "its commit's params.yaml was the same: it ran with uncommitted changes"
        lines.append(f"    other parameters: {len(params)} ({why})")
    none = [r for _, r, s in stale if s.params is None]
    if none:
        lines.append(f"    no digests: {len(none)} (recorded before records kept them; `python -m stages.study "
                     f"backfill {plan.study.name}` computes them from the commit each ran on)")
    return lines


def shell_quote(arg: str) -> str:
    """``arg`` for a POSIX shell, in double quotes when it holds single quotes and nothing a shell
    expands inside double quotes: ``-S "root='a,b'"`` reads better than shlex's
    ``'root='"'"'a,b'"'"''`` (a dry run's lines are meant to be read and pasted)."""
    if "'" in arg and not any(c in arg for c in '"$`\\!'):
        return f'"{arg}"'
    return shlex.quote(arg)


def set_args(exp: Experiment) -> list[str]:
    return [x for k, v in exp.overrides.items() for x in ("-S", override_arg(k, v))]


def queue(exp: Experiment, known: dict[str, tuple[str | None, str]]) -> None:
    """Queue ``exp``; a failed or orphaned entry of the same name is cleared first (it blocks the name)."""
    if known.get(exp.name, (None,))[0] == "Running":
        dvc("queue", "kill", "--force", exp.name)  # its process is gone; this marks it failed
    if exp.name in known:
        dvc("queue", "remove", exp.name)
    dvc("exp", "run", "--queue", "-n", exp.name, TARGET, *set_args(exp))


def missing_lock_outputs(root: Path = Path(".")) -> str | None:
    """Why the queue would fail now, or None: the committed dvc.lock names an output folder that neither the
    workspace nor the DVC cache holds (a fresh clone before `dvc pull` or `dvc repro`) and that a stage
    depends on a file inside of (data/prepared: the training stages depend on its index.csv). DVC 3.67 then
    fails every queued experiment that restores prepare and such a stage from the run cache ("failed to load
    directory ('data', 'prepared'): No such file or directory: .../<md5>.dir"): in a hinton2015 run the first
    experiment trained, and the next two failed so. Missing outputs that stages depend on whole (models/teacher)
    did not fail them."""
    from stages.guard import missing_outputs

    if not (Path(root) / "dvc.yaml").is_file():
        return None  # no pipeline: DVC refuses each experiment itself, naming what is missing
    stages = (yamlfile.load(Path(root) / "dvc.yaml") or {}).get("stages") or {}
    deps = {d for body in stages.values() for d in (body.get("do", body).get("deps") or []) if isinstance(d, str)}
    missing = sorted({p for outs in missing_outputs(root).values() for p in outs
                      if any(d.startswith(p.rstrip("/") + "/") for d in deps)})
    if not missing:
        return None
    return (f"dvc.lock records {', '.join(missing)}, in neither the workspace nor the DVC cache, and stages depend on "
            "files inside it: queued experiments that restore stages from the run cache would fail (DVC cannot load "
            "that folder). Run `dvc pull` (a remote: README, Sharing results) or `dvc repro prepare` (or `make repro`) "
            "once, then the study")


LEAVING_WORKER_WAIT_S = 60.0


def wait_for_leaving_worker(known: dict[str, tuple[str | None, str]], limit_s: float = LEAVING_WORKER_WAIT_S,
                            pause_s: float = 1.0) -> None:
    """Wait until the queue worker of an emptied queue has left, ``limit_s`` at most. dvc_task's monitor finds
    the queue empty, then shuts its worker down; a task queued in between is received by that worker and
    lost with it: DVC calls it Running for ever with no process record, and every exp_show fails on it
    (CI: a study run right after another lost its experiment so). A worker alive after ``limit_s`` runs
    something of another commit and will take the new tasks."""
    if any(state in PENDING for state, _ in known.values()) or not exp_queue.workers_alive():
        return
    print("  waiting for the queue worker of the emptied queue to leave (a task queued while it stops is lost)",
          flush=True)
    deadline = time.monotonic() + limit_s
    while exp_queue.workers_alive() and time.monotonic() < deadline:
        time.sleep(pause_s)


def run(args: argparse.Namespace) -> int:
    plan = planned(args)
    if args.dry_run:  # queues nothing, so it takes no lock: a dry run can look while a run waits
        return _run(args, plan)
    with study_lock(plan.study.name, "run"):
        if (problem := missing_lock_outputs()) is not None:
            raise StudyError(problem)
        for line in clean_leftovers(plan.study.name):
            print(f"  {line}", file=sys.stderr)
        return _run(args, plan)


def _run(args: argparse.Namespace, plan: Plan) -> int:
    study, experiments = plan.study, plan.experiments
    known = exp_queue.states()
    lost = set(exp_queue.orphaned(known))
    if lost:  # seen twice: a worker may have just collected them and left
        time.sleep(3)
        known = exp_queue.states()
        lost &= set(exp_queue.orphaned(known))
    path, _, stored = recorded(study, experiments)

    def usable(standing_: Standing) -> bool:
        """Reusable as it stands: made with what this run would use, or, with --accept-other-code, with
        the same parameters by code the user vouches for (a refactor, a docstring)."""
        return standing_.current or bool(args.accept_other_code and standing_.params)

    todo: list[Experiment] = []
    reused: list[Experiment] = []  # a record made with the parameters and code this run would use
    stale: list[tuple[Experiment, Record, Standing]] = []  # records made with others: queued again
    held: list[Experiment] = []  # finished in DVC with others: DVC holds the name, so not queued
    for exp in experiments:
        record = stored.get(exp.name)
        standing_now = plan.standing(exp, record.digests) if record else None
        if standing_now is not None and usable(standing_now):
            reused.append(exp)
            continue
        state = known.get(exp.name, (None, ""))[0]
        if exp.name in known and state != "Failed" and exp.name not in lost:
            if state in PENDING or usable(plan.standing(exp, experiment_digests(known[exp.name][1]))):
                continue  # queued or running, or finished with what this run would run
            held.append(exp)
            continue
        if record is not None and standing_now is not None:
            stale.append((exp, record, standing_now))
        todo.append(exp)
    finished = len(experiments) - len(todo) - len(held)
    orphans = len(lost & {e.name for e in todo})
    print(f"{study.name}: {len(experiments)} experiments, {finished} finished or queued, {len(todo)} to queue"
          + (f" ({orphans} orphaned: Running, their process and worker gone)" if orphans else "")
          + (f"; {len(reused)} of them recorded in {path}" if reused else ""))
    other_code = sum(1 for e in reused if not plan.standing(e, stored[e.name].digests).current)
    if other_code:
        print(f"  {other_code} of the recorded ones ran on other code, reused as --accept-other-code asks "
              "(their report says so)")
    if stale:
        print("\n".join(stale_lines(plan, path, stale)))
    if held:
        print(f"  {len(held)} finished in DVC with other parameters or code (the workspace changed after they were "
              f"queued), not queued again: DVC holds their names. `python -m stages.study report {study.name}` keeps "
              f"them in records.json; `dvc exp remove NAME...` then frees the names: "
              + ", ".join(e.name for e in held[:5]) + (" ..." if len(held) > 5 else ""))
    # Nothing of the study has run, so the stages its experiments share (hinton2015's teacher: 20 min) are
    # not in the run cache yet: N workers started together would each train them. The first experiment
    # runs alone with every core; the rest are queued once its worker has left.
    warm = args.jobs > 1 and len(todo) > 1 and finished == 0 and not (args.dry_run or args.no_wait or args.no_warm_up)
    later = todo[1:] if warm else []
    if warm:
        print(f"  {todo[0].name} runs alone first, on every core, so that the stages all experiments share train "
              f"once; then {args.jobs} at a time (--no-warm-up: all at once)", flush=True)
    if todo and not args.dry_run:
        wait_for_leaving_worker(known)
    for exp in todo[:1] if warm else todo:
        if args.dry_run:
            # quoted for a shell: a list value ("[fp32, fp16]") pasted unquoted would split at its spaces
            print("  " + " ".join(map(shell_quote, ["dvc", "exp", "run", "--queue", "-n", exp.name, TARGET,
                                                     *set_args(exp)])))
        else:
            queue(exp, known)
    if args.dry_run:
        return 0
    skip = {e.name for e in reused} | {e.name for e in held}
    by_name = {e.name: e for e in experiments if e.name not in skip}
    if not by_name:
        return 1 if held else 0
    requeued: dict[str, int] = {}
    lost_for_good: set[str] = set()  # orphaned more than MAX_REQUEUES times: counted as failed
    starts, idle = 0, 1  # idle: polls in a row that found tasks waiting and fewer workers than --jobs
    suspects: set[str] = set()  # orphaned at the last poll
    while True:
        jobs = 1 if later else args.jobs
        unqueued = {e.name for e in later}
        waiting = any(known.get(n, ("Queued",))[0] == "Queued" for n in by_name if n not in unqueued)
        idle = idle + 1 if waiting and exp_queue.workers_alive() < jobs else 0
        # the first start at once; later ones after two polls in a row (a worker writes its
        # process record a moment after `dvc queue start` returns)
        if idle >= 2:
            if starts == MAX_WORKER_STARTS:
                raise SystemExit(f"error: queue workers stopped {starts} times with experiments waiting "
                                 f"(their output: .dvc/tmp/study-queue.log, .dvc/tmp/exps/celery/dvc-exp-worker-*.out)")
            dvc("queue", "start", "--jobs", str(jobs), detach=True, extra_env=worker_threads(jobs))
            starts, idle = starts + 1, 0
        if args.no_wait:
            return 0
        time.sleep(args.poll)
        known = exp_queue.states()
        orphans = set(exp_queue.orphaned(known))
        lost, suspects = suspects & orphans, orphans
        for name in sorted(lost & set(by_name)):  # orphaned two polls in a row
            if requeued.get(name, 0) == MAX_REQUEUES:
                lost_for_good.add(name)
                continue
            print(f"  {name}: Running, but its process and the queue worker are gone; queued again", flush=True)
            queue(by_name[name], known)
            requeued[name] = requeued.get(name, 0) + 1
            known[name] = ("Queued", known[name][1])
        # the warm-up's worker leaves about 10 s after its queue empties (dvc_task's monitor); queueing the
        # rest before would hand them to a worker with every core's threads beside the new ones
        if later and known.get(todo[0].name, ("Queued",))[0] not in PENDING and exp_queue.workers_alive() == 0:
            for exp in later:
                queue(exp, known)
                known[exp.name] = ("Queued", "")
            print(f"  {todo[0].name} done: {len(later)} more queued, {args.jobs} at a time", flush=True)
            later, idle = [], 1
        now = {n: "Failed" if n in lost_for_good else s for n, (s, _) in known.items() if n in by_name}
        pending = sum(1 for s in now.values() if s in PENDING) + len(later)
        print(f"  {len(by_name) - pending}/{len(by_name)} done", flush=True)
        if not pending:
            failed = sorted(n for n, s in now.items() if s == "Failed")
            for name in failed:
                print(f"  failed: {name} (dvc queue logs {name})", file=sys.stderr)
            for name in sorted(set(by_name) - set(now)):  # e.g. removed from the queue by hand
                print(f"  not run: {name} (dvc queue status)", file=sys.stderr)
            return 1 if failed or set(by_name) - set(now) or held else 0


def report(args: argparse.Namespace) -> int:
    plan = planned(args)
    with study_lock(plan.study.name, "report"):
        for line in clean_leftovers(plan.study.name):
            print(f"  {line}", file=sys.stderr)
        return _report(plan)


def checkout_label(plan: Plan) -> str:
    """What the report's digests were compared with: ``commit `abc1234``` and whether the working tree's
    params.yaml or code differed from it."""
    try:
        head = git("rev-parse", "HEAD").strip()
        dirty = plan.code != commit_code_digest(head) or canonical(plan.base) != canonical(params_at(head))
    except (StudyError, yamlfile.YamlError):
        return "this checkout"
    return f"commit `{head[:7]}`" + (" with uncommitted changes" if dirty else "")


def _report(plan: Plan) -> int:
    import dvc.api

    study, experiments = plan.study, plan.experiments
    known = exp_queue.states()
    done = [e for e in experiments if e.name in known and known[e.name][0] not in PENDING | {"Failed"}]

    def summary(rev: str) -> dict[str, Any]:
        try:
            return dvc.api.metrics_show(SUMMARY, COSTS, repo=".", rev=rev)
        except FileNotFoundError:  # made before costs.json was apart: its summary.json holds the costs
            return dvc.api.metrics_show(SUMMARY, repo=".", rev=rev)

    def source(rev: str) -> dict[str, str]:  # the experiment's commit and its parent, the commit it ran on
        shas = subprocess.run(["git", "rev-parse", rev, f"{rev}^"], capture_output=True, text=True).stdout.split()
        return {"experiment_rev": shas[0], "commit": shas[1]} if len(shas) == 2 else {"experiment_rev": rev}

    path, document, stored = recorded(study, experiments)
    records = []
    for exp in done:
        rev = known[exp.name][1]
        digests = experiment_digests(rev)
        kept = stored.get(exp.name)
        if kept and plan.standing(exp, kept.digests).current and not plan.standing(exp, digests).current:
            continue  # the record made with today's parameters and code wins over an older run in DVC
        records.append(Record(exp, summary(rev), dvc.api.metrics_show(QUANTIZATION, repo=".", rev=rev), source(rev),
                              digests))
    found = {r.experiment.name for r in records}
    records += [stored[e.name] for e in experiments if e.name not in found and e.name in stored]
    found = {r.experiment.name for r in records}
    missing = [e for e in experiments if e.name not in found]
    # records of the experiments not asked for this time (other seeds, cells, -S values) stay as they were
    carried = {name: raw for name, raw in stored_experiments(document, str(path)).items() if name not in found}
    line = standing_line([plan.standing(r.experiment, r.digests) for r in records], checkout_label(plan)) \
        if records else None
    out = REPORTS / study.name
    with StagedOutputs([out], tag=f"study-{study.name}", root=Path(".")) as staged:
        write_report(study, records, missing, plan.overrides, staged(out), study_page, carried, line)
    print((out / "table.md").read_text())
    return 0


def backfill(args: argparse.Namespace) -> int:
    """Give the records of ``reports/studies/NAME/records.json`` that lack them their digests, computed
    from the commit each ran on (``source.commit``): that commit's params.yaml with the record's
    overrides, and that commit's code. (An experiment queued with uncommitted changes ran with those;
    they are not in any commit, and the digests then describe the commit.) Only ``digests`` is added:
    every other byte of the file stays as it was."""
    for name in args.names:
        if not re.match(r"^[a-z][a-z0-9_]*$", name):
            raise StudyError(f"backfill {name!r}: expected a study name (lower case letters, digits and _)")
        path = REPORTS / name / "records.json"
        with study_lock(name, "backfill"):
            for line in clean_leftovers(name):
                print(f"  {line}", file=sys.stderr)
            if not path.is_file():
                raise StudyError(f"{path}: no such file (a study's records are written by `python -m stages.study "
                                 "report NAME`)")
            _, document = stored_document(name)
            entries = stored_experiments(document, str(path))
            commits: dict[str, int] = {}
            for exp_name, raw in sorted(entries.items()):
                if raw.get("digests") and not args.force:
                    continue
                commit = str((raw.get("source") or {}).get("commit") or "")
                where = f"{path}: experiments.{exp_name}"
                if not commit:
                    raise StudyError(f"{where}: no source.commit, so the parameters and code it ran with are not "
                                     "known; expected the commit it ran on (run it again, or remove the record)")
                try:
                    values = apply_overrides(params_at(commit), raw.get("overrides") or {},
                                             f"{where} (on {commit[:7]})")
                except yamlfile.YamlError as err:
                    raise StudyError(f"{where}: {err}") from None
                raw["digests"] = {"params": params_digest(values), "code": commit_code_digest(commit)}
                commits[commit[:7]] = commits.get(commit[:7], 0) + 1
            temporary = path.with_name(f".records.json.{os.getpid()}.tmp")
            temporary.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
            os.replace(temporary, path)
            given = sum(commits.values())
            print(f"{path}: {given} of {len(entries)} records given digests"
                  + (" (from commit " + ", ".join(f"`{c}` ({n})" for c, n in sorted(commits.items())) + ")"
                     if commits else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the studies in studies/")
    for name in ("run", "report"):
        p = sub.add_parser(name)
        p.add_argument("name")
        p.add_argument("-S", "--set", action="append", default=[], help="key=value for every experiment")
        p.add_argument("--seeds", help="comma-separated seeds, replacing the study's")
        p.add_argument("--only", action="append", default=[], metavar="AXIS=V1,V2",
                       help="only the cells whose AXIS is one of these values (repeatable)")
        if name == "run":
            p.add_argument("-j", "--jobs", type=int, default=1, help="experiments at once (dvc queue start -j)")
            p.add_argument("--no-wait", action="store_true", help="queue and start, then return")
            p.add_argument("--no-warm-up", action="store_true",
                           help="with -j N and nothing of the study run yet, start N at once rather than one first")
            p.add_argument("--dry-run", action="store_true", help="print the queue commands; queue nothing")
            p.add_argument("--accept-other-code", action="store_true",
                           help="reuse records made with the same parameters by other code (default: queue them "
                                "again)")
            p.add_argument("--poll", type=float, default=10.0, help=argparse.SUPPRESS)
    p = sub.add_parser("backfill", help="give older records their parameter and code digests")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--force", action="store_true", help="recompute digests that records already have")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            broken = 0
            for name in study_names(STUDIES):
                try:
                    print(f"{name:20s} {load_study(STUDIES / f'{name}.yaml').title}")
                except StudyError as err:
                    print(f"error: {err}", file=sys.stderr)
                    broken += 1
            return 2 if broken else 0
        return {"run": run, "report": report, "backfill": backfill}[args.command](args)
    except (StudyError, StudyBusy) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except exp_queue.QueueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
