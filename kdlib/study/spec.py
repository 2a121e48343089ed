"""A study: a named grid of parameter overrides × seeds, declared in ``studies/<name>.yaml``.

    title: Label smoothing × KD temperature           # the report's heading
    about: >                                           # what it reproduces, the paper
      ...
    seeds: [0, 1, 2]                                   # `seed` of every cell (the students' seed)
    set: {distill.method: kd, distill.kd.alpha: 1.0}   # dotted params.yaml keys, every experiment
    grid:                                              # the product of each mapping's value lists;
      - {student: [cnn_small, deit], teacher_ls: [0.0, 0.1]}   # a list of mappings is their union
    pivot: {rows: [student, teacher_ls], columns: distill.kd.temperature}   # optional: gain as a grid
    families: {resnet18: ResNet, deit: ViT}            # optional: model families (same vs cross claims)
    reference: {distill.method: kd}                    # optional: each cell against this one (paired by seed)
    precisions: true                                   # optional: the per-precision table
    max_experiments: 5000                              # optional: the grid's limit (default 2,000)

Each (cell, seed) is one DVC experiment. Its name is derived from the study, its overrides and
the seed, so running a study again queues only what is missing, and a report reads exactly the
experiments of those overrides.

The file is read as DVC reads YAML (:mod:`kdlib.yamlfile`: YAML 1.2, so ``1e-5`` is a float; a key
stated twice is refused with its lines, where plain YAML would keep the last value silently). A value
listed twice in a grid list is refused too. A grid of more than ``max_experiments`` experiments (cells ×
seeds) is refused before it is built: a typo such as three 60-value lists would otherwise queue
648,000 experiments. :func:`override_arg` writes each value in Hydra's override grammar, the one
``dvc exp run -S`` parses: a string with a comma, a space or a bracket is quoted (unquoted,
``a,b`` is a sweep, two experiments), a string that reads as a number or a boolean stays a string.
"""
from __future__ import annotations

import copy
import gc
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import yaml

from kdlib import yamlfile

KNOWN_KEYS = {"title", "about", "seeds", "set", "grid", "pivot", "families", "precisions", "max_experiments",
              "reference"}
NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# A study's experiments (cells × seeds) unless its file raises ``max_experiments``: the largest
# built-in study has 72, and each experiment trains three models.
MAX_EXPERIMENTS = 2000


class StudyError(ValueError):
    """A study file or its overrides are invalid; the message names the file and the key."""


def canonical(value: Any) -> str:
    """One text per value, types kept apart (``1``, ``1.0``, ``true`` and ``"1"`` differ; key order does
    not count): what identifies a cell, and what the parameter digests hash."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its own overrides (``values``) on top of the study's ``set``."""

    values: dict[str, Any]

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_scalar(v)}" for k, v in self.values.items()) or "(defaults)"

    @property
    def key(self) -> str:
        """The cell's identity (:func:`canonical` of its values): a dict lookup finds it in linear time."""
        return canonical(self.values)


@dataclass(frozen=True)
class Experiment:
    """One DVC experiment of a study: a cell at one seed, with every ``-S`` override it runs with."""

    name: str
    cell: Cell
    seed: int
    overrides: dict[str, Any]


