"""Transfer sets that leave classes out, and the output-bias correction that recovers them.

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015), §3: a student
distilled from a teacher on a transfer set with **no 3s** makes 206 test errors on MNIST, 133 of
them on the 1,010 threes — it has never seen a 3, yet learns much about them from the soft targets;
**raising the 3's output bias by 3.5** brings it to 109 errors, 14 on threes. With a transfer set of
**only 7s and 8s** the student errs on 47.3 % of the test set, and 13.2 % after **lowering the 7
and 8 biases by 7.6**.

The transfer set here is the training split of the distilled student (the teacher always trains on
every class): ``exclude_classes`` leaves classes out, ``only_classes`` keeps just those. The
correction adds ``s`` to the logits of the classes absent from the transfer set, at evaluation only
(the trained weights are not touched). One rule covers both of the paper's: a softmax is unchanged
by adding the same constant to every logit, so lowering the kept classes' logits by ``s`` (the 7s
and 8s) ranks exactly as raising the absent ones by ``s`` does. ``s`` is either the paper's fixed
value or chosen on the validation split — the value in a grid that makes the fewest validation
errors (ties: the smallest ``|s|``) — so the test split still picks nothing.

Single-label data sets only: a multi-label image belongs to several classes, and leaving a class out
of its targets is not leaving the image out.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from kdlib.data.index import DatasetIndex
from kdlib.schema import is_float, optional, setting

# Candidate shifts for `bias_shift: val`: -20..20 in steps of 0.1 (the paper's 3.5 and 7.6 are on it).
SHIFT_GRID = tuple(round(-20.0 + 0.1 * i, 1) for i in range(401))


def is_class_list(v: Any) -> str | None:
    ok = isinstance(v, list) and all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in v) \
        and len(set(map(str, v))) == len(v)
    return None if ok else "a list of distinct class names or indices"


def is_shift(v: Any) -> str | None:
    if v is None or v == "val" or is_float(-100.0, 100.0)(v) is None:
        return None
    return "null, `val` (chosen on the validation split) or a number in [-100, 100]"


@dataclass(frozen=True, kw_only=True)
class TransferSettings:
    """``distill.transfer``: which training images the distilled student sees, and the bias correction."""

    exclude_classes: list[str | int] = setting(is_class_list, [])  # left out of the transfer set
    only_classes: list[str | int] | None = setting(optional(is_class_list), None)  # or: only these
    bias_shift: float | str | None = setting(is_shift, None)  # added to the absent classes' logits at evaluation

    def problems(self) -> list[tuple[str | None, str]]:
        found: list[tuple[str | None, str]] = []
        if self.exclude_classes and self.only_classes is not None:
            found.append((None, "expected exclude_classes or only_classes, not both"))
        if self.bias_shift is not None and not self.exclude_classes and self.only_classes is None:
            found.append(("bias_shift", "expected null: every class is in the transfer set, so no class is absent "
                                        "to shift"))
        return found

    @property
    def restricted(self) -> bool:
        return bool(self.exclude_classes) or self.only_classes is not None


def class_index(value: str | int, classes: Sequence[str], where: str) -> int:
    """The index of ``value``: a class name, or (an integer) an index into ``classes``. MNIST's classes
    are named "0".."9", so 3 and "3" are the same class there."""
    if isinstance(value, str):
        if value in classes:
            return list(classes).index(value)
    elif 0 <= value < len(classes):
        return value
    shown = ", ".join(classes[:20]) + (f" … ({len(classes)})" if len(classes) > 20 else "")
    raise ValueError(f"{where} = {value!r}: not a class of the data set; expected a name or an index in "
                     f"[0, {len(classes) - 1}] (classes: {shown})")


def kept_classes(settings: TransferSettings, classes: Sequence[str], where: str = "distill.transfer") -> list[int]:
    """The class indices of the transfer set, in order; ValueError naming the key for an unknown class, or
    for a transfer set with no class left."""
    if settings.only_classes is not None:
        kept = sorted({class_index(c, classes, f"{where}.only_classes") for c in settings.only_classes})
    else:
        excluded = {class_index(c, classes, f"{where}.exclude_classes") for c in settings.exclude_classes}
        kept = [c for c in range(len(classes)) if c not in excluded]
    if not kept:
        raise ValueError(f"{where}: the transfer set keeps no class of the data set's {len(classes)}; expected at "
                         "least one")
    return kept


def transfer_index(index: DatasetIndex, settings: TransferSettings) -> tuple[DatasetIndex, list[int]]:
    """``index`` with its training split reduced to the transfer set, and the indices of the absent
    classes. Validation and test are untouched: every class is still scored, and checkpoint selection
    sees the classes the student was never shown (as a user of the student would)."""
    if not settings.restricted:
        return index, []
    if index.meta.task == "multilabel":
        raise ValueError("distill.transfer: leaving classes out of the transfer set is for single-label data sets "
                         f"({index.meta.name!r} is multi-label); expected exclude_classes: [] and only_classes: null")
    kept = set(kept_classes(settings, index.meta.classes))
    records = [r for r in index.records if r.split != "train" or r.label in kept]
    if not any(r.split == "train" for r in records):
        raise ValueError(f"distill.transfer: no training image of data set {index.meta.name!r} is in the transfer set")
    return replace(index, records=records), [c for c in range(index.meta.num_classes) if c not in kept]


def shifted(logits: Tensor, absent: Sequence[int], shift: float) -> Tensor:
    """``logits`` with ``shift`` added to the columns of the ``absent`` classes (a copy)."""
    out = logits.clone()
    if absent:
        out[:, list(absent)] += shift
    return out


def error_counts(logits: Tensor, targets: Tensor, absent: Sequence[int]) -> dict[str, int]:
    """Misclassified images (arg max ≠ target, ties to the lower class index as ``argmax`` does), overall
    and among the images of the ``absent`` classes."""
    wrong = logits.argmax(dim=1) != targets
    of_absent = torch.isin(targets, torch.tensor(list(absent), dtype=targets.dtype)) if absent else \
        torch.zeros_like(wrong)
    return {"images": int(targets.numel()), "errors": int(wrong.sum()), "absent_images": int(of_absent.sum()),
            "absent_errors": int((wrong & of_absent).sum())}


def choose_shift(logits: Tensor, targets: Tensor, absent: Sequence[int], grid: Sequence[float] = SHIFT_GRID) -> float:
    """The shift of ``grid`` with the fewest errors on (validation) ``logits``; ties go to the smallest
    ``|shift|``, then to the lower value, so no shift is chosen where none helps."""
    best: tuple[int, float, float] | None = None
    for shift in grid:
        errors = error_counts(shifted(logits, absent, shift), targets, absent)["errors"]
        candidate = (errors, abs(shift), shift)
        if best is None or candidate < best:
            best = candidate
    assert best is not None
    return best[2]


def transfer_errors(test_logits: Tensor, test_targets: Tensor, absent: Sequence[int], bias_shift: float | str | None,
                    validation: Callable[[], Any]) -> dict[str, Any]:
    """Test errors of a student whose transfer set left the ``absent`` classes out (Hinton et al. 2015 §3),
    overall and on those classes, before and after adding ``bias_shift`` to their logits: a number (the
    paper's fixed value), ``"val"`` (the one with the fewest validation errors, from ``validation()``, a
    result with ``logits`` and ``targets``: the test split still picks nothing) or None (no correction)."""
    found: dict[str, Any] = error_counts(test_logits, test_targets, absent)
    if bias_shift is None:
        return found
    if bias_shift == "val":
        val = validation()
        shift, chosen_on = choose_shift(val.logits, val.targets, absent), "val"
    else:
        shift, chosen_on = float(bias_shift), "fixed"
    corrected = error_counts(shifted(test_logits, absent, shift), test_targets, absent)
    return {**found, "bias_shift": shift, "bias_shift_from": chosen_on,
            "corrected_errors": corrected["errors"], "corrected_absent_errors": corrected["absent_errors"]}
