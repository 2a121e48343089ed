"""Multi-label metrics (AP/mAP in VOC and COCO modes, CP/CR/CF1/OP/OR/OF1) and the multi-label
objectives ``bce`` and ``sigmoid_kd``, on hand-checked examples.

AP worked example (one class, 6 images, already in decreasing score order):

    score   0.9  0.8  0.7  0.6  0.5  0.4
    target   1    0    0    1    1    0          3 positives
    P@k     1/1  1/2  1/3  2/4  3/5  3/6
    R@k     1/3  1/3  1/3  2/3  3/3  3/3

* COCO (non-interpolated) = mean precision at the positives' ranks = (1 + 2/4 + 3/5)/3 = 0.7.
* VOC (all-point): the monotone envelope at recall 2/3 is max(2/4, 3/5, 3/6) = 3/5, so
  AP = 1/3·1 + 1/3·3/5 + 1/3·3/5 = 2.2/3 = 0.733333…  The two modes differ here.
* Ignoring the image at 0.8 (a "difficult" false positive) leaves T F T T F:
  P at the positives 1, 2/3, 3/4 → COCO (1 + 2/3 + 3/4)/3 = 29/36 = 0.805556;
  VOC envelope at recall 2/3 is max(2/3, 3/4) = 3/4 → (1 + 3/4 + 3/4)/3 = 2.5/3 = 0.833333.
* Ignoring the positive at 0.6 instead leaves T F F T F with 2 positives:
  COCO (1 + 2/4)/2 = 0.75; VOC: envelope 2/4 at recall 1 → (1 + 1/2)/2 = 0.75.

The ``lshfm`` convention (kdlib.multilabel, "Conventions") is checked twice: on hand-computed
cases, and against numpy re-implementations of LSHFM's and ML-GCN's own evaluation functions
written below (``lshfm_*``, ``mlgcn_evaluation``; each cites the file and lines it follows), so
that the check does not rest on kdlib's code.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdlib.losses import LossOutput, StudentOutput, TeacherOutput, build_objective
from kdlib.losses.bce import BinaryCrossEntropy, bce_loss
from kdlib.losses.sigmoid_kd import SigmoidKDLoss, sigmoid_kd_loss, sigmoid_kl
from kdlib.multilabel import CONVENTIONS, average_precision, mean_average_precision, threshold_metrics

# ---------------------------------------------------------------------------------------------
# Average precision
# ---------------------------------------------------------------------------------------------

SCORES_1 = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
TARGETS_1 = [1, 0, 0, 1, 1, 0]


def test_voc_and_coco_ap_differ_on_the_worked_example() -> None:
    assert average_precision(SCORES_1, TARGETS_1, mode="coco") == pytest.approx(0.7)
    assert average_precision(SCORES_1, TARGETS_1, mode="voc") == pytest.approx(2.2 / 3)


def test_voc_is_the_default_mode_and_unknown_modes_raise() -> None:
    assert average_precision(SCORES_1, TARGETS_1) == pytest.approx(2.2 / 3)
    with pytest.raises(ValueError, match="mode"):
        average_precision(SCORES_1, TARGETS_1, mode="11point")


def test_ap_is_invariant_to_input_order() -> None:
    perm = [3, 0, 5, 1, 4, 2]
    scores = [SCORES_1[i] for i in perm]
    targets = [TARGETS_1[i] for i in perm]
    assert average_precision(scores, targets, mode="coco") == pytest.approx(0.7)
    assert average_precision(scores, targets, mode="voc") == pytest.approx(2.2 / 3)


def test_ignore_mask_removes_a_difficult_false_positive() -> None:
    ignore = [False, True, False, False, False, False]
    assert average_precision(SCORES_1, TARGETS_1, ignore, mode="coco") == pytest.approx(29 / 36)
    assert average_precision(SCORES_1, TARGETS_1, ignore, mode="voc") == pytest.approx(2.5 / 3)


def test_ignore_mask_removes_a_difficult_positive() -> None:
    ignore = [False, False, False, True, False, False]
    assert average_precision(SCORES_1, TARGETS_1, ignore, mode="coco") == pytest.approx(0.75)
    assert average_precision(SCORES_1, TARGETS_1, ignore, mode="voc") == pytest.approx(0.75)


def test_perfect_ranking_gives_one() -> None:
    for mode in ("voc", "coco"):
        ap = average_precision([0.1, 0.9, 0.8, 0.2], [0, 1, 1, 0], mode=mode)
        assert ap == pytest.approx(1.0)


def test_class_without_positives_is_nan() -> None:
    for mode in ("voc", "coco"):
        assert math.isnan(average_precision([0.3, 0.2, 0.1], [0, 0, 0], mode=mode))
    # A class whose only positive is ignored (difficult) has no positive either.
    assert math.isnan(average_precision([0.3, 0.2], [1, 0], [True, False]))


def test_tied_scores_form_one_threshold() -> None:
    # Two images tie at 0.5, one positive: a single threshold with P = 1/2, R = 1, whatever the
    # input order (the devkit's stable sort would give 1 or 1/2 depending on it).
    for scores, targets in (([0.5, 0.5], [1, 0]), ([0.5, 0.5], [0, 1])):
        for mode in ("voc", "coco"):
            assert average_precision(scores, targets, mode=mode) == pytest.approx(0.5)
    # T(0.9), then {T, F} tied at 0.5: thresholds (P=1, R=1/2), (P=2/3, R=1) → 1/2 + 1/3.
    assert average_precision([0.5, 0.9, 0.5], [0, 1, 1], mode="coco") == pytest.approx(5 / 6)


def test_accepts_tensors_and_arrays() -> None:
    from_tensors = average_precision(torch.tensor(SCORES_1), torch.tensor(TARGETS_1), mode="coco")
    from_arrays = average_precision(np.array(SCORES_1), np.array(TARGETS_1, bool), mode="coco")
    assert from_tensors == pytest.approx(0.7) and from_arrays == pytest.approx(0.7)
    assert isinstance(average_precision(torch.tensor(SCORES_1), torch.tensor(TARGETS_1)), float)


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="0/1"):
        average_precision([0.1, 0.2], [1, -1])
    with pytest.raises(ValueError, match="shape"):
        average_precision([0.1, 0.2], [1, 0, 0])
    with pytest.raises(ValueError, match="NaN"):
        average_precision([0.1, float("nan")], [1, 0])


# ---------------------------------------------------------------------------------------------
# Mean average precision: class 0 = the worked example, class 1 perfectly ranked, class 2 has
# no positive (NaN, excluded from the mean).
#   VOC  mAP = (73.333… + 100)/2 = 86.666…     COCO mAP = (70 + 100)/2 = 85
# ---------------------------------------------------------------------------------------------

SCORES_3 = torch.tensor(
    [
        [0.9, 0.1, 0.5],
        [0.8, 0.2, 0.4],
        [0.7, 0.9, 0.3],
        [0.6, 0.8, 0.2],
        [0.5, 0.3, 0.1],
        [0.4, 0.7, 0.0],
    ]
)
TARGETS_3 = torch.tensor(
    [
        [1, 0, 0],
        [0, 0, 0],
        [0, 1, 0],
        [1, 1, 0],
        [1, 0, 0],
        [0, 0, 0],
    ]
)


def test_map_hand_example_in_percent() -> None:
    per_class, m = mean_average_precision(SCORES_3, TARGETS_3, mode="voc")
    assert per_class[:2] == pytest.approx([220 / 3, 100.0])
    assert math.isnan(per_class[2])
    assert m == pytest.approx((220 / 3 + 100) / 2)  # 86.666…

    per_class, m = mean_average_precision(SCORES_3, TARGETS_3, mode="coco")
    assert per_class[:2] == pytest.approx([70.0, 100.0])
    assert math.isnan(per_class[2])
    assert m == pytest.approx(85.0)
    assert isinstance(m, float) and all(isinstance(ap, float) for ap in per_class)


def test_map_ignore_mask_changes_the_result() -> None:
    ignore = torch.zeros_like(TARGETS_3, dtype=torch.bool)
    ignore[1, 0] = True  # the "difficult" false positive of class 0 (see the module docstring)
    per_class, m = mean_average_precision(SCORES_3, TARGETS_3, ignore, mode="voc")
    assert per_class[0] == pytest.approx(250 / 3)
    assert m == pytest.approx((250 / 3 + 100) / 2)
    per_class, m = mean_average_precision(SCORES_3, TARGETS_3, ignore, mode="coco")
    assert per_class[0] == pytest.approx(2900 / 36)


def test_perfect_ranking_gives_100() -> None:
    scores = TARGETS_3.float() * 2 - 1 + 0.01 * torch.arange(6).view(6, 1)
    for mode in ("voc", "coco"):
        per_class, m = mean_average_precision(scores, TARGETS_3, mode=mode)
        assert per_class[:2] == pytest.approx([100.0, 100.0]) and m == pytest.approx(100.0)


def test_map_without_any_positive_is_nan() -> None:
    per_class, m = mean_average_precision(np.zeros((3, 2)), np.zeros((3, 2)))
    assert all(math.isnan(ap) for ap in per_class) and math.isnan(m)


def brute_force_ap(scores: np.ndarray, targets: np.ndarray, mode: str) -> float:
    """AP straight from the definitions, one positive at a time (O(N²)).

    coco: mean over positives i of precision at threshold s_i (all images with s >= s_i).
    voc: the same, with precision replaced by the best precision at any threshold whose recall
    is at least the recall at s_i.
    """
    def pr(threshold: float) -> tuple[float, float]:
        chosen = scores >= threshold
        tp = float((chosen & targets).sum())
        return tp / chosen.sum(), tp / targets.sum()

    points = [pr(s) for s in scores]  # one (P, R) per image's threshold
    total = 0.0
    for i in np.flatnonzero(targets):
        p_i, r_i = pr(scores[i])
        if mode == "voc":
            p_i = max(p for p, r in points if r >= r_i)
        total += p_i
    return total / targets.sum()


@pytest.mark.parametrize("mode", ["coco", "voc"])
@pytest.mark.parametrize("with_ties", [False, True])
def test_agrees_with_brute_force_on_random_data(mode: str, with_ties: bool) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        scores = rng.normal(size=n)
        if with_ties:
            scores = np.round(scores, 0)
        targets = rng.random(n) < 0.3
        if not targets.any():
            targets[int(rng.integers(n))] = True
        expected = brute_force_ap(scores, targets, mode)
        assert average_precision(scores, targets, mode=mode) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Thresholded metrics. Predictions (p >= 0.5) vs targets, 4 images × 3 classes:
#   class 0: predicted {0, 2}, true {0, 1}      Nc=1 Np=2 Ng=2 → P=1/2  R=1/2
#   class 1: predicted {1, 2, 3}, true {1, 2}   Nc=2 Np=3 Ng=2 → P=2/3  R=1
#   class 2: predicted {}, true {0, 3}          Nc=0 Np=0 Ng=2 → P=0 (0/0 := 0)  R=0
#   CP = (1/2 + 2/3 + 0)/3 = 7/18 = 38.888…%   CR = (1/2 + 1 + 0)/3 = 50%
#   CF1 = 2·(7/18)·(1/2)/(7/18 + 1/2) = (7/18)/(16/18) = 7/16 = 43.75%
#   OP = 3/5 = 60%   OR = 3/6 = 50%   OF1 = 2·0.6·0.5/1.1 = 6/11 = 54.5454…%
# ---------------------------------------------------------------------------------------------

PROBS_T = torch.tensor(
    [
        [0.9, 0.2, 0.4],
        [0.4, 0.7, 0.1],
        [0.8, 0.6, 0.3],
        [0.3, 0.55, 0.2],
    ]
)
TARGETS_T = torch.tensor(
    [
        [1, 0, 1],
        [1, 1, 0],
        [0, 1, 0],
        [0, 0, 1],
    ]
)


def test_threshold_metrics_hand_example() -> None:
    metrics = threshold_metrics(PROBS_T, TARGETS_T)
    expected = {"CP": 700 / 18, "CR": 50.0, "CF1": 43.75, "OP": 60.0, "OR": 50.0, "OF1": 600 / 11}
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
        assert isinstance(metrics[key], float)


def test_threshold_is_inclusive_and_logits_work_with_threshold_zero() -> None:
    # p = 0.5 exactly is a positive prediction.
    assert threshold_metrics([[0.5]], [[1]])["OP"] == 100.0
    logits = torch.logit(PROBS_T.double())
    assert threshold_metrics(logits, TARGETS_T, threshold=0.0) == pytest.approx(
        threshold_metrics(PROBS_T, TARGETS_T)
    )


def test_threshold_metrics_ignore_mask() -> None:
    # Ignoring (image 3, class 1), the false positive of class 1: P1 = 2/2 = 1, so
    # CP = (1/2 + 1 + 0)/3 = 50 %, OP = 3/4 = 75 %; recalls are unchanged.
    ignore = torch.zeros_like(TARGETS_T, dtype=torch.bool)
    ignore[3, 1] = True
    metrics = threshold_metrics(PROBS_T, TARGETS_T, ignore=ignore)
    assert metrics["CP"] == pytest.approx(50.0)
    assert metrics["OP"] == pytest.approx(75.0)
    assert metrics["CR"] == pytest.approx(50.0)
    assert metrics["OR"] == pytest.approx(50.0)


def test_threshold_metrics_zero_divisions_are_zero() -> None:
    metrics = threshold_metrics(np.zeros((3, 2)), np.zeros((3, 2)))
    assert metrics == {"CP": 0.0, "CR": 0.0, "CF1": 0.0, "OP": 0.0, "OR": 0.0, "OF1": 0.0}
    perfect = threshold_metrics(TARGETS_T.float(), TARGETS_T)
    assert all(v == 100.0 for v in perfect.values())


# ---------------------------------------------------------------------------------------------
# The "lshfm" convention: the papers' evaluation code, re-implemented here in numpy from
#   DoctorKey/LSHFM.multiclassification @ d7b58ae: src/eval.py (average_precision lines 77-93,
#       mAP 96-111, coco_metric 114-133), src/dataset/VOC.py (VOCap 104-115, VOC2012AP 118-132);
#   Megvii-Nanjing/ML_GCN @ 5517d6f: util.py (AveragePrecisionMeter.evaluation lines 271-289).
# Each step below is theirs, in the same order and with the same constants (the 1e-8s, the
# reversed argsort, Np[Np == 0] = 1); only the code is ours. Their NaN-producing 0/0 cases are
# avoided (every class used with them has a positive, except where the test says otherwise).
# ---------------------------------------------------------------------------------------------


def lshfm_average_precision(output: np.ndarray, target: np.ndarray) -> float:
    """src/eval.py lines 77-93: precision at every positive's rank, summed, / (positives + 1e-8)."""
    order = np.argsort(output)[::-1]
    ranks = np.cumsum(np.ones(len(output)))
    hit = target[order] == 1
    hits_so_far = np.cumsum(hit).astype(np.float64)
    positives = hits_so_far[-1]
    hits_so_far[~hit] = 0
    return float(np.sum(hits_so_far / ranks) / (positives + 1e-8))