@dataclass(frozen=True)
class Study:
    name: str
    path: Path
    title: str
    about: str
    seeds: list[int]
    set: dict[str, Any]
    grid: list[dict[str, list[Any]]]
    pivot: dict[str, Any] | None = None
    families: dict[str, str] = field(default_factory=dict)
    precisions: bool = False
    max_experiments: int = MAX_EXPERIMENTS
    # grid values that name the cell every other is compared with (its distilled student, seed by seed): a
    # cell's reference has these values and the cell's own values for the reference's other axes
    reference: dict[str, Any] = field(default_factory=dict)

    @property
    def axes(self) -> list[str]:
        """The grid's keys, in the order they first appear."""
        return list(dict.fromkeys(k for block in self.grid for k in block))

    def cells(self) -> list[Cell]:
        """The grid's cells in order: each block's product, a cell already given by an earlier block
        left out. Linear in the number of combinations (a dict keyed by each cell's canonical text;
        the list scan this replaces took O(n²) and never finished a 60 × 60 × 60 grid)."""
        return list(self._cells)

    @cached_property
    def _cells(self) -> tuple[Cell, ...]:
        # Hundreds of thousands of small dicts set off one garbage collection after another, each walking
        # the whole heap (3× the build's own time once torch is imported); they hold no reference cycles.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._build_cells()
        finally:
            if collecting:
                gc.enable()

    def _build_cells(self) -> tuple[Cell, ...]:
        out: list[Cell] = []
        seen: dict[tuple[str, ...], set[tuple[str, ...]]] = {}  # sorted keys -> the value texts seen, in that order
        for n, block in enumerate(self.grid):
            keys = list(block)
            order = sorted(range(len(keys)), key=keys.__getitem__)
            texts = [[canonical(v) for v in block[k]] for k in keys]  # each value's text, once
            keyset = tuple(keys[i] for i in order)
            identity = order == list(range(len(keys)))
            later = any(tuple(sorted(other)) == keyset for other in self.grid[n + 1:])
            if keyset not in seen and all(len(set(t)) == len(t) for t in texts):
                # no earlier block has these keys and no list repeats a value: every combination is new
                out += [Cell(dict(zip(keys, combo))) for combo in itertools.product(*block.values())]
                if later:
                    seen[keyset] = {text if identity else tuple(text[i] for i in order)
                                    for text in itertools.product(*texts)}
                continue
            known = seen.setdefault(keyset, set())
            for text, combo in zip(itertools.product(*texts), itertools.product(*block.values())):
                key = text if identity else tuple(text[i] for i in order)
                if key not in known:
                    known.add(key)
                    out.append(Cell(dict(zip(keys, combo))))
        return tuple(out) or (Cell({}),)

    def size_bound(self) -> int:
        """The largest block's product: a lower bound of the cell count, known without building a cell."""
        return max((math.prod(len(v) for v in block.values()) for block in self.grid), default=1)

    def check_size(self, seeds: list[int] | None = None) -> None:
        """:class:`StudyError` when the grid at ``seeds`` (default: the study's) has more than
        ``max_experiments`` experiments; the largest block is counted before any cell is built."""
        n_seeds = len(self.seeds if seeds is None else seeds)
        bound = self.size_bound() * n_seeds
        if bound > self.max_experiments:
            self._too_big(self.size_bound(), n_seeds, "" if len(self.grid) == 1 else "at least ")
        cells = len(self._cells)
        if cells * n_seeds > self.max_experiments:
            self._too_big(cells, n_seeds)

    def _too_big(self, cells: int, n_seeds: int, bound: str = "") -> None:
        raise StudyError(f"{self.path}: the grid has {bound}{cells:,} cells × {n_seeds} seeds = {cells * n_seeds:,} "
                         f"experiments, more than max_experiments = {self.max_experiments:,}; expected a smaller "
                         "grid (a list typed by mistake?), or `max_experiments: N` in the study file if that many "
                         "are meant")

    def experiments(self, overrides: Mapping[str, Any] | None = None,
                    seeds: list[int] | None = None) -> list[Experiment]:
        """Every (cell, seed) with its overrides: the study's ``set``, then the cell, then
        ``overrides`` (the user's ``-S``, which win), then ``seed``. :class:`StudyError` past
        ``max_experiments``."""
        self.check_size(seeds)
        overrides = dict(overrides or {})
        clash = sorted(set(overrides) & set(self.axes))
        if clash:
            raise StudyError(f"{self.path}: -S {clash[0]} is an axis of the study's grid; a study sweeps it itself")
        if "seed" in overrides:
            raise StudyError(f"{self.path}: -S seed: use --seeds to choose the seeds")
        out = []
        for cell in self.cells():
            for seed in seeds if seeds is not None else self.seeds:
                merged = {**self.set, **cell.values, **overrides, "seed": seed}
                out.append(Experiment(experiment_name(self.name, {k: v for k, v in merged.items() if k != "seed"},
                                                      seed), cell, seed, merged))
        return out


def experiment_name(study: str, overrides: Mapping[str, Any], seed: int) -> str:
    """``<study>-<7 hex of the overrides>-s<seed>``: the same overrides give the same name."""
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:7]
    return f"{study.replace('_', '-')}-{digest}-s{seed}"


