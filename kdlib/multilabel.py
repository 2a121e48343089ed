"""Multi-label metrics: per-class average precision, mAP and thresholded CP/CR/CF1/OP/OR/OF1.

Inputs are scores ``(N, C)`` (logits or probabilities; only their order matters for AP) and
multi-hot targets ``(N, C)`` with values in {0, 1}, as torch tensors or numpy arrays. Results
are plain Python floats (lists of floats per class).

An optional boolean ``ignore`` mask ``(N, C)`` marks (image, class) pairs that count as neither
true nor false positives for that class: the VOC "difficult" convention (Everingham et al.,
"The PASCAL Visual Object Classes (VOC) Challenge", IJCV 2010), where an image whose only
instances of a class are difficult is left out of that class's ranking. Ignored entries are
simply removed from the class's column before anything is counted.

**Average precision.** For one class, sort the kept images by decreasing score and let
:math:`P_k`, :math:`R_k` be precision and recall after the ``k``-th threshold
(:math:`R_0 = 0`). Images with *tied* scores form a single threshold (they are counted
together), so the result does not depend on the input order; without ties every image is its
own threshold and the definitions below are exactly the devkit's / sklearn's.

* ``mode="voc"``: all-point interpolated AP of the VOC 2010+ devkit (``VOCevalcls`` /
  ``VOCap``). Precision is made monotonically decreasing from the right,
  :math:`\\hat P_k = \\max_{j \\ge k} P_j`, and AP is the area under the stepped curve,
  :math:`\\mathrm{AP} = \\sum_k (R_k - R_{k-1})\\,\\hat P_k`. (VOC2007's original 11-point
  AP is not implemented.)
* ``mode="coco"``: non-interpolated AP, :math:`\\mathrm{AP} = \\sum_k (R_k - R_{k-1})\\,P_k`;
  without ties this is the mean, over positives, of the precision at each positive's rank
  (sklearn's ``average_precision_score``, which also groups tied scores this way). The name
  follows the multi-label COCO literature (e.g. ML-GCN), not the COCO detection metric.

A class with no (non-ignored) positive has undefined AP: it is ``NaN`` and is **excluded** from
the mean AP, which averages only over classes with at least one positive.

**Thresholded metrics** (the multi-label convention of e.g. ML-GCN, Chen et al., "Multi-Label
Image Recognition with Graph Convolutional Networks", CVPR 2019). With prediction
:math:`\\hat y = [p \\ge \\tau]`, per class :math:`c`: :math:`N^c_c` correct positive
predictions, :math:`N^p_c` positive predictions, :math:`N^g_c` ground-truth positives.

.. math::

    CP = \\frac1C\\sum_c \\frac{N^c_c}{N^p_c},\\quad
    CR = \\frac1C\\sum_c \\frac{N^c_c}{N^g_c},\\quad
    CF1 = \\frac{2\\,CP\\,CR}{CP+CR}

    OP = \\frac{\\sum_c N^c_c}{\\sum_c N^p_c},\\quad
    OR = \\frac{\\sum_c N^c_c}{\\sum_c N^g_c},\\quad
    OF1 = \\frac{2\\,OP\\,OR}{OP+OR}

Every ratio whose denominator is 0 is 0 (sklearn's ``zero_division=0``); in particular CP and CR
average over **all** C classes, a class with no prediction contributing precision 0 and a class
with no positive contributing recall 0. All metrics are reported in percent (×100).

**Conventions** (``convention``). The rules above (``"kdlib"``) differ in two places from the code
that LSHFM (Wang et al., "Distilling Knowledge by Mimicking Features", TPAMI 2021) and ML-GCN
computed their published numbers with; ``"lshfm"`` follows that code in both, so that its numbers
can be set beside the papers'. Sources: DoctorKey/LSHFM.multiclassification at d7b58ae
(``src/eval.py`` and ``src/dataset/VOC.py`` unchanged since d93874d, its first commit) and
Megvii-Nanjing/ML_GCN at 5517d6f (``util.py``).

* *A class never predicted positive* (:math:`N^p_c = 0`). Their code sets :math:`N^p_c := 1`
  before any division: LSHFM ``src/eval.py`` ``coco_metric``, line 123 ``Np[Np == 0] = 1``, then
  line 124 ``OP = np.sum(Nc) / np.sum(Np)`` and line 128 ``CP = np.sum(Nc / Np) / n_class``;
  ML-GCN ``util.py`` ``AveragePrecisionMeter.evaluation``, the same three statements at lines
  281, 282 and 286. So with ``"lshfm"``

  .. math:: OP = \frac{\sum_c N^c_c}{\sum_c \max(N^p_c, 1)}
            = \frac{\sum_c N^c_c}{\sum_c N^p_c + \#\{c : N^p_c = 0\}},

  every never-predicted class adding one phantom wrong prediction to OP's denominator (and so
  lowering OP and OF1), where ``"kdlib"`` divides by the predictions actually made. CP is the same
  in both (such a class has :math:`N^c_c = 0`: precision :math:`0/1 = 0`, as kdlib's
  :math:`0/0 := 0`).
* *A class with no (non-ignored) positive* in mAP. LSHFM's ``average_precision`` (``src/eval.py``
  lines 87-91) divides the summed precisions by ``total + epsilon`` with ``total`` = 0 positives,
  an AP of 0, and ``mAP`` (lines 103-111) returns ``100 * ap.mean()`` over all
  ``preds.shape[1]`` classes. So with ``"lshfm"`` such a class's AP is 0 and mAP is the mean over
  **all** C classes, :math:`\mathrm{mAP} = \frac{1}{C}\sum_{c:\,N^g_c>0}\mathrm{AP}_c`, where
  ``"kdlib"`` leaves the class out (NaN). On a fixed split this scales mAP by the constant
  (classes with positives)/C, so the epoch that validation picks is the same in both.

Everything else is as in kdlib's rules, also where their code has no number to agree with:
where it divides 0 by 0 (CR of a class with no positive, ``src/eval.py`` line 129; OR with no
positive at all, line 125; an F1 with P + R = 0, lines 126 and 130; ``VOC2012AP`` of a class
with no positive, ``src/dataset/VOC.py`` line 127) it gives NaN with a RuntimeWarning, and
kdlib's 0 is kept (the mAP rule gives 0 in both AP modes). Left as they are: tied scores (their
``argsort()[::-1]`` orders ties by position; here a tie is one threshold), their ``1e-8`` in
LSHFM's denominators (a relative difference of order 1e-8), and ML-GCN's VOC thresholded metrics,
which count a prediction on a difficult-only image as a false positive (``overall()`` maps -1 to
0 and difficult is already 0) where ``ignore`` leaves it out; LSHFM reports only mAP on VOC
(``validate_voc`` calls no ``coco_metric``).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

MODES = ("voc", "coco")
CONVENTIONS = ("kdlib", "lshfm")  # see the module docstring


def _as_float_array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.double() if x.dtype != torch.float64 else x
        return x.numpy()
    return np.asarray(x, dtype=np.float64)


def _as_binary(x: Any, name: str) -> np.ndarray:
    """A {0, 1}- or bool-valued array as ``bool``; anything else is an error."""
    array = _as_float_array(x)
    if not np.isin(array, (0.0, 1.0)).all():
        raise ValueError(f"{name} must contain only 0/1 (or booleans)")
    return array.astype(bool)


def _check_inputs(
    scores: Any, targets: Any, ignore: Any, ndim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scores_ = _as_float_array(scores)
    targets_ = _as_binary(targets, "targets")
    if scores_.ndim != ndim:
        raise ValueError(f"scores must be {ndim}-D, got shape {scores_.shape}")
    if targets_.shape != scores_.shape:
        raise ValueError(f"targets shape {targets_.shape} != scores shape {scores_.shape}")
    if np.isnan(scores_).any():
        raise ValueError("scores contain NaN")
    if ignore is None:
        ignore_ = np.zeros(scores_.shape, dtype=bool)
    else:
        ignore_ = _as_binary(ignore, "ignore")
        if ignore_.shape != scores_.shape:
            raise ValueError(f"ignore shape {ignore_.shape} != scores shape {scores_.shape}")
    return scores_, targets_, ignore_


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def _ap(scores: np.ndarray, positive: np.ndarray, mode: str) -> float:
    """AP (in [0, 1]) of 1-D ``scores`` against boolean ``positive``; NaN without positives."""
    n_pos = int(positive.sum())
    if n_pos == 0:
        return math.nan
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    tp = np.cumsum(positive[order], dtype=np.float64)
    seen = np.arange(1, len(scores) + 1, dtype=np.float64)
    # One threshold per distinct score: keep the last index of every run of tied scores.
    last = np.r_[np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), len(scores) - 1]
    tp, seen = tp[last], seen[last]
    precision = tp / seen
    recall = tp / n_pos
    if mode == "voc":
        precision = np.maximum.accumulate(precision[::-1])[::-1]
    d_recall = np.diff(recall, prepend=0.0)
    return float(np.sum(d_recall * precision))


def average_precision(
    scores_c: Any, targets_c: Any, ignore_c: Any = None, mode: str = "voc"
) -> float:
    """Average precision of one class, as a fraction in [0, 1] (see the module docstring).

    Args:
        scores_c: ``(N,)`` scores of the class (higher = more confident).
        targets_c: ``(N,)`` 0/1 ground truth.
        ignore_c: optional ``(N,)`` boolean mask of entries to leave out (VOC "difficult").
        mode: ``"voc"`` (all-point interpolated, VOC 2010+ devkit) or ``"coco"``
            (non-interpolated, as sklearn's ``average_precision_score``).

    Returns:
        The AP, or ``NaN`` when the class has no non-ignored positive.
    """
    _check_mode(mode)
    scores, targets, ignore = _check_inputs(scores_c, targets_c, ignore_c, ndim=1)
    keep = ~ignore
    return _ap(scores[keep], targets[keep], mode)


def mean_average_precision(
    scores: Any, targets: Any, ignore: Any = None, mode: str = "voc", convention: str = "kdlib"
) -> tuple[list[float], float]:
    """Per-class AP and their mean, both in percent.

    Args:
        scores: ``(N, C)`` scores.
        targets: ``(N, C)`` multi-hot 0/1 targets.
        ignore: optional ``(N, C)`` boolean mask (VOC "difficult"): neither TP nor FP.
        mode: ``"voc"`` or ``"coco"`` (see :func:`average_precision`).
        convention: ``"kdlib"`` or ``"lshfm"``: what a class with no (non-ignored) positive
            counts as (module docstring, "Conventions").

    Returns:
        ``(per_class, map)``: ``per_class[c]`` = 100·AP of class ``c``. A class with no positive
        is ``NaN`` and left out of ``map``, the mean over classes that have positives (``NaN`` if
        no class has one), with ``"kdlib"``; with ``"lshfm"`` it is 0 and ``map`` is the mean of
        all C entries (LSHFM ``src/eval.py`` ``mAP``).
    """
    _check_mode(mode)
    _check_convention(convention)
    scores_, targets_, ignore_ = _check_inputs(scores, targets, ignore, ndim=2)
    per_class = []
    for c in range(scores_.shape[1]):
        keep = ~ignore_[:, c]
        per_class.append(100.0 * _ap(scores_[keep, c], targets_[keep, c], mode))
    if convention == "lshfm":
        per_class = [0.0 if math.isnan(ap) else ap for ap in per_class]
    defined = [ap for ap in per_class if not math.isnan(ap)]
    mean = sum(defined) / len(defined) if defined else math.nan
    return per_class, float(mean)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


def _f1(precision: float, recall: float) -> float:
    return _ratio(2.0 * precision * recall, precision + recall)


def threshold_metrics(
    probs: Any, targets: Any, threshold: float = 0.5, ignore: Any = None, convention: str = "kdlib"
) -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1 (in percent) of the predictions ``probs >= threshold``.

    Args:
        probs: ``(N, C)`` probabilities (pass logits with ``threshold=0`` for the same result
            as sigmoid probabilities at 0.5).
        targets: ``(N, C)`` multi-hot 0/1 targets.
        threshold: a score at or above it is a positive prediction.
        ignore: optional ``(N, C)`` boolean mask of pairs counted nowhere.
        convention: ``"kdlib"``, or ``"lshfm"``: :math:`N^p_c := 1` for a class never predicted,
            so that each such class adds one to OP's denominator (LSHFM ``coco_metric`` and
            ML-GCN ``evaluation``; module docstring, "Conventions").

    Returns:
        ``{"CP", "CR", "CF1", "OP", "OR", "OF1"}`` as floats; formulas and the zero-division
        convention (0) are in the module docstring.
    """
    _check_convention(convention)
    probs_, targets_, ignore_ = _check_inputs(probs, targets, ignore, ndim=2)
    keep = ~ignore_
    predicted = (probs_ >= threshold) & keep
    truth = targets_ & keep
    n_correct = (predicted & truth).sum(axis=0).astype(np.float64)
    n_predicted = predicted.sum(axis=0).astype(np.float64)
    if convention == "lshfm":  # LSHFM src/eval.py line 123, ML-GCN util.py line 281: Np[Np == 0] = 1
        n_predicted = np.maximum(n_predicted, 1.0)
    n_truth = truth.sum(axis=0).astype(np.float64)
    num_classes = probs_.shape[1]

    cp = sum(_ratio(a, b) for a, b in zip(n_correct, n_predicted)) / max(num_classes, 1)
    cr = sum(_ratio(a, b) for a, b in zip(n_correct, n_truth)) / max(num_classes, 1)
    op = _ratio(n_correct.sum(), n_predicted.sum())
    or_ = _ratio(n_correct.sum(), n_truth.sum())
    return {
        "CP": 100.0 * float(cp),
        "CR": 100.0 * float(cr),
        "CF1": 100.0 * float(_f1(cp, cr)),
        "OP": 100.0 * float(op),
        "OR": 100.0 * float(or_),
        "OF1": 100.0 * float(_f1(op, or_)),
    }


__all__ = ["CONVENTIONS", "MODES", "average_precision", "mean_average_precision", "threshold_metrics"]
