"""DeiT token distillation (``deit_soft``, ``deit_hard``): golden values, which head gets which
gradient, the teacher's argmax, and the mapping to DeiT's numel-averaged soft term.

Golden numbers computed independently with numpy float64 (log-softmax by max-shift):

* class head S, labels Y as in test_losses: CE = 1.0744586305507688, CE with ε = 0.1 =
  1.1244586305507687.
* distillation head D = [[0, 1, −1], [2, 0, 0.5]] against the teacher T_ = [[3, 1, 0], [0, 0, 1]]:
  batchmean KL(softmax(T_/τ) ‖ softmax(D/τ)) = 0.7151202699560093 (τ = 1),
  0.19162010697681747 (τ = 2, without τ²).
* teacher argmax = [0, 2]; CE(D, [0, 2]) by hand: row 0 log(1 + e + e⁻¹) − 0 = 1.407606,
  row 1 log(e² + 1 + e^0.5) − 0.5 = 1.806356; mean 1.6069808383367636.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdlib.losses import (
    LossOutput,
    StudentOutput,
    TeacherOutput,
    build_objective,
    deit_hard_loss,
    deit_soft_loss,
    hard_teacher_ce,
)
from kdlib.losses.deit_hard import DeiTHardLoss
from kdlib.losses.deit_soft import DeiTSoftLoss
from kdlib.losses.lsh import LSHMethodBase

S = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
D = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.5]])
T_ = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
Y = torch.tensor([2, 0])

CE = 1.0744586305507688
CE_LS01 = 1.1244586305507687
KL_D_T1 = 0.7151202699560093
KL_D_T2 = 0.19162010697681747
CE_D_TEACHER = 1.6069808383367636
SOFT_A05_T2 = 0.9204695292290194  # 0.5·CE + 0.5·4·KL_D_T2
SOFT_A05_T1_LS01 = 0.919789450253389  # 0.5·CE_LS01 + 0.5·KL_D_T1
HARD_A05 = 1.3407197344437662  # 0.5·CE + 0.5·CE_D_TEACHER
HARD_A025_LS01 = 1.2450891824972674  # 0.75·CE_LS01 + 0.25·CE_D_TEACHER (no smoothing on the teacher term)


def student(cls: torch.Tensor = S, dist: torch.Tensor = D) -> StudentOutput:
    return StudentOutput(cls, dist_logits=dist)


def test_deit_soft_golden_values() -> None:
    assert float(deit_soft_loss(S, D, T_, Y, alpha=0.5, temperature=2.0)) == pytest.approx(SOFT_A05_T2, abs=1e-6)
    out = build_objective("deit_soft", alpha=0.5, temperature=2.0)(student(), Y, TeacherOutput(T_))
    assert isinstance(out, LossOutput) and set(out.terms) == {"ce", "dist"}
    assert float(out.total) == pytest.approx(SOFT_A05_T2, abs=1e-6)
    assert float(out.terms["ce"]) == pytest.approx(CE, abs=1e-6)
    assert float(out.terms["dist"]) == pytest.approx(4 * KL_D_T2, abs=1e-6)
    smoothed = build_objective("deit_soft", label_smoothing=0.1)(student(), Y, TeacherOutput(T_))
    assert float(smoothed.total) == pytest.approx(SOFT_A05_T1_LS01, abs=1e-6)  # defaults α = 0.5, τ = 1


def test_deit_hard_golden_values() -> None:
    assert float(hard_teacher_ce(D, T_)) == pytest.approx(CE_D_TEACHER, abs=1e-6)
    assert float(deit_hard_loss(S, D, T_, Y, alpha=0.5)) == pytest.approx(HARD_A05, abs=1e-6)
    out = build_objective("deit_hard")(student(), Y, TeacherOutput(T_))
    assert set(out.terms) == {"ce", "dist"}
    assert float(out.total) == pytest.approx(HARD_A05, abs=1e-6)
    assert float(out.terms["dist"]) == pytest.approx(CE_D_TEACHER, abs=1e-6)
    # label smoothing touches the class head's term only
    smoothed = build_objective("deit_hard", alpha=0.25, label_smoothing=0.1)(student(), Y, TeacherOutput(T_))
    assert float(smoothed.total) == pytest.approx(HARD_A025_LS01, abs=1e-6)


def test_deit_hard_uses_the_teacher_argmax() -> None:
    # Any teacher logits with the same argmax give the same loss; a different argmax changes it.
    same_argmax = torch.tensor([[10.0, -5.0, 9.0], [-1.0, -2.0, 0.0]])
    other_argmax = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    objective = build_objective("deit_hard", alpha=1.0)
    base = objective(student(), Y, TeacherOutput(T_)).total
    assert torch.allclose(objective(student(), Y, TeacherOutput(same_argmax)).total, base)
    assert not torch.allclose(objective(student(), Y, TeacherOutput(other_argmax)).total, base)
    assert torch.allclose(base, F.cross_entropy(D, torch.tensor([0, 2])))


@pytest.mark.parametrize("name", ["deit_soft", "deit_hard"])
def test_heads_get_gradient_only_from_their_own_term(name: str) -> None:
    """α = 1: only the teacher term → the class head's gradient is zero; α = 0: only the labels →
    the distillation head's is zero. At α = 0.5 each head's gradient is its own term's, halved."""
    def grads(alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cls, dist = S.clone().requires_grad_(True), D.clone().requires_grad_(True)
        teacher = T_.clone().requires_grad_(True)
        build_objective(name, alpha=alpha)(student(cls, dist), Y, TeacherOutput(teacher)).total.backward()
        assert teacher.grad is None  # nothing flows into the teacher
        return cls.grad, dist.grad, teacher

    cls_grad, dist_grad, _ = grads(1.0)
    assert torch.count_nonzero(cls_grad) == 0 and dist_grad.abs().sum() > 0
    cls_grad0, dist_grad0, _ = grads(0.0)
    assert torch.count_nonzero(dist_grad0) == 0 and cls_grad0.abs().sum() > 0
    cls_half, dist_half, _ = grads(0.5)
    assert torch.allclose(cls_half, 0.5 * cls_grad0, atol=1e-7)
    assert torch.allclose(dist_half, 0.5 * dist_grad, atol=1e-7)


def test_deit_soft_reproduces_deits_numel_averaged_loss() -> None:
    """DeiT: (1−α_D)·CE + α_D·τ²·KL_sum/(B·C). With α = α_D / (α_D + C(1−α_D)) our loss is DeiT's
    times C / (α_D + C(1−α_D))."""
    alpha_d, tau, classes = 0.5, 2.0, S.shape[1]
    kl_sum = F.kl_div(F.log_softmax(D / tau, -1), F.log_softmax(T_ / tau, -1), reduction="sum", log_target=True)
    deit = (1 - alpha_d) * F.cross_entropy(S, Y) + alpha_d * tau**2 * kl_sum / D.numel()
    alpha = alpha_d / (alpha_d + classes * (1 - alpha_d))
    ours = deit_soft_loss(S, D, T_, Y, alpha=alpha, temperature=tau)
    assert float(ours) == pytest.approx(float(deit) * classes / (alpha_d + classes * (1 - alpha_d)), rel=1e-6)


def test_soft_term_is_temperature_squared_kl_and_zero_for_equal_heads() -> None:
    objective = build_objective("deit_soft", alpha=1.0, temperature=4.0)
    same = objective(student(S, T_.clone()), Y, TeacherOutput(T_)).total
    assert abs(float(same)) < 1e-6
    unscaled = F.kl_div(F.log_softmax(D / 4, -1), F.softmax(T_ / 4, -1), reduction="batchmean")
    assert torch.allclose(objective(student(), Y, TeacherOutput(T_)).total, 16 * unscaled, atol=1e-6)


@pytest.mark.parametrize("name", ["deit_soft", "deit_hard"])
def test_missing_dist_logits_or_teacher_is_a_clear_error(name: str) -> None:
    objective = build_objective(name)
    with pytest.raises(ValueError, match="dist_logits"):
        objective(StudentOutput(S), Y, TeacherOutput(T_))
    with pytest.raises(ValueError, match="teacher"):
        objective(student(), Y, None)


def test_class_attributes() -> None:
    for cls in (DeiTSoftLoss, DeiTHardLoss):
        assert cls.uses_distillation_token is True and cls.needs_teacher is True
        assert cls.needs_features is False and not issubclass(cls, LSHMethodBase)
        assert not hasattr(cls, "needs_lsh")  # gone: only LSH methods have hyperplanes, fitted in setup()
        assert cls.tasks == ("multiclass",)


@pytest.mark.parametrize(
    "name, kwargs, knob",
    [
        ("deit_soft", {"alpha": 1.5}, "alpha"),
        ("deit_soft", {"alpha": -0.1}, "alpha"),
        ("deit_soft", {"temperature": 0.0}, "temperature"),
        ("deit_soft", {"temperature": float("inf")}, "temperature"),
        ("deit_hard", {"alpha": float("nan")}, "alpha"),
        ("deit_hard", {"alpha": 2}, "alpha"),
    ],
)
def test_invalid_knobs_are_refused(name: str, kwargs: dict, knob: str) -> None:
    with pytest.raises(ValueError, match=knob):
        build_objective(name, **kwargs)


def test_soft_targets_for_the_class_head() -> None:
    soft = torch.tensor([[0.0, 0.3, 0.7], [1.0, 0.0, 0.0]])  # see test_losses: soft CE = CE + 0.15
    out = build_objective("deit_hard")(student(), soft, TeacherOutput(T_))
    assert float(out.terms["ce"]) == pytest.approx(CE + 0.15, abs=1e-6)