def _scalar(value: Any) -> str:
    """A value as the report shows it (YAML flow style)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


# A string Hydra's override grammar reads back as that same string without quotes: a name, a path, a
# dotted or dashed word. Anything else is quoted: a comma would make a sweep (two experiments), a
# space, bracket, brace, colon, quote, `=` or `(` changes the parse, and a word that reads as a number,
# a boolean or null would change type.
_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:[./-][A-Za-z0-9_]+)*$")
_KEYWORDS = {"true", "false", "null", "inf", "nan"}


def _quote(text: str) -> str:
    r"""``text`` in single quotes as Hydra reads them. A backslash is an escape only in a run of
    backslashes that ends at a quote: n of them before a quote inside the string stand for (n - 1) / 2
    backslashes and the quote, n before the closing quote for n / 2. So each run before a quote is
    doubled and the quote escaped (``it's`` → ``'it\'s'``), and a trailing run is doubled."""
    out = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    trailing = len(out) - len(out.rstrip("\\"))
    return "'" + out + "\\" * trailing + "'"


def hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar, the one ``dvc exp run -S key=value`` parses: ints and
    floats as Python writes them (``1e-05`` is a float there too), ``true``/``false``/``null``,
    lists ``[a, b]`` and mappings ``{k: v}``, and strings bare only when they cannot be read as
    anything else (:data:`_PLAIN`). :class:`StudyError` for another type (a YAML date, say)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # inf and nan read back as floats
    if isinstance(value, str):
        return value if _PLAIN.match(value) and value.lower() not in _KEYWORDS else _quote(value)
    if isinstance(value, list):
        return "[" + ", ".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str) or not _PLAIN.match(k) or k.lower() in _KEYWORDS:
                raise StudyError(f"mapping key {k!r}: expected a plain name (letters, digits, _) as a key")
        return "{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in value.items()) + "}"
    raise StudyError(f"{value!r} ({type(value).__name__}): expected a string, a number, true/false, null, "
                     "a list or a mapping")


def override_arg(key: str, value: Any) -> str:
    """``key=value`` for ``dvc exp run -S``, the value in Hydra's override grammar (:func:`hydra_value`),
    so DVC reads back exactly ``value``: one argument, never a sweep. ``stages.study`` parses each
    generated argument with Hydra's own parser before anything is queued."""
    return f"{key}={hydra_value(value)}"


def _merge(node: dict[str, Any], value: Mapping[str, Any], key: str, where: str) -> None:
    """Set ``value``'s keys in ``node`` as ``dvc exp run -S key={...}`` does (OmegaConf's merge into a
    struct config): keys are merged one by one, recursively; a key the mapping lacks is refused."""
    for name, item in value.items():
        if name not in node:
            raise StudyError(f"{where}: {key}: params.yaml's {key} has no key {name!r} (`-S` merges a mapping "
                             "into the existing one and adds no key)")
        if isinstance(node[name], dict) and isinstance(item, dict):
            _merge(node[name], item, f"{key}.{name}", where)
        else:
            node[name] = copy.deepcopy(item)


