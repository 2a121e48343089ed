"""DIST (Huang et al., NeurIPS 2022) and KD with logit standardization (Sun et al., CVPR 2024): golden
values from the authors' own code, and the properties each paper's argument rests on.

The golden numbers were computed in float64 by the authors' functions on the batch A (student) and B
(teacher) below: ``DIST(beta, gamma, tau)`` of hunto/image_classification_sota 6f7a70a
(``lib/models/losses/dist_kd.py``; β = 1, γ = 0 gives the inter-class term, β = 0, γ = 1 the intra-class
one) and ``kd_loss(s, t, T, logit_stand)`` of sunshangquan/logit-standardization-KD f6e5aa5
(``mdistiller/distillers/KD.py``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdlib.losses import StudentOutput, TeacherOutput, build_objective
from kdlib.losses.dist import dist_terms
from kdlib.losses.kd import soft_kl
from kdlib.losses.kd_std import standardize

A = torch.tensor([[1.0, 2.0, 3.0, -1.0, 0.5], [0.5, -1.0, 2.0, 0.0, 1.5], [2.5, 0.0, -0.5, 1.0, -2.0],
                  [0.0, 3.0, 1.0, -1.5, 0.5]])
B = torch.tensor([[3.0, 1.0, 0.0, -2.0, 1.0], [0.0, 0.0, 1.0, 2.0, -1.0], [4.0, -1.0, 0.5, 0.0, -3.0],
                  [-1.0, 5.0, 0.0, -1.0, 2.0]])
Y = torch.tensor([2, 4, 0, 1])
DIST_GOLDEN = {1.0: (0.6179229781746518, 0.5729477021317521), 4.0: (8.709132969049005, 7.275988524789877)}
KD_STD_GOLDEN = {1.0: 0.3859621670772346, 2.0: 0.40441771683271593}  # T²·KL of standardized logits
KD_PLAIN_GOLDEN = {1.0: 0.7379496756246912, 2.0: 0.9959858830191931}  # the same code without standardizing


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dist_terms_equal_the_authors_code(tau: float) -> None:
    inter, intra = dist_terms(A, B, tau)
    assert float(inter) == pytest.approx(DIST_GOLDEN[tau][0], rel=1e-6)
    assert float(intra) == pytest.approx(DIST_GOLDEN[tau][1], rel=1e-6)


def test_dist_total_and_terms() -> None:
    method = build_objective("dist")  # the authors' ImageNet recipe: tau 1, beta = gamma = 1, kd 2, ce 1
    out = method(StudentOutput(A), Y, TeacherOutput(B))
    inter, intra = DIST_GOLDEN[1.0]
    assert float(out.total) == pytest.approx(float(F.cross_entropy(A, Y)) + 2.0 * (inter + intra), rel=1e-6)
    assert set(out.terms) == {"ce", "inter", "intra"}


def test_dist_is_zero_for_the_teachers_own_outputs_and_ignores_its_scale() -> None:
    """ρ = 1 for identical predictions; and a teacher whose tempered softmax differs from the student's only
    by a shift of every probability is matched as well as an identical one (Pearson is affine-invariant)."""
    inter, intra = dist_terms(B, B, 1.0)
    assert float(inter) == pytest.approx(0.0, abs=1e-6) and float(intra) == pytest.approx(0.0, abs=1e-6)
    probabilities = B.softmax(dim=1)
    sharper = 0.5 * probabilities + 0.5 / B.shape[1]  # rows still sum to 1: an affine map of each row
    inter, _ = dist_terms(probabilities.log(), sharper.log(), 1.0)
    assert float(inter) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_kl(probabilities.log(), sharper.log(), 1.0)) > 0.01  # where KL still pulls


def test_dist_with_a_batch_of_one_has_no_intra_class_signal() -> None:
    inter, intra = dist_terms(A[:1], B[:1], 1.0)
    assert float(intra) == pytest.approx(1.0) and float(inter) == pytest.approx(DIST_GOLDEN[1.0][0], abs=1.0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_std_equals_the_authors_code(temperature: float) -> None:
    assert float(soft_kl(standardize(A), standardize(B), temperature)) == pytest.approx(
        KD_STD_GOLDEN[temperature], rel=1e-6)
    # and the authors' switch off is kdlib's plain T²·KL
    assert float(soft_kl(A, B, temperature)) == pytest.approx(KD_PLAIN_GOLDEN[temperature], rel=1e-6)


def test_kd_std_ignores_each_rows_shift_and_scale() -> None:
    """The Z-score's point: a student whose logits are an affine map (a > 0) of the teacher's has nothing left
    to learn, while plain KD still pulls it toward the teacher's range."""
    student = 0.25 * B + 3.0
    method = build_objective("kd_std", ce_weight=0.0)
    assert float(method(StudentOutput(student), Y, TeacherOutput(B)).total) == pytest.approx(0.0, abs=1e-5)
    assert float(soft_kl(student, B, 2.0)) > 0.1
    z = standardize(A)
    assert torch.allclose(z.mean(dim=1), torch.zeros(4), atol=1e-6)
    assert torch.allclose(z.std(dim=1), torch.ones(4), atol=1e-6)  # the sample (N − 1) deviation


def test_kd_std_total_and_weights() -> None:
    out = build_objective("kd_std")(StudentOutput(A), Y, TeacherOutput(B))  # T 2, kd 9, ce 0.1
    assert float(out.total) == pytest.approx(0.1 * float(F.cross_entropy(A, Y)) + 9.0 * KD_STD_GOLDEN[2.0], rel=1e-6)
    assert set(out.terms) == {"ce", "kd"}


@pytest.mark.parametrize("name,knobs,message", [("dist", {"tau": 0.0}, "tau"), ("dist", {"gamma": -1.0}, "gamma"),
                                                ("kd_std", {"temperature": float("nan")}, "temperature"),
                                                ("kd_std", {"kd_weight": -9.0}, "kd_weight")])
def test_bad_knobs_are_refused_by_name(name: str, knobs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_objective(name, **knobs)


def test_no_gradient_reaches_the_teacher() -> None:
    for name in ("dist", "kd_std"):
        student, teacher = A.clone().requires_grad_(), B.clone().requires_grad_()
        build_objective(name)(StudentOutput(student), Y, TeacherOutput(teacher)).total.backward()
        assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None, name