def lshfm_map(targs: np.ndarray, preds: np.ndarray) -> float:
    """src/eval.py lines 96-111: ``100 * mean`` of the per-class AP over **all** classes."""
    ap = np.array([lshfm_average_precision(preds[:, k], targs[:, k]) for k in range(preds.shape[1])])
    return float(100 * ap.mean())


def lshfm_voc2012_ap(predict: np.ndarray, gt: np.ndarray) -> float:
    """src/dataset/VOC.py lines 104-132 (VOC2012AP + VOCap); ``gt``: 1 positive, -1 negative,
    0 difficult (neither a true nor a false positive)."""
    order = np.argsort(predict)[::-1]
    tp = np.cumsum(gt[order] > 0)
    fp = np.cumsum(gt[order] < 0)
    rec = tp / (gt > 0).sum()
    prec = tp / (fp + tp + 1e-8)
    n = len(rec)
    mrec, mpre = np.zeros(n + 2), np.zeros(n + 2)
    mrec[-1] = 1
    for i in range(n, 0, -1):
        mpre[i] = max(prec[i - 1], mpre[i + 1])
        mrec[i] = rec[i - 1]
    mpre[0] = max(0, mpre[1])
    steps = np.where(mrec[1:] != mrec[:-1])[0] + 1
    return float(((mrec[steps] - mrec[steps - 1]) * mpre[steps]).sum())