def apply_overrides(params: Mapping[str, Any], overrides: Mapping[str, Any], where: str,
                    add_keys: bool = False) -> dict[str, Any]:
    """``params`` with each dotted ``key: value`` set, as ``dvc exp run -S`` sets it: a mapping set on a
    mapping is merged into it key by key (DVC applies overrides with OmegaConf's merge), anything
    else replaces the value. A key that params.yaml lacks is an error (``-S`` would refuse it, or add
    it silently with ``+``), unless ``add_keys``."""
    out = copy.deepcopy(dict(params))
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node: Any = out
        for depth, name in enumerate(parents):
            if add_keys and isinstance(node, dict) and node.get(name) is None:
                node[name] = {}
            if not isinstance(node, dict) or name not in node:
                raise StudyError(f"{where}: {key}: params.yaml has no {'.'.join(parents[:depth + 1])!r}")
            node = node[name]
        if not isinstance(node, dict) or (last not in node and not add_keys):
            raise StudyError(f"{where}: {key}: params.yaml has no such key (expected an existing dotted key, "
                             "e.g. distill.kd.temperature)")
        if isinstance(node.get(last), dict) and isinstance(value, dict) and not add_keys:
            _merge(node[last], value, key, where)
        elif isinstance(node.get(last), list) and isinstance(value, dict):
            raise StudyError(f"{where}: {key}: params.yaml holds a list there; expected a list, not a mapping")
        else:
            node[last] = copy.deepcopy(value)
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` (``-S`` arguments) as a mapping, each value read as YAML 1.2
    (:func:`kdlib.yamlfile.scalar`, as DVC writes it into params.yaml: ``1e-5`` is a float). A key given
    twice, or a mapping value with a key twice, is refused: only one of them would count."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise StudyError(f"-S {item!r}: expected key=value")
        if key in out:
            raise StudyError(f"-S {key} is given twice; expected each key once (only the last would count)")
        try:
            out[key] = yamlfile.scalar(raw, f"-S {key}")
        except yamlfile.YamlError as err:
            raise StudyError(f"-S {item!r}: {err}") from None
    return out


def load_study(path: Path) -> Study:
    """Read and check ``studies/<name>.yaml``; :class:`StudyError` names the file and the key."""
    name = path.stem
    if not NAME.match(name):
        raise StudyError(f"{path}: a study's file name must be lower case letters, digits and _ (it names "
                         "its experiments)")
    try:
        raw = yamlfile.load(path)
    except FileNotFoundError:
        raise StudyError(f"{path}: no such study file") from None
    except yamlfile.YamlError as err:  # names the file and the line (a duplicate key: both lines)
        raise StudyError(str(err)) from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: expected a mapping with title, seeds, set, grid")
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise StudyError(f"{path}: unknown key {unknown[0]!r}; expected: {', '.join(sorted(KNOWN_KEYS))}")
    seeds = raw.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds \
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise StudyError(f"{path}: seeds = {seeds!r}: expected a list of distinct integers >= 0")
    settings = raw.get("set") or {}
    if not isinstance(settings, dict):
        raise StudyError(f"{path}: set: expected a mapping of dotted params.yaml keys to values")
    grid = raw.get("grid") or []
    blocks = [grid] if isinstance(grid, dict) else grid
    if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
        raise StudyError(f"{path}: grid: expected a mapping of key: [values], or a list of such mappings")
    for key, value in settings.items():
        _check_value(value, f"{path}: set.{key}")
    for block in blocks:
        for key, values in block.items():
            if not isinstance(values, list) or not values:
                raise StudyError(f"{path}: grid.{key} = {values!r}: expected a non-empty list of values")
            if key in settings or key == "seed":
                raise StudyError(f"{path}: grid.{key}: {'use seeds' if key == 'seed' else 'also in set'}")
            seen: set[str] = set()
            for value in values:
                _check_value(value, f"{path}: grid.{key}")
                if canonical(value) in seen:
                    raise StudyError(f"{path}: grid.{key} lists {_scalar(value)} twice; expected each value once")
                seen.add(canonical(value))
    limit = raw.get("max_experiments", MAX_EXPERIMENTS)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise StudyError(f"{path}: max_experiments = {limit!r}: expected an integer >= 1")
    pivot = raw.get("pivot")
    study = Study(name, path, str(raw.get("title") or name), str(raw.get("about") or "").strip(), seeds, settings,
                  [dict(b) for b in blocks], pivot, dict(raw.get("families") or {}), bool(raw.get("precisions")),
                  limit, dict(raw.get("reference") or {}))
    study.check_size()
    reference = raw.get("reference")
    if reference is not None and (not isinstance(reference, dict) or not reference or not any(
            all(k in cell.values and canonical(cell.values[k]) == canonical(v) for k, v in reference.items())
            for cell in study.cells())):
        raise StudyError(f"{path}: reference = {reference!r}: expected {{grid key: value}} naming at least one cell "
                         "of the grid (e.g. {distill.method: kd})")
    if pivot is not None:
        if not isinstance(pivot, dict) or set(pivot) != {"rows", "columns"} or pivot["columns"] not in study.axes \
                or not all(k in study.axes for k in pivot["rows"]):
            raise StudyError(f"{path}: pivot = {pivot!r}: expected {{rows: [grid keys], columns: grid key}}")
    return study


def _check_value(value: Any, where: str) -> None:
    """A value ``-S`` can carry: a string, number, boolean, null, or a list or mapping of them."""
    try:
        hydra_value(value)
    except StudyError as err:
        raise StudyError(f"{where}: {err}") from None


def study_names(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))
