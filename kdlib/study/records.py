"""A study's finished experiments as data: ``records.json`` in its report folder.

DVC keeps an experiment as a git ref and its outputs in a cache; both stay on the machine that ran it
unless pushed (``dvc exp push``). The report folder is what a team commits, so it also carries every
record it was computed from: each experiment's metrics (its summary.json with costs.json, and
quantization.json), the experiment's commit and the commit it ran on. A later ``report`` reads the
experiments it can no longer find in DVC from there, and ``run`` does not queue them again: a study can
be finished over several machines or sessions, and anyone can recompute the tables from the file.

Each record also carries ``digests``: of the parameters it ran with and of the code
(:mod:`kdlib.study.provenance`), so ``run`` reuses a record only when both are what it would run now.
A report over part of a study (``--seeds``, ``--only``, other ``-S``) writes its records beside the
ones the file already held (``dump_records(..., carried=...)``): records are never dropped.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from kdlib.study.spec import Experiment
from kdlib.study.table import Record

FORMAT = 1


class RecordsError(ValueError):
    """``records.json`` is not what ``dump_records`` writes."""


def stored_experiments(data: Any, where: str) -> dict[str, Any]:
    """``records.json``'s ``experiments`` mapping, every record as stored; :class:`RecordsError` when
    the document is not what :func:`dump_records` writes."""
    if not isinstance(data, Mapping) or data.get("format") != FORMAT \
            or not isinstance(data.get("experiments"), Mapping):
        raise RecordsError(f"{where}: expected {{\"format\": {FORMAT}, \"experiments\": {{name: record}}}}, "
                           "as `python -m stages.study report` writes it")
    return dict(data["experiments"])


def dump_records(records: Sequence[Record], carried: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON document for ``records`` (sorted by experiment name, so the same records give the same
    bytes), with ``carried`` (records of other experiments, as stored: other seeds, cells or ``-S``
    values that this report did not ask for) kept beside them unchanged."""
    out = dict(carried or {})
    for r in sorted(records, key=lambda r: r.experiment.name):
        out[r.experiment.name] = {"seed": r.experiment.seed, "cell": r.experiment.cell.values,
                                  "overrides": r.experiment.overrides, "source": dict(r.source or {}),
                                  "summary": r.summary, "quantization": r.quantization}
        if r.digests:
            out[r.experiment.name]["digests"] = dict(r.digests)
    return {"format": FORMAT, "experiments": dict(sorted(out.items()))}


def load_records(data: Mapping[str, Any], experiments: Sequence[Experiment], where: str) -> dict[str, Record]:
    """The stored records of ``experiments`` ({name: Record}). A record counts only when its overrides
    are the experiment's own (the name is a hash of them; this also catches a hand-edited file).
    ``where`` names the file in errors."""
    stored = stored_experiments(data, where)
    out = {}
    for exp in experiments:
        raw = stored.get(exp.name)
        if raw is None:
            continue
        if not isinstance(raw, Mapping) or not isinstance(raw.get("summary"), Mapping):
            raise RecordsError(f"{where}: experiments.{exp.name}: expected a record with a 'summary' object")
        if raw.get("overrides") != exp.overrides or raw.get("seed") != exp.seed:
            raise RecordsError(f"{where}: experiments.{exp.name}: its overrides are not the experiment's "
                               f"(stored {raw.get('overrides')!r}, expected {exp.overrides!r})")
        digests = raw.get("digests")
        if digests is not None and not (isinstance(digests, Mapping) and set(digests) == {"params", "code"}
                                        and all(isinstance(v, str) for v in digests.values())):
            raise RecordsError(f"{where}: experiments.{exp.name}.digests = {digests!r}: expected "
                               "{\"params\": sha256, \"code\": sha256}")
        out[exp.name] = Record(exp, raw["summary"], raw.get("quantization"), raw.get("source") or None,
                               dict(digests) if digests else None)
    return out