def lshfm_coco_metric(scores_: np.ndarray, targets_: np.ndarray, thre: float = 0.5) -> dict[str, float]:
    """src/eval.py lines 114-133, in percent."""
    n_class = scores_.shape[1]
    ng = np.array([np.sum(targets_[:, k] == 1) for k in range(n_class)], dtype=np.float64)
    np_ = np.array([np.sum(scores_[:, k] >= thre) for k in range(n_class)], dtype=np.float64)
    nc = np.array([np.sum(targets_[:, k] * (scores_[:, k] >= thre)) for k in range(n_class)], dtype=np.float64)
    np_[np_ == 0] = 1  # line 123
    op, or_ = np.sum(nc) / np.sum(np_), np.sum(nc) / np.sum(ng)
    cp, cr = np.sum(nc / np_) / n_class, np.sum(nc / ng) / n_class
    return {"OP": 100 * op, "OR": 100 * or_, "OF1": 100 * 2 * op * or_ / (op + or_),
            "CP": 100 * cp, "CR": 100 * cr, "CF1": 100 * 2 * cp * cr / (cp + cr)}


def mlgcn_evaluation(scores_: np.ndarray, targets_: np.ndarray) -> dict[str, float]:
    """util.py lines 271-289, on raw outputs (a prediction is ``score >= 0``: a logit), in percent
    (the function returns fractions; engine.py prints them as they are)."""
    n_class = scores_.shape[1]
    targets_ = np.where(targets_ == -1, 0, targets_)
    ng = np.array([np.sum(targets_[:, k] == 1) for k in range(n_class)], dtype=np.float64)
    np_ = np.array([np.sum(scores_[:, k] >= 0) for k in range(n_class)], dtype=np.float64)
    nc = np.array([np.sum(targets_[:, k] * (scores_[:, k] >= 0)) for k in range(n_class)], dtype=np.float64)
    np_[np_ == 0] = 1  # line 281
    op, or_ = np.sum(nc) / np.sum(np_), np.sum(nc) / np.sum(ng)
    cp, cr = np.sum(nc / np_) / n_class, np.sum(nc / ng) / n_class
    return {"OP": 100 * op, "OR": 100 * or_, "OF1": 100 * 2 * op * or_ / (op + or_),
            "CP": 100 * cp, "CR": 100 * cr, "CF1": 100 * 2 * cp * cr / (cp + cr)}


