"""YAML read the way DVC reads and writes it, with what a plain ``yaml.safe_load`` lets through refused.

Three rules, for every YAML file the project reads (``params.yaml``, ``studies/*.yaml``, ``dvc.yaml``,
``dvc.lock``) and every ``-S`` value it parses:

* **YAML 1.2 scalars, as DVC has them.** ``dvc exp run -S lr=1e-5`` writes ``lr: 1e-05`` through
  ruamel.yaml, and DVC reads params.yaml back with ``ruamel.yaml.YAML(typ="safe")`` (YAML 1.2: ``1e-05``
  is a float). PyYAML follows YAML 1.1, whose float needs a dot (``1.0e-5``): it read ``1e-05`` as the
  *string* ``'1e-05'``, so every learning-rate or weight-decay sweep below 1e-4 was refused as "not a
  number". Reading with DVC's own loader makes the stages see exactly what ``dvc params diff`` shows
  (also ``on``/``yes`` stay strings, ``0o17`` is octal, ``017`` is 17).
* **No duplicate keys.** YAML keeps the last of two equal keys without a word; a study or params file
  that states a key twice would run with one of them silently. Refused, naming the key and both lines.
* **Aliases bounded.** An anchor may be reused (``dvc.yaml`` shares its deps lists with ``&``/``*``), but
  a "billion laughs" document (aliases of aliases) is a few hundred bytes that expand to gigabytes as
  soon as anything walks the result (hashing params.yaml did: 3 GB). The events are counted before
  anything is built: the expanded document may hold at most :data:`MAX_NODES` nodes.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

MAX_NODES = 1_000_000  # expanded nodes; params.yaml has ~1,200, a study file a few dozen


class YamlError(ValueError):
    """A YAML document that cannot be read as the project reads YAML; the message names the file and line."""


def _yaml() -> Any:
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True)  # pure: the same resolver whether or not ruamel's C extension is there


def expanded_size(text: str, where: str, limit: int = MAX_NODES) -> int:
    """Nodes in the document once every alias is replaced by what it names; :class:`YamlError` past
    ``limit`` (naming the alias line), so a bomb is refused before it is built."""
    from ruamel.yaml.error import YAMLError
    from ruamel.yaml.events import (AliasEvent, CollectionEndEvent, CollectionStartEvent,
                                    ScalarEvent)

    anchors: dict[str, int] = {}
    stack: list[list[Any]] = [[0, None]]  # per open collection: [size so far, its anchor]
    try:
        for event in _yaml().parse(text):
            if isinstance(event, CollectionStartEvent):
                stack.append([1, event.anchor])
                continue
            if isinstance(event, CollectionEndEvent):
                size, anchor = stack.pop()
            elif isinstance(event, AliasEvent):
                size, anchor = anchors.get(event.anchor, 1), None
            elif isinstance(event, ScalarEvent):
                size, anchor = 1, event.anchor
            else:
                continue
            if anchor is not None:
                anchors[anchor] = size
            stack[-1][0] += size
            if stack[0][0] + sum(level[0] for level in stack[1:]) > limit:
                raise YamlError(f"{where}: line {event.start_mark.line + 1}: YAML aliases expand the document to more "
                                f"than {limit:,} nodes; expected a plain document (an alias bomb?)")
    except YAMLError as err:
        raise YamlError(f"{where}: not valid YAML ({_short(err)})") from None
    return stack[0][0]


def _short(err: Exception) -> str:
    return " ".join(str(err).split())[:400]


def loads(text: str, where: str = "<string>") -> Any:
    """The document in ``text`` (YAML 1.2 as DVC reads it); :class:`YamlError` names ``where`` and the
    line for a duplicate key, an alias bomb or a syntax error."""
    from ruamel.yaml.constructor import DuplicateKeyError
    from ruamel.yaml.error import YAMLError

    expanded_size(text, where)
    try:
        return _yaml().load(text)
    except DuplicateKeyError as err:
        key = str(err.problem).split('"')[1] if '"' in str(err.problem) else str(err.problem)
        first = err.context_mark.line + 1 if err.context_mark is not None else "?"
        again = err.problem_mark.line + 1 if err.problem_mark is not None else "?"
        raise YamlError(f"{where}: line {again}: duplicate key {key!r} in the mapping that starts at line {first}; "
                        "YAML would keep only the last value silently: state each key once") from None
    except YAMLError as err:
        raise YamlError(f"{where}: not valid YAML ({_short(err)})") from None


_cache: dict[str, tuple[tuple[int, ...], Any]] = {}  # resolved path -> (stat stamp, document)


def load(path: Path) -> Any:
    """The YAML file at ``path`` (see :func:`loads`). A stage reads params.yaml several times (its
    parameters, the digest that guards against a concurrent rewrite, the resume key), and ruamel's
    pure-Python reader takes ~0.1 s a time: a file whose inode, size, mtime and ctime are unchanged is
    parsed once and handed out as a copy."""
    path = Path(path)
    stat = path.stat()
    stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    name = str(path.resolve())
    if name not in _cache or _cache[name][0] != stamp:
        _cache[name] = (stamp, loads(path.read_text(), str(path)))
    return copy.deepcopy(_cache[name][1])


def scalar(text: str, where: str = "<value>") -> Any:
    """One value as YAML 1.2 reads it (``1e-5`` → 1e-05), e.g. the right-hand side of ``-S key=value``."""
    return loads(text, where)
