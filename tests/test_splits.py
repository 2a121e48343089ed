"""Seeded stratified subsets/splits and the disjointness check."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from kdlib.data.splits import assert_disjoint, stratified_split, stratified_take

# 3 classes with 10 / 12 / 8 members, interleaved so positions do not follow classes.
LABELS = np.array([i % 3 for i in range(24)] + [0] * 2 + [1] * 4)
assert Counter(LABELS.tolist()) == {0: 10, 1: 12, 2: 8}


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_take_exact_per_class_counts() -> None:
    idx = stratified_take(LABELS, 5, rng(0))
    assert Counter(LABELS[idx].tolist()) == {0: 5, 1: 5, 2: 5}
    assert len(set(idx.tolist())) == 15  # no replacement
    assert list(idx) == sorted(idx)


def test_take_whole_smallest_class() -> None:
    idx = stratified_take(LABELS, 8, rng(0))
    assert sorted(i for i in idx if LABELS[i] == 2) == list(np.flatnonzero(LABELS == 2))


def test_take_is_deterministic_for_a_seed() -> None:
    assert np.array_equal(stratified_take(LABELS, 4, rng(7)), stratified_take(LABELS, 4, rng(7)))


def test_take_differs_across_seeds() -> None:
    assert not np.array_equal(stratified_take(LABELS, 4, rng(1)), stratified_take(LABELS, 4, rng(2)))


def test_take_respects_exclude() -> None:
    first = stratified_take(LABELS, 4, rng(0))
    second = stratified_take(LABELS, 4, rng(1), exclude=set(first.tolist()))
    assert not set(first.tolist()) & set(second.tolist())
    assert Counter(LABELS[second].tolist()) == {0: 4, 1: 4, 2: 4}


def test_take_exclude_can_exhaust_class() -> None:
    # Class 2 has 8 members; excluding 5 of them leaves 3 < 4.
    excluded = set(np.flatnonzero(LABELS == 2)[:5].tolist())
    with pytest.raises(ValueError, match=r"class 2 has 3 items available, 4 requested"):
        stratified_take(LABELS, 4, rng(0), exclude=excluded)


def test_take_too_few_names_the_class() -> None:
    with pytest.raises(ValueError) as info:
        stratified_take(LABELS, 9, rng(0))
    message = str(info.value)
    assert "class 2" in message and "8" in message and "9" in message


def test_split_fractions_per_class() -> None:
    kept, held = stratified_split(LABELS, 0.5, rng(0))
    assert Counter(LABELS[held].tolist()) == {0: 5, 1: 6, 2: 4}
    assert Counter(LABELS[kept].tolist()) == {0: 5, 1: 6, 2: 4}
    kept, held = stratified_split(LABELS, 0.25, rng(0))
    # round(2.5)=2 (banker's), round(3)=3, round(2)=2
    assert Counter(LABELS[held].tolist()) == {0: 2, 1: 3, 2: 2}


def test_split_disjoint_and_covering() -> None:
    kept, held = stratified_split(LABELS, 0.3, rng(3))
    assert not set(kept.tolist()) & set(held.tolist())
    assert sorted(kept.tolist() + held.tolist()) == list(range(len(LABELS)))


def test_split_keeps_and_holds_at_least_one_per_class() -> None:
    labels = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2])
    kept, held = stratified_split(labels, 0.01, rng(0))
    assert Counter(labels[held].tolist()) == {0: 1, 1: 1}  # class 2 (one item) is never held out
    kept, held = stratified_split(labels, 0.99, rng(0))
    assert set(labels[kept].tolist()) == {0, 1, 2}


def test_split_is_deterministic() -> None:
    a = stratified_split(LABELS, 0.3, rng(5))
    b = stratified_split(LABELS, 0.3, rng(5))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    c = stratified_split(LABELS, 0.3, rng(6))
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(LABELS, fraction, rng(0))


def test_assert_disjoint_accepts_disjoint_splits() -> None:
    assert_disjoint({"train": ["a", "b"], "val": ["c"], "test": ["d", "e"]})
    assert_disjoint({"train": ["a", "a"]})  # a repeat inside one split is not a leak


def test_assert_disjoint_names_item_and_both_splits() -> None:
    with pytest.raises(ValueError) as info:
        assert_disjoint({"train": ["a.png", "b.png"], "val": ["c.png"], "test": ["b.png"]})
    message = str(info.value)
    assert "b.png" in message and "train" in message and "test" in message
    assert "val" not in message
