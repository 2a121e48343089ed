"""Hinton KD loss: golden values, conventions, gradients and the objective registry.

Golden numbers below were computed independently with numpy (float64) from
``(1-α)·CE + α·T²·KL(softmax(t/T) || softmax(s/T))``, KL summed over classes, mean over the batch.
The CE value is also checkable by hand: row 0: log(e+e²+e³) − 3 = 0.40761;
row 1: log(e^0.5+e^-1+e²) − 0.5 = 1.74131; mean 1.07446.
"""
from __future__ import annotations

import inspect
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from kdlib.losses import (
    METHODS,
    LossOutput,
    StudentOutput,
    TeacherOutput,
    build_objective,
    kd_loss,
    soft_kl,
)
from kdlib.losses.base import Method

S = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
T_ = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
Y = torch.tensor([2, 0])

CE = 1.0744586305507688  # plain cross-entropy of S against Y
CE_LS01 = 1.1244586305507687  # cross-entropy with label smoothing 0.1
KL_T1 = 0.9524222464159001  # batchmean KL(softmax(T_) || softmax(S)), T = 1
KL_T2 = 0.29731941522475397  # same at T = 2, without the T² factor
KL_T4 = 0.07792649159500425  # same at T = 4, without the T² factor
KD_T2_A05 = 1.1318681457248925  # 0.5·CE + 0.5·4·KL_T2
KD_T4_A09 = 1.2295873420231382  # 0.1·CE + 0.9·16·KL_T4
KD_T2_A05_LS01 = 1.1568681457248924  # 0.5·CE_LS01 + 0.5·4·KL_T2


def close(value: torch.Tensor, expected: float, tol: float = 1e-5) -> bool:
    return abs(float(value) - expected) < tol


def test_soft_kl_golden_values() -> None:
    assert close(soft_kl(S, T_, 1.0), KL_T1)
    assert close(soft_kl(S, T_, 2.0), 4.0 * KL_T2)
    assert close(soft_kl(S, T_, 4.0), 16.0 * KL_T4)


def test_soft_term_is_t_squared_times_batchmean_kl() -> None:
    unscaled = F.kl_div(F.log_softmax(S / 2, -1), F.softmax(T_ / 2, -1), reduction="batchmean")
    assert close(unscaled, KL_T2)
    assert torch.allclose(soft_kl(S, T_, 2.0), 4.0 * unscaled, atol=1e-6)


def test_kd_loss_golden_values() -> None:
    assert close(kd_loss(S, T_, Y, temperature=2.0, alpha=0.5), KD_T2_A05)
    assert close(kd_loss(S, T_, Y, temperature=4.0, alpha=0.9), KD_T4_A09)


def test_alpha_zero_is_plain_cross_entropy() -> None:
    loss = kd_loss(S, T_, Y, temperature=4.0, alpha=0.0)
    assert close(loss, CE)
    assert torch.allclose(loss, F.cross_entropy(S, Y))


def test_alpha_one_is_pure_scaled_kl() -> None:
    assert close(kd_loss(S, T_, Y, temperature=2.0, alpha=1.0), 4.0 * KL_T2)
    # Targets do not matter at alpha = 1.
    other = kd_loss(S, T_, torch.tensor([0, 1]), temperature=2.0, alpha=1.0)
    assert close(other, 4.0 * KL_T2)


def test_kl_is_zero_for_equal_logits() -> None:
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    for temperature in (0.5, 1.0, 4.0):
        assert abs(float(soft_kl(logits, logits.clone(), temperature))) < 1e-6


def test_kl_is_nonnegative_on_random_inputs() -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        s, t = torch.randn(4, 10, generator=gen) * 3, torch.randn(4, 10, generator=gen) * 3
        assert float(soft_kl(s, t, 3.0)) >= -1e-7
    # and strictly positive when the distributions differ
    assert float(soft_kl(S, T_, 1.0)) > 0.1