def test_lshfm_threshold_metrics_hand_example() -> None:
    """PROBS_T / TARGETS_T above: class 2 is never predicted, so LSHFM's Np = [2, 3, 1]:
    OP = 3/(2+3+1) = 50 % (kdlib: 3/5 = 60 %), OF1 = 2·0.5·0.5/1.0 = 50 % (kdlib 6/11);
    CP = (1/2 + 2/3 + 0/1)/3 = 7/18 as kdlib's; CR, CF1, OR unchanged."""
    metrics = threshold_metrics(PROBS_T, TARGETS_T, convention="lshfm")
    expected = {"CP": 700 / 18, "CR": 50.0, "CF1": 43.75, "OP": 50.0, "OR": 50.0, "OF1": 50.0}
    assert metrics == pytest.approx(expected)
    assert threshold_metrics(PROBS_T, TARGETS_T)["OP"] == pytest.approx(60.0)  # kdlib, for contrast
    assert lshfm_coco_metric(PROBS_T.numpy(), TARGETS_T.numpy()) == pytest.approx(expected)
    assert mlgcn_evaluation(torch.logit(PROBS_T.double()).numpy(), TARGETS_T.numpy()) == pytest.approx(expected)


def test_lshfm_never_predicted_classes_each_add_one_to_ops_denominator() -> None:
    """3 images × 4 classes, predictions only in class 0: {0, 1} predicted, {0} true (Nc=1,
    Np=2); classes 1-3 never predicted, each with one positive. kdlib OP = 1/2; LSHFM
    OP = 1/(2+1+1+1) = 1/5. OR = 1/4 in both; CP = (1/2)/4 = 12.5 % in both."""
    probs = np.array([[0.9, 0.1, 0.2, 0.3], [0.8, 0.4, 0.1, 0.2], [0.1, 0.3, 0.4, 0.1]])
    targets = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    lshfm = threshold_metrics(probs, targets, convention="lshfm")
    kdlib = threshold_metrics(probs, targets, convention="kdlib")
    assert lshfm["OP"] == pytest.approx(20.0) and kdlib["OP"] == pytest.approx(50.0)
    assert lshfm["OF1"] == pytest.approx(2 * 0.2 * 0.25 / 0.45 * 100)
    assert lshfm["OR"] == kdlib["OR"] == pytest.approx(25.0)
    assert lshfm["CP"] == kdlib["CP"] == pytest.approx(12.5)
    assert lshfm == pytest.approx(lshfm_coco_metric(probs, targets))


