"""Typed settings parsed from plain mappings: each field is declared once, with its check.

A settings class is a frozen dataclass whose fields are made with :func:`setting`. :func:`parse`
turns a mapping (a section of a YAML file, a dict a test builds) into an instance, or collects
one message per problem — unknown key, missing key, wrong type or range — each naming the dotted
key, the value and what is allowed, e.g. ``models.cnn_small.lr = -1: expected a number in (0, inf]``.
A class may add cross-field checks in a ``problems(self) -> list[tuple[str | None, str]]`` method:
``(key, "expected ...")`` for a problem with one key (shown as ``section.key = value: expected ...``),
``(None, text)`` for one of the whole section; ``key`` may reach into a mapping (``options.x``).

This module knows nothing of any file: the pipeline's stages call it on ``params.yaml``, tests
and benchmarks on dicts.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import MISSING, fields
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

T = TypeVar("T")

# A check returns None when the value is fine, else what was expected ("an integer in [1, inf]").
Check = Callable[[Any], "str | None"]


class SchemaError(ValueError):
    """Every problem found in a mapping; ``problems`` holds one message each."""

    def __init__(self, problems: Sequence[str], title: str = "invalid settings") -> None:
        self.problems = list(problems)
        super().__init__(f"{title}:\n  " + "\n  ".join(self.problems))


# ---- checks ---------------------------------------------------------------------------------
def is_int(lo: int | None = None, hi: int | None = None) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return "an integer"
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return f"an integer in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        return None
    return check


def is_float(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        desc = f"a number in {left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{right}"
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return desc
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return desc
        if hi is not None and (v > hi or (hi_open and v == hi)):
            return desc
        return None
    return check


def optional(check: Check) -> Check:
    """``None`` or a value ``check`` accepts."""
    return lambda v: None if v is None else check(v)


def is_bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def is_str(v: Any) -> str | None:
    return None if isinstance(v, str) and v else "a non-empty string"


def one_of(*choices: Any) -> Check:
    def check(v: Any) -> str | None:
        ok = not isinstance(v, bool) and any(v == c and type(v) is type(c) for c in choices)
        return None if ok else f"one of: {', '.join(map(str, choices))}"
    return check


def is_float_list(v: Any) -> str | None:
    ok = isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                           and math.isfinite(x) for x in v)
    return None if ok else "a non-empty list of finite numbers"


# Seeds feed numpy's RandomState (which takes [0, 2**32 - 1]) and torch generators after adding an
# epoch or a rank: a larger one passed validation and then crashed without naming the key.
SEED_MAX = 2**32 - 1
is_seed = is_int(0, SEED_MAX)


def is_str_list(v: Any) -> str | None:
    ok = isinstance(v, list) and v and all(isinstance(x, str) and x for x in v) and len(set(v)) == len(v)
    return None if ok else "a non-empty list of distinct names"


def is_mapping(v: Any) -> str | None:
    return None if isinstance(v, dict) else "a mapping"


def non_finite(value: Any, path: str) -> list[str]:
    """One message per NaN or ±inf anywhere in ``value`` (nested lists and mappings included).

    Checked for every value that :func:`parse` reads, whatever its own check: a NaN passes any
    comparison-based check (``s <= 0`` is false for NaN), and a NaN std or an infinite lr trains to
    a NaN model that would otherwise be cached as a result."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{path} = {value!r}: expected a finite number (NaN and infinities are never valid parameters)"]
    if isinstance(value, dict):
        return [m for k, v in value.items() for m in non_finite(v, f"{path}.{k}")]
    if isinstance(value, (list, tuple)):
        return [m for i, v in enumerate(value) for m in non_finite(v, f"{path}[{i}]")]
    return []


# ---- fields -----------------------------------------------------------------------------------
# A parser reads a value that needs more than one check (value, dotted path, problems) -> value or None.
Parser = Callable[[Any, str, list[str]], Any]


def setting(check: Check | None = None, default: Any = MISSING, *, required: bool | None = None,
            context: bool = False, section: type | None = None, presets: type | None = None,
            parser: Parser | None = None) -> Any:
    """A dataclass field with its check.

    ``default`` makes the key optional unless ``required=True`` (a key every file must state
    even though code may construct the class without it). ``context=True``: not read from the
    mapping; the caller supplies it. ``section`` / ``presets``: a nested settings class, or a
    mapping of names to instances of one; ``parser``: a function that reads the value itself.
    """
    metadata = {"check": check, "required": required, "context": context, "section": section, "presets": presets,
                "parser": parser}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    if default is MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _is_required(f: dataclasses.Field) -> bool:
    if f.metadata.get("required") is not None:
        return bool(f.metadata["required"])
    return f.default is MISSING and f.default_factory is MISSING  # type: ignore[misc]


def keys(cls: type) -> list[str]:
    """The keys a mapping for ``cls`` may hold."""
    return [f.name for f in fields(cls) if not f.metadata.get("context")]


