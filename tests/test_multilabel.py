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
from kdlib.multilabel import average_precision, mean_average_precision, threshold_metrics

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