def test_conventions_agree_when_every_class_is_predicted_and_has_positives() -> None:
    probs = PROBS_T.clone()
    probs[0, 2] = 0.6  # class 2 now predicted once, correctly: nothing left for the rules to change
    assert threshold_metrics(probs, TARGETS_T, convention="lshfm") == threshold_metrics(probs, TARGETS_T)
    for mode in ("voc", "coco"):
        scores = SCORES_3[:, :2]
        targets = TARGETS_3[:, :2]
        assert mean_average_precision(scores, targets, mode=mode, convention="lshfm") == \
            mean_average_precision(scores, targets, mode=mode)


def test_lshfm_map_counts_a_class_without_positives_as_zero() -> None:
    """SCORES_3 / TARGETS_3: class 2 has no positive. LSHFM: AP 0, mean over all 3 classes:
    COCO (70 + 100 + 0)/3 = 56.666… (kdlib 85), VOC (220/3 + 100 + 0)/3 = 520/9 = 57.777… (kdlib 86.666…)."""
    per_class, m = mean_average_precision(SCORES_3, TARGETS_3, mode="coco", convention="lshfm")
    assert per_class == pytest.approx([70.0, 100.0, 0.0]) and m == pytest.approx(170 / 3)
    assert lshfm_map(TARGETS_3.numpy(), SCORES_3.numpy()) == pytest.approx(170 / 3)
    per_class, m = mean_average_precision(SCORES_3, TARGETS_3, mode="voc", convention="lshfm")
    assert per_class == pytest.approx([220 / 3, 100.0, 0.0]) and m == pytest.approx(520 / 9)
    # LSHFM's own VOC AP (VOC2012AP) of the two classes with positives; its AP of class 2 is 0/0
    gt = np.where(TARGETS_3.numpy() == 1, 1, -1)
    assert [100 * lshfm_voc2012_ap(SCORES_3.numpy()[:, k], gt[:, k]) for k in range(2)] == \
        pytest.approx(per_class[:2])