def _parse_fields(cls: type, values: Mapping[str, Any], where: str, problems: list[str]) -> dict[str, Any] | None:
    found: dict[str, Any] = {}
    ok = True
    for f in fields(cls):
        meta = f.metadata
        if meta.get("context"):
            continue
        path = f"{where}{f.name}"
        if f.name in values and meta.get("section") is None and meta.get("presets") is None:
            bad = non_finite(values[f.name], path)
            if bad:  # before any check or parser sees it: a NaN slips through comparisons
                problems.extend(bad)
                ok = False
                continue
        if meta.get("parser") is not None:
            if f.name not in values:
                problems.append(f"{path}: missing section")
                ok = False
                continue
            before = len(problems)
            value = meta["parser"](values[f.name], path, problems)
            ok = ok and value is not None and len(problems) == before
            found[f.name] = copy.deepcopy(value)
        elif meta.get("section") is not None:
            if f.name not in values:
                problems.append(f"{path}: missing section")
                ok = False
                continue
            parsed = parse(meta["section"], values[f.name], path + ".", problems)
            ok = ok and parsed is not None
            found[f.name] = parsed
        elif meta.get("presets") is not None:
            presets = values.get(f.name)
            if not isinstance(presets, dict) or not presets:
                problems.append(f"{path}: expected a mapping of named presets")
                ok = False
                continue
            parsed_presets = {name: parse(meta["presets"], preset, f"{path}.{name}.", problems)
                              for name, preset in presets.items()}
            ok = ok and all(p is not None for p in parsed_presets.values())
            found[f.name] = parsed_presets
        elif f.name not in values:
            if _is_required(f):
                problems.append(f"{path}: missing")
                ok = False
        else:
            expected = meta["check"](values[f.name]) if meta.get("check") else None
            if expected:
                problems.append(f"{path} = {values[f.name]!r}: expected {expected}")
                ok = False
            else:
                found[f.name] = copy.deepcopy(values[f.name])  # the settings never share the caller's lists
    return found if ok else None


def _unknown(values: Mapping[str, Any], allowed: Iterable[str], where: str, problems: list[str]) -> None:
    allowed = list(allowed)
    for key in values:
        if key not in allowed:
            problems.append(f"{where}{key}: unknown key; allowed here: {', '.join(allowed)}")


def _lookup(instance: Any, dotted: str) -> Any:
    """The value at ``key`` or ``key.sub.sub`` (into mappings) of ``instance``."""
    first, *rest = dotted.split(".")
    value = getattr(instance, first)
    for part in rest:
        value = value[part]
    return value


def _build(cls: type[T], found: dict[str, Any], where: str, problems: list[str]) -> T | None:
    instance = cls(**found)
    own = instance.problems() if hasattr(instance, "problems") else []
    for key, text in own:
        if key is None:
            problems.append(f"{where.rstrip('.')}: {text}" if where else text)
        else:
            problems.append(f"{where}{key} = {_lookup(instance, key)!r}: {text}")
    return None if own else instance


def parse(cls: type[T], values: Any, where: str = "", problems: list[str] | None = None) -> T | None:
    """An instance of ``cls`` from ``values``; ``None`` when something is wrong, with one message
    per problem appended to ``problems`` (raises :class:`SchemaError` when no list is given)."""
    raise_at_end = problems is None
    problems = [] if problems is None else problems
    before = len(problems)
    instance = None
    if not isinstance(values, dict):
        problems.append(f"{where.rstrip('.') or 'params'}: expected a mapping, got {values!r}")
    else:
        _unknown(values, keys(cls), where, problems)
        found = _parse_fields(cls, values, where, problems)
        if found is not None and len(problems) == before:
            instance = _build(cls, found, where, problems)
    if raise_at_end and len(problems) > before:
        raise SchemaError(problems)
    return instance


def parse_merged(classes: Sequence[type], values: Any, where: str, problems: list[str]) -> tuple | None:
    """One flat mapping read as several settings classes at once (a model preset is an
    architecture and a training recipe): each class takes its own keys."""
    if not isinstance(values, dict):
        problems.append(f"{where.rstrip('.')}: expected a mapping, got {values!r}")
        return None
    before = len(problems)
    _unknown(values, [k for cls in classes for k in keys(cls)], where, problems)
    parts = [_parse_fields(cls, {k: v for k, v in values.items() if k in keys(cls)}, where, problems)
             for cls in classes]
    if len(problems) > before or any(p is None for p in parts):
        return None
    built = tuple(_build(cls, part, where, problems) for cls, part in zip(classes, parts))  # type: ignore[arg-type]
    return None if any(b is None for b in built) else built


def as_dict(instance: Any) -> dict[str, Any]:
    """The mapping :func:`parse` would read ``instance`` from (context fields left out)."""
    return {k: getattr(instance, k) for k in keys(type(instance))}
