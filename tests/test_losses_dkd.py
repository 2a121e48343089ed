"""DKD (Zhao et al., CVPR 2022): hand-computed values, mdistiller's own code on random batches, the
warm-up, numerical stability where mdistiller's code gives NaN, and integer labels only.

Hand values (Python ``math``, float64) for the KD tests' batch S, T_, Y: per row, b = (p_y, 1 − p_y)
and p̂ = softmax of the logits without the label's, at T = 1 and 4; TCKD = T²·mean KL(b_t ‖ b_s), NCKD =
T²·mean KL(p̂_t ‖ p̂_s).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdlib.losses import StudentOutput, TeacherOutput, build_objective, dkd_terms
from kdlib.losses.dkd import warmup_factor
from kdlib.losses.registry import Progress

S = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
T_ = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
Y = torch.tensor([2, 0])
HAND = {1.0: (0.4478150502025486, 0.5509667086022033), 4.0: (0.6560137008722001, 0.7884021591462822)}


# mdistiller/distillers/DKD.py at megvii-research/mdistiller a08d46f (MIT License, Copyright (c) 2022 MEGVII
# Research), unchanged but for `size_average=False`, which today's torch spells `reduction="sum"`.
def mdistiller_dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature):
    gt_mask = _get_gt_mask(logits_student, target)
    other_mask = _get_other_mask(logits_student, target)
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = (
        F.kl_div(log_pred_student, pred_teacher, reduction="sum")
        * (temperature**2)
        / target.shape[0]
    )
    pred_teacher_part2 = F.softmax(
        logits_teacher / temperature - 1000.0 * gt_mask, dim=1
    )
    log_pred_student_part2 = F.log_softmax(
        logits_student / temperature - 1000.0 * gt_mask, dim=1
    )
    nckd_loss = (
        F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
        * (temperature**2)
        / target.shape[0]
    )
    return alpha * tckd_loss + beta * nckd_loss


def _get_gt_mask(logits, target):
    target = target.reshape(-1)
    mask = torch.zeros_like(logits).scatter_(1, target.unsqueeze(1), 1).bool()
    return mask


def _get_other_mask(logits, target):
    target = target.reshape(-1)
    mask = torch.ones_like(logits).scatter_(1, target.unsqueeze(1), 0).bool()
    return mask


def cat_mask(t, mask1, mask2):
    t1 = (t * mask1).sum(dim=1, keepdims=True)
    t2 = (t * mask2).sum(1, keepdims=True)
    rt = torch.cat([t1, t2], dim=1)
    return rt


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_terms_on_hand_computed_values(temperature: float) -> None:
    tckd, nckd = dkd_terms(S, T_, Y, temperature)
    assert float(tckd) == pytest.approx(HAND[temperature][0], abs=1e-6)
    assert float(nckd) == pytest.approx(HAND[temperature][1], abs=1e-6)


@pytest.mark.parametrize("temperature,alpha,beta", [(4.0, 1.0, 8.0), (1.0, 1.0, 0.5), (2.0, 0.5, 2.0)])
def test_the_same_as_mdistillers_code_on_random_batches(temperature: float, alpha: float, beta: float) -> None:
    """CIFAR-100 and ImageNet settings (mdistiller's configs) and one more, 64 × 100 logits."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        student, teacher = torch.randn(64, 100, generator=gen) * 3, torch.randn(64, 100, generator=gen) * 3
        target = torch.randint(0, 100, (64,), generator=gen)
        tckd, nckd = dkd_terms(student, teacher, target, temperature)
        reference = mdistiller_dkd_loss(student, teacher, target, alpha, beta, temperature)
        assert float(alpha * tckd + beta * nckd) == pytest.approx(float(reference), rel=1e-5, abs=1e-6)
        # the two terms apart: beta 0 is TCKD alone, alpha 0 NCKD alone
        assert float(tckd) == pytest.approx(float(mdistiller_dkd_loss(student, teacher, target, 1.0, 0.0, temperature)),
                                            rel=1e-5, abs=1e-6)


def test_finite_where_mdistillers_code_is_not() -> None:
    """A confident student whose label probability underflows: mdistiller's log(p) is −inf, its loss inf."""
    student = torch.tensor([[200.0, 0.0, -200.0]])
    teacher = torch.tensor([[0.0, 1.0, 2.0]])
    target = torch.tensor([2])
    assert not torch.isfinite(mdistiller_dkd_loss(student, teacher, target, 1.0, 8.0, 1.0))
    tckd, nckd = dkd_terms(student, teacher, target, 1.0)
    assert torch.isfinite(tckd) and torch.isfinite(nckd) and float(tckd) > 100  # log p_y = −400: a large, finite loss


def test_gradient_reaches_the_student_only() -> None:
    student, teacher = S.clone().requires_grad_(), T_.clone().requires_grad_()
    tckd, nckd = dkd_terms(student, teacher, Y, 4.0)
    (tckd + nckd).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None


def test_the_warm_up_is_mdistillers_per_epoch_ramp() -> None:
    assert [warmup_factor(e, 20) for e in (1, 10, 20, 21, 240)] == [0.05, 0.5, 1.0, 1.0, 1.0]
    assert warmup_factor(1, 0) == 1.0
    method = build_objective("dkd")
    ce = F.cross_entropy(S, Y)
    tckd, nckd = dkd_terms(S, T_, Y, 4.0)
    for epoch, ramp in ((1, 0.05), (20, 1.0)):
        out = method(StudentOutput(S), Y, TeacherOutput(T_), progress=Progress(epoch, 240, 3, 10))
        assert float(out.total) == pytest.approx(float(ce + ramp * (tckd + 8.0 * nckd)), rel=1e-6)
        assert set(out.terms) == {"ce", "tckd", "nckd", "warmup"} and float(out.terms["warmup"]) == pytest.approx(ramp)


def test_soft_targets_missing_progress_and_bad_knobs_are_refused() -> None:
    method = build_objective("dkd")
    with pytest.raises(ValueError, match="integer class labels"):
        method(StudentOutput(S), F.one_hot(Y, 3).float(), TeacherOutput(T_), progress=Progress(1, 2, 1, 1))
    with pytest.raises(ValueError, match="progress"):
        method(StudentOutput(S), Y, TeacherOutput(T_))
    for knobs, message in (({"warmup": 2.5}, "warmup"), ({"beta": -1.0}, "beta"), ({"temperature": 0.0}, "temperature")):
        with pytest.raises(ValueError, match=message):
            build_objective("dkd", **knobs)


def test_the_progress_the_loop_passes() -> None:
    p = Progress(epoch=3, epochs=10, step=4, steps_per_epoch=7)
    assert p.global_step == 18 and p.total_steps == 70