def test_lshfm_map_of_a_class_whose_only_positive_is_ignored_is_zero() -> None:
    """Class 1's one positive is difficult (ignored): no positive left, so AP 0 under lshfm, NaN
    (and out of the mean) under kdlib. Class 0 = the worked example's ignore case, VOC 250/3."""
    scores = np.array([SCORES_1, [0.1, 0.9, 0.2, 0.3, 0.4, 0.5]]).T
    targets = np.array([TARGETS_1, [0, 1, 0, 0, 0, 0]]).T
    ignore = np.zeros_like(targets, dtype=bool)
    ignore[1, :] = True  # image 1: class 0's difficult false positive, class 1's only positive
    per_class, m = mean_average_precision(scores, targets, ignore, mode="voc", convention="lshfm")
    assert per_class == pytest.approx([250 / 3, 0.0]) and m == pytest.approx(125 / 3)
    per_class, m = mean_average_precision(scores, targets, ignore, mode="voc")
    assert math.isnan(per_class[1]) and m == pytest.approx(250 / 3)
    gt = np.where(targets == 1, 1, -1)
    gt[ignore] = 0  # LSHFM's VOC encoding of difficult
    assert 100 * lshfm_voc2012_ap(scores[:, 0], gt[:, 0]) == pytest.approx(250 / 3)


def test_lshfm_convention_agrees_with_their_code_on_random_data() -> None:
    """Continuous scores (no ties, where their argsort order would matter); some classes have no
    positive (their mAP's 0), others are never predicted (their Np := 1). The thresholded metrics
    are compared on the classes with positives only: their CR of a class without one is 0/0, and
    one correct prediction is planted so that no F1 of theirs is 0/0 either."""
    rng = np.random.default_rng(28)
    for trial in range(30):
        n, c = int(rng.integers(5, 60)), int(rng.integers(3, 12))
        logits = rng.normal(size=(n, c)) * 2
        targets = (rng.random((n, c)) < 0.3).astype(np.int64)
        targets[:, 0] = 0  # no positive
        targets[0, 1] = 1
        logits[:, 1] = -5 - rng.random(n)  # never predicted
        targets[0, 2], logits[0, 2] = 1, 3 + rng.random()  # a correct prediction
        probs = 1 / (1 + np.exp(-logits))
        _, m = mean_average_precision(probs, targets, mode="coco", convention="lshfm")
        assert m == pytest.approx(lshfm_map(targets, probs), rel=1e-6), trial
        scored = targets.sum(axis=0) > 0
        ours = threshold_metrics(probs[:, scored], targets[:, scored], convention="lshfm")
        assert ours == pytest.approx(lshfm_coco_metric(probs[:, scored], targets[:, scored]), rel=1e-9), trial
        assert ours == pytest.approx(mlgcn_evaluation(logits[:, scored], targets[:, scored]), rel=1e-9), trial
        if (probs[:, scored] >= 0.5).sum() > 0:  # some prediction made: the kdlib rule gives a higher OP
            assert threshold_metrics(probs[:, scored], targets[:, scored])["OP"] > ours["OP"], trial


def test_voc_ap_with_difficult_agrees_with_lshfms_voc2012ap() -> None:
    """kdlib's ``voc`` mode with VOC's difficult entries in ``ignore`` is LSHFM's VOC2012AP (gt 0 =
    difficult) up to its 1e-8 in the precision's denominator, on tie-free random data."""
    rng = np.random.default_rng(7)
    for trial in range(30):
        n = int(rng.integers(5, 60))
        scores = rng.random(n)
        gt = rng.choice([1, -1, 0], size=n, p=[0.3, 0.6, 0.1])
        gt[0] = 1
        ours = average_precision(scores, gt == 1, gt == 0, mode="voc")
        assert ours == pytest.approx(lshfm_voc2012_ap(scores, gt), abs=1e-7), trial


def test_unknown_convention_raises_naming_it() -> None:
    assert CONVENTIONS == ("kdlib", "lshfm")
    with pytest.raises(ValueError, match=r"convention must be one of \('kdlib', 'lshfm'\), got 'mlgcn'"):
        threshold_metrics(PROBS_T, TARGETS_T, convention="mlgcn")
    with pytest.raises(ValueError, match="got 'LSHFM'"):
        mean_average_precision(SCORES_3, TARGETS_3, convention="LSHFM")