def test_gradient_does_not_flow_into_teacher() -> None:
    student = S.clone().requires_grad_(True)
    teacher = T_.clone().requires_grad_(True)
    kd_loss(student, teacher, Y, temperature=2.0, alpha=0.5).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_module_gradient_does_not_flow_into_teacher() -> None:
    student = S.clone().requires_grad_(True)
    teacher = T_.clone().requires_grad_(True)
    build_objective("kd", temperature=2.0, alpha=1.0)(
        StudentOutput(student), Y, TeacherOutput(teacher)
    ).total.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_batchmean_not_numel_convention() -> None:
    """KL summed over classes, averaged over the batch: duplicating the batch changes nothing
    (rules out ``sum``), and the value is C times DeiT's numel-averaged KL (rules out ``mean``)."""
    single = kd_loss(S, T_, Y, temperature=2.0, alpha=0.5)
    doubled = kd_loss(torch.cat([S, S]), torch.cat([T_, T_]), torch.cat([Y, Y]), temperature=2.0, alpha=0.5)
    assert torch.allclose(single, doubled, atol=1e-6)
    numel_kl = F.kl_div(F.log_softmax(S / 2, -1), F.log_softmax(T_ / 2, -1), reduction="sum", log_target=True) / S.numel()
    assert torch.allclose(soft_kl(S, T_, 2.0), 4.0 * numel_kl * S.shape[1], atol=1e-6)
    assert not torch.allclose(soft_kl(S, T_, 2.0), 4.0 * numel_kl, atol=1e-3)


