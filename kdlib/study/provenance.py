"""What decided a study experiment's result, as two digests kept in its record.

A study's experiments are named by their overrides alone, so a name says nothing of the base
``params.yaml`` or of the code it ran with: after ``epochs: 30`` became ``2`` in params.yaml, or after the
training code changed, ``run`` would still count every recorded experiment as done and a report would
mix results of other settings without a word. Each record therefore carries

- ``params``: sha256 of the parameters the experiment ran with (params.yaml with the experiment's
  overrides applied, as :func:`kdlib.study.spec.apply_overrides` applies them, less the data set and
  model presets and method sections it does not use: :func:`used_params`), in
  :func:`kdlib.study.spec.canonical` form: comments, key order and YAML spelling do not count,
  types do (``1`` is not ``1.0``);
- ``code``: sha256 over the sorted ``path<TAB>git blob sha-1`` lines of the files that decide a
  result (:data:`CODE_PATHS` less :data:`NOT_CODE`). A git blob id can be had from a commit
  (``git ls-tree -r``) as well as from the working tree (``git hash-object``), so the digest of the
  code an experiment ran with and of the code a run would use now are computed the same way.

The study driver itself (:data:`NOT_CODE`: ``kdlib/study/``, ``stages/study.py``,
``stages/exp_queue.py``) is left out: it queues experiments and reads them back, no stage imports it,
and counting it would call every record stale after a change to how tables are drawn.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from kdlib.study.spec import canonical

# What an experiment's result depends on besides its parameters: the library, the stages dvc.yaml
# runs, the pipeline itself and the pinned packages.
CODE_PATHS = ("kdlib", "stages", "dvc.yaml", "requirements.txt")
NOT_CODE = ("kdlib/study/", "stages/study.py", "stages/exp_queue.py")


def used_params(values: Any) -> Any:
    """``values`` less the presets no stage of its run reads: the data set presets other than
    ``dataset``'s, the model presets other than ``teacher``'s and ``student``'s, and the knob sections of
    the distillation methods other than ``distill.method``'s, and ``distill.transfer`` when it keeps every
    class (what every run did before the section existed). A preset or method added to params.yaml (or a
    change to one the experiment does not use) then leaves every record's digest as it was."""
    if not isinstance(values, Mapping):
        return values
    out = dict(values)
    for section, chosen in (("datasets", [values.get("dataset")]), ("models", [values.get("teacher"), values.get("student")])):
        if isinstance(values.get(section), Mapping):
            out[section] = {k: v for k, v in values[section].items() if k in chosen}
    distill = values.get("distill")
    if isinstance(distill, Mapping):
        out["distill"] = {k: v for k, v in distill.items() if not isinstance(v, Mapping) or k in
                          ("transfer", distill.get("method"))}
        transfer = distill.get("transfer")
        # every class in the transfer set is what runs did before the section existed: no bias shift applies
        if (isinstance(transfer, Mapping) and not transfer.get("exclude_classes")
                and transfer.get("only_classes") is None):
            out["distill"].pop("transfer")
    return out


def _without_nulls(values: Any) -> Any:
    if isinstance(values, Mapping):
        return {k: _without_nulls(v) for k, v in values.items() if v is not None}
    if isinstance(values, list):
        return [_without_nulls(v) for v in values]
    return values


def params_digest(values: Any) -> str:
    """sha256 of the parameters a run uses (:func:`used_params` of a resolved mapping, in
    :func:`kdlib.study.spec.canonical` form). A key set to null counts as absent, as :func:`differences`
    shows it: a key added to params.yaml with a null default (a model preset's ``augment``) leaves the
    records made before it valid."""
    return hashlib.sha256(canonical(_without_nulls(used_params(values))).encode()).hexdigest()


def is_code(path: str) -> bool:
    """Whether ``path`` (relative, ``/``-separated) is among the files a result depends on."""
    inside = any(path == p or path.startswith(p + "/") for p in CODE_PATHS)
    return inside and not any(path.startswith(p) if p.endswith("/") else path == p for p in NOT_CODE)


def code_digest(blobs: Iterable[tuple[str, str]]) -> str:
    """sha256 over the sorted ``path\\tblob\\n`` lines of ``blobs`` ((path, git blob sha-1) pairs, from
    ``git ls-tree -r`` or ``git hash-object``) whose path :func:`is_code`."""
    lines = sorted(f"{path}\t{blob}\n" for path, blob in blobs if is_code(path))
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """The dotted keys whose values differ between two parameter mappings, with both values
    (``(key, old, new)``; a key only one side has shows None on the other), sorted by key. Values
    compare by :func:`canonical` text, so ``1`` and ``1.0`` differ as they do in the digest."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            out += differences(old.get(key), new.get(key), path)
        return out
    return [] if canonical(old) == canonical(new) else [(prefix, old, new)]


@dataclass(frozen=True)
class Standing:
    """How a record stands against what would run now: ``params`` / ``code`` say whether each digest
    matches (None: the record has no digests)."""

    params: bool | None
    code: bool | None

    @property
    def current(self) -> bool:
        return bool(self.params and self.code)


def standing(recorded: Mapping[str, str] | None, params_now: str, code_now: str) -> Standing:
    """Compare a record's ``digests`` with the digests an experiment would get now."""
    if not recorded:
        return Standing(None, None)
    return Standing(recorded.get("params") == params_now, recorded.get("code") == code_now)


def standing_counts(standings: Sequence[Standing]) -> dict[str, int]:
    """How many of ``standings`` are current, differ in code only, in parameters only, in both, or
    are unknown (no digests)."""
    counts = {"current": 0, "code": 0, "params": 0, "both": 0, "unknown": 0}
    for s in standings:
        key = ("unknown" if s.params is None else "current" if s.current else "both"
               if not (s.params or s.code) else "params" if not s.params else "code")
        counts[key] += 1
    return counts


def standing_line(standings: Sequence[Standing], against: str) -> str:
    """table.md's sentence: how many experiments ran with the parameters and code of ``against``
    (the checkout the report was made from, e.g. "commit `abc1234`"), and how many with others."""
    counts = standing_counts(standings)
    parts = [f"{counts['current']} of {len(standings)} experiments ran with the same parameters and code"]
    parts += [text.format(n=counts[key]) for key, text in (
        ("code", "{n} with other code"), ("params", "{n} with other parameters"),
        ("both", "{n} with other parameters and other code"),
        ("unknown", "{n} recorded without digests")) if counts[key]]
    return (f"Against {against} (its params.yaml with each experiment's overrides; its code: "
            f"{', '.join(p + '/' if '.' not in p else p for p in CODE_PATHS)}, not the study driver): "
            + ", ".join(parts) + " (each record's `digests` in `records.json`; `run` queues the others again).")