def test_evaluate_passes_the_convention_to_both_metrics() -> None:
    """kdlib.metrics.evaluate on the fixed logits of SCORES_3-like data: lshfm changes mAP (class
    2 without positive → 0) and OP (class 2 never predicted → Np := 1)."""
    from torch.utils.data import DataLoader, TensorDataset

    from kdlib.metrics import evaluate

    logits = torch.logit(SCORES_3.clamp(0.05, 0.95).double()).float()
    logits[:, 2] = -3.0  # never predicted
    data = DataLoader(TensorDataset(logits, TARGETS_3.float(), torch.arange(6)), batch_size=4)
    kdlib = evaluate(torch.nn.Identity(), data, lambda x: x, torch.device("cpu"), ap_mode="coco")
    lshfm = evaluate(torch.nn.Identity(), data, lambda x: x, torch.device("cpu"), ap_mode="coco",
                     multilabel_convention="lshfm")
    assert kdlib.metrics["mAP"] == pytest.approx(85.0) and lshfm.metrics["mAP"] == pytest.approx(170 / 3)
    assert lshfm.score == lshfm.metrics["mAP"]
    probs = torch.sigmoid(logits)
    assert lshfm.metrics["OP"] == pytest.approx(threshold_metrics(probs, TARGETS_3, convention="lshfm")["OP"])
    assert lshfm.metrics["OP"] < kdlib.metrics["OP"]


def test_dataset_presets_choose_the_convention() -> None:
    """LSHFM's presets (voc2007, coco2014) score with its rules; every other preset keeps kdlib's
    (the default), and a value other than the two is refused naming the key."""
    from pathlib import Path

    import yaml

    from kdlib.data.spec import DatasetSpec
    from kdlib.schema import SchemaError, parse

    presets = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["datasets"]
    chosen = {name: parse(DatasetSpec, values, f"datasets.{name}.").multilabel_convention
              for name, values in presets.items()}
    assert {name for name, convention in chosen.items() if convention == "lshfm"} == {"voc2007", "coco2014"}
    assert set(chosen.values()) == {"kdlib", "lshfm"}
    with pytest.raises(SchemaError, match=r"datasets\.voc2007\.multilabel_convention = 'mlgcn'.*kdlib, lshfm"):
        parse(DatasetSpec, {**presets["voc2007"], "multilabel_convention": "mlgcn"}, "datasets.voc2007.")


# ---------------------------------------------------------------------------------------------
# Losses. Golden values by hand (σ = sigmoid, softplus(x) = log(1 + eˣ)):
#   BCE elements: (z=0, y=1) log 2 = 0.693147; (z=2, y=0) softplus(2) = 2.126928;
#   (z=-1, y=0) softplus(-1) = 0.313262; (z=0.5, y=1) softplus(-0.5) = 0.474077;
#   mean = 3.607414/4 = 0.9018535.
#   Binary KL, z_s=0, z_t=2: T=1: q=σ(2)=0.880797, KL = q·log(2q) + (1-q)·log(2(1-q))
#   = 0.880797·0.566219 − 0.119203·1.433781 = 0.327813;
#   T=2: q=σ(1)=0.731059, KL = 0.731059·0.379885 − 0.268941·0.620115 = 0.110944;
#   ×T² = 0.443776.
# ---------------------------------------------------------------------------------------------

S = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
T_ = torch.tensor([[2.0, 2.0], [1.0, -0.5]])
Y = torch.tensor([[1, 0], [0, 1]])
BCE = 0.9018534658253115
KL_T2 = 0.06612291332912024  # mean_{b,c} binary KL(σ(T_/2) || σ(S/2)), without T²


def test_bce_golden_value_and_module() -> None:
    assert float(bce_loss(S, Y)) == pytest.approx(BCE, abs=1e-6)
    assert torch.allclose(bce_loss(S, Y), F.binary_cross_entropy_with_logits(S, Y.float()))
    out = build_objective("bce")(StudentOutput(S), Y)
    assert isinstance(out, LossOutput) and set(out.terms) == {"bce"}
    assert float(out.total) == pytest.approx(BCE, abs=1e-6)
    assert BinaryCrossEntropy.needs_teacher is False
    assert BinaryCrossEntropy.tasks == ("multilabel",)


def test_sigmoid_kl_single_element_golden_values() -> None:
    zs, zt = torch.tensor([[0.0]]), torch.tensor([[2.0]])
    assert float(sigmoid_kl(zs, zt, 1.0)) == pytest.approx(0.3278133, abs=1e-6)
    assert float(sigmoid_kl(zs, zt, 2.0)) == pytest.approx(0.4437763, abs=1e-6)


def test_sigmoid_kl_is_soft_bce_minus_teacher_entropy() -> None:
    q = torch.sigmoid(T_ / 2)
    soft_bce = F.binary_cross_entropy_with_logits(S / 2, q)
    entropy = -(q * q.log() + (1 - q) * (1 - q).log()).mean()
    assert float(soft_bce - entropy) == pytest.approx(KL_T2, abs=1e-6)
    assert float(sigmoid_kl(S, T_, 2.0)) == pytest.approx(4 * KL_T2, abs=1e-6)


