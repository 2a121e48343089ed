"""Seeded, stratified subsets and splits, and the disjointness check every index must pass."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def stratified_take(
    labels: Sequence[int] | np.ndarray,
    per_class: int,
    rng: np.random.Generator,
    exclude: set[int] | None = None,
) -> np.ndarray:
    """Indices of ``per_class`` items of every class, drawn without replacement.

    Raises ``ValueError`` naming the class when it has fewer than ``per_class`` items left.
    The result is sorted so that it does not depend on dictionary or set order.
    """
    labels = np.asarray(labels)
    excluded = exclude or set()
    chosen: list[np.ndarray] = []
    for cls in np.unique(labels):
        pool = np.array([i for i in np.flatnonzero(labels == cls) if i not in excluded], dtype=np.int64)
        if len(pool) < per_class:
            raise ValueError(f"class {int(cls)} has {len(pool)} items available, {per_class} requested")
        chosen.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def stratified_split(
    labels: Sequence[int] | np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..n-1`` into (kept, held_out) with ``fraction`` of each class held out.

    Every class with at least two items keeps at least one and holds out at least one.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    held: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        if len(members) < 2:
            continue
        n_held = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        held.append(members[:n_held])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    kept_idx = np.setdiff1d(np.arange(len(labels)), held_idx)
    return kept_idx, held_idx


def assert_disjoint(splits: Mapping[str, Sequence[str]]) -> None:
    """Raise ``ValueError`` naming a shared item and both splits if any item is in two splits."""
    owner: dict[str, str] = {}
    for split, items in splits.items():
        for item in items:
            if item in owner and owner[item] != split:
                raise ValueError(f"{item!r} is in both the {owner[item]!r} and {split!r} splits")
            owner[item] = split