def test_label_smoothing_passes_through() -> None:
    assert close(kd_loss(S, T_, Y, 2.0, 0.5, label_smoothing=0.1), KD_T2_A05_LS01)
    assert close(kd_loss(S, T_, Y, 2.0, 0.0, label_smoothing=0.1), CE_LS01)
    out = build_objective("kd", temperature=2.0, alpha=0.5, label_smoothing=0.1)(
        StudentOutput(S), Y, TeacherOutput(T_)
    )
    assert close(out.total, KD_T2_A05_LS01)
    assert close(build_objective("ce", label_smoothing=0.1)(StudentOutput(S), Y).total, CE_LS01)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_invalid_temperature_raises(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(S, T_, Y, temperature=temperature, alpha=0.5)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_invalid_alpha_raises(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(S, T_, Y, temperature=2.0, alpha=alpha)


def test_kd_module_matches_function_and_reports_terms() -> None:
    objective = build_objective("kd", temperature=4.0, alpha=0.9)
    out = objective(StudentOutput(S), Y, TeacherOutput(T_))
    assert isinstance(out, LossOutput)
    assert torch.allclose(out.total, kd_loss(S, T_, Y, temperature=4.0, alpha=0.9), atol=1e-6)
    assert close(out.total, KD_T4_A09)
    assert {"ce", "kd"} <= set(out.terms)
    assert close(out.terms["ce"], CE)
    assert close(out.terms["kd"], 16.0 * KL_T4)
    assert objective.needs_teacher is True


def test_kd_module_requires_teacher_logits() -> None:
    with pytest.raises(ValueError, match="teacher"):
        build_objective("kd", temperature=4.0, alpha=0.9)(StudentOutput(S), Y)


def test_cross_entropy_module() -> None:
    objective = build_objective("ce")
    out = objective(StudentOutput(S), Y)
    assert isinstance(out, LossOutput)
    assert close(out.total, CE)
    assert set(out.terms) == {"ce"}
    assert objective.needs_teacher is False


def test_unknown_method_raises_key_error_listing_known() -> None:
    with pytest.raises(KeyError) as info:
        build_objective("fitnets")
    message = str(info.value)
    assert "fitnets" in message and "kd" in message and "ce" in message


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": 0.0}, {"temperature": -2.0}, {"alpha": 1.5}, {"alpha": -0.5}],
    ids=["T=0", "T=-2", "alpha=1.5", "alpha=-0.5"],
)
def test_kd_module_rejects_invalid_hyperparameters(kwargs: dict) -> None:
    """The module form must not silently return nan/inf or a negative weight for bad settings."""
    params = {"temperature": 4.0, "alpha": 0.9, **kwargs}
    with pytest.raises(ValueError):
        build_objective("kd", **params)(StudentOutput(S), Y, TeacherOutput(T_))


# ---------------------------------------------------------------------------------------------
# Interface of every registered method.
# ---------------------------------------------------------------------------------------------

ATTRIBUTES = ("needs_teacher", "needs_features", "uses_distillation_token", "uses_progress", "uses_layers",
              "uses_positions", "tasks", "soft_targets")


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_declares_its_capabilities_and_a_docstring(name: str) -> None:
    cls = METHODS.get(name)
    assert isinstance(cls, type) and issubclass(cls, Method), f"{name} must subclass kdlib.losses.base.Method"
    for attribute in ATTRIBUTES:
        assert attribute in vars(cls), f"{name} must set {attribute} explicitly"
    assert all(isinstance(getattr(cls, a), bool) for a in ATTRIBUTES[:6])
    assert cls.soft_targets in ("mixed", "argmax", "refused")
    # a method that takes the training progress says so in its forward's signature
    assert ("progress" in inspect.signature(cls.forward).parameters) == cls.uses_progress
    assert ("positions" in inspect.signature(cls.forward).parameters) == cls.uses_positions
    assert cls.tasks and set(cls.tasks) <= {"multiclass", "multilabel"}
    assert not hasattr(cls, "needs_lsh")  # removed: LSH methods fit their hyperplanes in setup()
    assert cls.__doc__ and cls.__doc__.strip()
    assert ".. math::" in sys.modules[cls.__module__].__doc__  # the formula, in the module docstring
    # the feature/teacher flags are consistent; a method that fits state from the teacher needs one
    assert cls.setup is Method.setup or cls.needs_teacher and (cls.needs_features or cls.uses_layers)
    assert not (cls.needs_features or cls.uses_distillation_token) or cls.needs_teacher
    # knobs are the constructor's arguments less the context ones the run supplies
    assert set(cls.knobs()) == set(cls.arguments()) - set(cls.context_args)
    # every method builds with its defaults, and fits nothing before setup()
    built = build_objective(name)
    assert isinstance(built, cls)
    assert built.fitted_state() == {}


def test_method_fits_task() -> None:
    assert METHODS.get("kd").fits("multiclass")
    assert not METHODS.get("kd").fits("multilabel")
    assert METHODS.get("sigmoid_kd").fits("multilabel")
    assert METHODS.get("lshl2").fits("multilabel") and METHODS.get("lshl2").fits("multiclass")
    assert not METHODS.get("lshl2_s").fits("multilabel")


def test_build_objective_refuses_unknown_knobs_naming_them() -> None:
    with pytest.raises(ValueError, match="'tau'") as info:
        build_objective("kd", tau=2.0)
    assert "temperature" in str(info.value)  # lists what it takes
    with pytest.raises(ValueError, match="'label_smoothing'"):
        build_objective("bce", label_smoothing=0.1)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_label_smoothing_is_validated(value: float) -> None:
    for name in ("ce", "kd", "deit_soft", "deit_hard", "l2", "lsh", "lshl2", "lshl2_s"):
        with pytest.raises(ValueError, match="label_smoothing"):
            build_objective(name, label_smoothing=value)


def test_kd_message_names_knob_value_and_range() -> None:
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0"):
        build_objective("kd", temperature=0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        build_objective("kd", alpha=1.5)


def test_soft_targets_flow_through_the_hard_term() -> None:
    """MixUp/CutMix targets: row 0 = 0.3·class 1 + 0.7·class 2, row 1 = one-hot class 0.
    −log p_1 = −log p_2 + 1 in row 0 (logits 2 vs 3), so the soft CE is CE + 0.3/2 = CE + 0.15."""
    soft = torch.tensor([[0.0, 0.3, 0.7], [1.0, 0.0, 0.0]])
    assert close(build_objective("ce")(StudentOutput(S), soft).total, CE + 0.15)
    out = build_objective("kd", temperature=2.0, alpha=0.5)(StudentOutput(S), soft, TeacherOutput(T_))
    assert close(out.total, 0.5 * (CE + 0.15) + 0.5 * 4.0 * KL_T2)
    # one-hot soft targets equal integer targets
    one_hot = F.one_hot(Y, 3).float()
    assert close(build_objective("ce")(StudentOutput(S), one_hot).total, CE)


def test_terms_are_detached() -> None:
    student = S.clone().requires_grad_(True)
    out = build_objective("kd")(StudentOutput(student), Y, TeacherOutput(T_))
    assert out.total.requires_grad
    assert not any(v.requires_grad for v in out.terms.values())


@pytest.mark.parametrize("name,knob", [(m, k) for m in METHODS.names() for k in METHODS.get(m).knobs()])
def test_every_knob_of_every_method_refuses_a_value_of_the_wrong_kind_by_name(name: str, knob: str) -> None:
    """No hand-kept list: each registered method's every knob is checked in ``__init__`` — a value of the
    wrong kind (a word for a number or a switch, a mapping for a list of layers, a word or an optional number) is a
    ``ValueError`` that names the knob, before any training."""
    default = METHODS.get(name).knobs()[knob]
    wrong: object = "not-a-number" if isinstance(default, (int, float)) else {"not": "valid"}
    with pytest.raises(ValueError, match=re.escape(knob)):
        METHODS.get(name)(**{knob: wrong})