def test_t_squared_scaling() -> None:
    for temperature in (1.0, 2.0, 4.0):
        q = torch.sigmoid(T_ / temperature)
        p = torch.sigmoid(S / temperature)
        kl = (q * (q / p).log() + (1 - q) * ((1 - q) / (1 - p)).log()).mean()
        assert torch.allclose(sigmoid_kl(S, T_, temperature), temperature**2 * kl, atol=1e-6)


def test_equal_logits_give_exactly_zero_kd_term() -> None:
    z = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 5
    for temperature in (0.5, 1.0, 4.0):
        assert float(sigmoid_kl(z, z.clone(), temperature)) == 0.0


def test_sigmoid_kd_golden_value_and_alpha_extremes() -> None:
    loss = sigmoid_kd_loss(S, T_, Y, temperature=2.0, alpha=0.5)
    assert float(loss) == pytest.approx(0.5 * BCE + 0.5 * 4 * KL_T2, abs=1e-6)
    # alpha = 0 is plain BCE, whatever the teacher says.
    assert torch.allclose(sigmoid_kd_loss(S, T_, Y, temperature=4.0, alpha=0.0), bce_loss(S, Y))
    # alpha = 1 ignores the targets.
    pure = sigmoid_kd_loss(S, T_, Y, temperature=2.0, alpha=1.0)
    assert torch.allclose(pure, sigmoid_kd_loss(S, T_, 1 - Y, temperature=2.0, alpha=1.0))


def test_gradient_reaches_student_only_and_matches_the_soft_bce_form() -> None:
    student = S.clone().requires_grad_(True)
    teacher = T_.clone().requires_grad_(True)
    sigmoid_kd_loss(student, teacher, Y, temperature=2.0, alpha=0.7).backward()
    assert teacher.grad is None
    # Subtracting the teacher's entropy does not change the student's gradient.
    reference = S.clone().requires_grad_(True)
    soft_bce = F.binary_cross_entropy_with_logits(reference / 2, torch.sigmoid(T_ / 2)) * 4
    (0.3 * F.binary_cross_entropy_with_logits(reference, Y.float()) + 0.7 * soft_bce).backward()
    assert torch.allclose(student.grad, reference.grad, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_invalid_temperature_raises(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        sigmoid_kd_loss(S, T_, Y, temperature=temperature, alpha=0.5)
    with pytest.raises(ValueError, match="temperature"):
        sigmoid_kl(S, T_, temperature)
    with pytest.raises(ValueError, match="temperature"):
        SigmoidKDLoss(temperature=temperature, alpha=0.5)


@pytest.mark.parametrize("alpha", [-0.1, 1.1, float("nan")])
def test_invalid_alpha_raises(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        sigmoid_kd_loss(S, T_, Y, temperature=2.0, alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        build_objective("sigmoid_kd", temperature=2.0, alpha=alpha)


def test_build_objective_sigmoid_kd() -> None:
    objective = build_objective("sigmoid_kd", temperature=2.0, alpha=0.5)
    assert isinstance(objective, SigmoidKDLoss) and objective.needs_teacher is True
    assert objective.tasks == ("multilabel",)
    out = objective(StudentOutput(S), Y, TeacherOutput(T_))
    assert isinstance(out, LossOutput) and set(out.terms) == {"bce", "kd"}
    assert float(out.terms["bce"]) == pytest.approx(BCE, abs=1e-6)
    assert float(out.terms["kd"]) == pytest.approx(4 * KL_T2, abs=1e-6)
    assert torch.allclose(out.total, sigmoid_kd_loss(S, T_, Y, temperature=2.0, alpha=0.5))
    assert not out.terms["kd"].requires_grad
    with pytest.raises(ValueError, match="teacher"):
        objective(StudentOutput(S), Y)


def test_multilabel_feature_methods_use_bce_as_the_hard_term() -> None:
    """``l2`` with ``multilabel=True``: γ·BCE + β·L2. Features f_s = [[0, 1], [1, 1]],
    f_t = [[1, 1], [1, 3]]: squared differences 1, 0, 0, 4 → L2 = 5/4."""
    f_s, f_t = torch.tensor([[0.0, 1.0], [1.0, 1.0]]), torch.tensor([[1.0, 1.0], [1.0, 3.0]])
    objective = build_objective("l2", beta=0.5, gamma=2.0, multilabel=True)
    out = objective(StudentOutput(S, features=f_s), Y, TeacherOutput(T_, features=f_t))
    assert set(out.terms) == {"bce", "l2"}
    assert float(out.terms["bce"]) == pytest.approx(BCE, abs=1e-6)
    assert float(out.total) == pytest.approx(2.0 * BCE + 0.5 * 1.25, abs=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        build_objective("lshl2", multilabel=True, label_smoothing=0.1)
