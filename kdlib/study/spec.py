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
    precisions: true                                   # optional: the per-precision table

Each (cell, seed) is one DVC experiment. Its name is derived from the study, its overrides and
the seed, so running a study again queues only what is missing, and a report reads exactly the
experiments of those overrides.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

KNOWN_KEYS = {"title", "about", "seeds", "set", "grid", "pivot", "families", "precisions"}
NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class StudyError(ValueError):
    """A study file or its overrides are invalid; the message names the file and the key."""


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its own overrides (``values``) on top of the study's ``set``."""

    values: dict[str, Any]

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_scalar(v)}" for k, v in self.values.items()) or "(defaults)"


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

    @property
    def axes(self) -> list[str]:
        """The grid's keys, in the order they first appear."""
        return list(dict.fromkeys(k for block in self.grid for k in block))

    def cells(self) -> list[Cell]:
        out: list[Cell] = []
        for block in self.grid:
            keys = list(block)
            for combo in itertools.product(*(block[k] for k in keys)):
                cell = Cell(dict(zip(keys, combo)))
                if cell not in out:
                    out.append(cell)
        return out or [Cell({})]

    def experiments(self, overrides: Mapping[str, Any] | None = None, seeds: list[int] | None = None) -> list[Experiment]:
        """Every (cell, seed) with its overrides: the study's ``set``, then the cell, then
        ``overrides`` (the user's ``-S``, which win), then ``seed``."""
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
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def override_arg(key: str, value: Any) -> str:
    """``key=value`` for ``dvc exp run -S``, the value in YAML flow style (lists stay one argument)."""
    return f"{key}={_scalar(value)}"


def apply_overrides(params: Mapping[str, Any], overrides: Mapping[str, Any], where: str,
                    add_keys: bool = False) -> dict[str, Any]:
    """``params`` with each dotted ``key: value`` set, as ``dvc exp run -S`` sets it. A key that
    params.yaml lacks is an error (``-S`` would add it silently), unless ``add_keys``."""
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
        node[last] = value
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` (``-S`` arguments) as a mapping, each value parsed as YAML."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise StudyError(f"-S {item!r}: expected key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise StudyError(f"-S {item!r}: the value is not YAML ({err})") from None
    return out


def load_study(path: Path) -> Study:
    """Read and check ``studies/<name>.yaml``; :class:`StudyError` names the file and the key."""
    name = path.stem
    if not NAME.match(name):
        raise StudyError(f"{path}: a study's file name must be lower case letters, digits and _ (it names "
                         "its experiments)")
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise StudyError(f"{path}: no such study file") from None
    except yaml.YAMLError as err:
        raise StudyError(f"{path}: not YAML ({err})") from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: expected a mapping with title, seeds, set, grid")
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise StudyError(f"{path}: unknown key {unknown[0]!r}; expected: {', '.join(sorted(KNOWN_KEYS))}")
    seeds = raw.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise StudyError(f"{path}: seeds = {seeds!r}: expected a list of distinct integers >= 0")
    settings = raw.get("set") or {}
    if not isinstance(settings, dict):
        raise StudyError(f"{path}: set: expected a mapping of dotted params.yaml keys to values")
    grid = raw.get("grid") or []
    blocks = [grid] if isinstance(grid, dict) else grid
    if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
        raise StudyError(f"{path}: grid: expected a mapping of key: [values], or a list of such mappings")
    for block in blocks:
        for key, values in block.items():
            if not isinstance(values, list) or not values:
                raise StudyError(f"{path}: grid.{key} = {values!r}: expected a non-empty list of values")
            if key in settings or key == "seed":
                raise StudyError(f"{path}: grid.{key}: {'use seeds' if key == 'seed' else 'also in set'}")
    pivot = raw.get("pivot")
    study = Study(name, path, str(raw.get("title") or name), str(raw.get("about") or "").strip(), seeds, settings,
                  [dict(b) for b in blocks], pivot, dict(raw.get("families") or {}), bool(raw.get("precisions")))
    if pivot is not None:
        if not isinstance(pivot, dict) or set(pivot) != {"rows", "columns"} or pivot["columns"] not in study.axes \
                or not all(k in study.axes for k in pivot["rows"]):
            raise StudyError(f"{path}: pivot = {pivot!r}: expected {{rows: [grid keys], columns: grid key}}")
    return study


def study_names(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))
