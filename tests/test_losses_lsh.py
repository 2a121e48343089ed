"""Feature mimicking of LSHFM (Wang, Ge, Wu, TPAMI 2021): ``LSHHyperplanes``,
``fit_lsh_hyperplanes``, ``lsh_loss``, ``l2_loss`` and the methods ``l2``, ``lsh``, ``lshl2``,
``lshl2_s``.

Hand-checked example (softplus(x) = log(1 + eˣ); BCEWithLogits(z, y) = softplus(z) − y·z):

    W = [[1, 0], [0, 1], [1, −1]], b = [0, −0.5, 0.25]
    f_t = [[1, 1], [−1, 2]]   → W f_t + b = [[1, 0.5, 0.25], [−1, 1.5, −2.75]] → bits [[1,1,1], [0,1,0]]
    f_s = [[0.5, 0], [0, 1]]  → W f_s + b = [[0.5, −0.5, 0.75], [0, 0.5, −0.75]]
    BCE row 0 (bits 1,1,1): softplus(−0.5), softplus(0.5), softplus(−0.75) = 0.474077, 0.974077, 0.386871
        → mean 0.6116749914917046
    BCE row 1 (bits 0,1,0): softplus(0), softplus(−0.5), softplus(−0.75) = 0.693147, 0.474077, 0.386871
        → mean 0.5180317236183172;  L_LSH = 0.5648533575550109
    L2: (f_s − f_t)² rows [0.25 + 1, 1 + 1] → per sample [0.625, 1.0], L2 = 3.25 / 4 = 0.8125
    student = teacher: BCE = softplus(−|z|) over the 6 teacher projections → 0.3233201076802245
Class logits Z = [[1, 0], [0, 2]], labels [0, 1]: CE = (softplus(−1) + softplus(−2))/2 = 0.22009484928059768.
(All values also computed with numpy float64.)
"""
from __future__ import annotations

import math

import pytest
import torch

from kdlib.losses import (
    LSHHyperplanes,
    StudentOutput,
    TeacherOutput,
    build_objective,
    fit_lsh_hyperplanes,
    l2_loss,
    lsh_loss,
    lsh_loss_per_sample,
    lshl2_loss,
    lshl2_s_loss,
)
from kdlib.losses.base import SetupContext
from kdlib.losses.l2 import L2Loss
from kdlib.losses.lsh import LSHLoss, LSHMethodBase
from kdlib.losses.lshl2 import LSHL2Loss
from kdlib.losses.lshl2_s import LSHL2SLoss

W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
B = torch.tensor([0.0, -0.5, 0.25])
F_T = torch.tensor([[1.0, 1.0], [-1.0, 2.0]])
F_S = torch.tensor([[0.5, 0.0], [0.0, 1.0]])
Z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
Y = torch.tensor([0, 1])

LSH_ROWS = (0.6116749914917046, 0.5180317236183172)
LSH = 0.5648533575550109
L2_ROWS = (0.625, 1.0)
L2 = 0.8125
LSH_SELF = 0.3233201076802245
CE = 0.22009484928059768

FEATURE_METHODS = ("l2", "lsh", "lshl2", "lshl2_s")
LSH_METHODS = ("lsh", "lshl2", "lshl2_s")


def planes() -> LSHHyperplanes:
    return LSHHyperplanes(W, B)


def gaussian(m: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(m, d, generator=torch.Generator().manual_seed(seed))


def objective(name: str, **kwargs) -> torch.nn.Module:
    obj = build_objective(name, **kwargs)
    if isinstance(obj, LSHMethodBase):
        obj.lsh = planes()
    return obj


# ------------------------------------------------------------------ hyperplanes and pure losses


def test_projection_and_bits_by_hand() -> None:
    h = planes()
    assert torch.equal(h.project(F_T), torch.tensor([[1.0, 0.5, 0.25], [-1.0, 1.5, -2.75]]))
    assert torch.equal(h.bits(F_T), torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]))
    assert h.num_hyperplanes == 3 and h.dim == 2


def test_lsh_loss_golden_values() -> None:
    assert torch.allclose(lsh_loss_per_sample(F_S, F_T, planes()), torch.tensor(LSH_ROWS), atol=1e-6)
    assert float(lsh_loss(F_S, F_T, planes())) == pytest.approx(LSH, abs=1e-6)


def test_lsh_loss_of_the_teacher_itself_is_bce_of_its_bits_against_its_logits() -> None:
    assert float(lsh_loss(F_T, F_T, planes())) == pytest.approx(LSH_SELF, abs=1e-6)
    # and in general: BCE(z, 1[z > 0]) = softplus(−|z|)
    h = fit_lsh_hyperplanes(gaussian(40, 8, 0), None, num_hyperplanes=64, sigma=0.5)
    f = gaussian(10, 8, 1)
    z = h.project(f).double()
    assert float(lsh_loss(f, f, h)) == pytest.approx(float(torch.log1p(torch.exp(-z.abs())).mean()), abs=1e-6)


def test_l2_loss_golden_value_and_normalisation() -> None:
    assert float(l2_loss(F_S, F_T)) == pytest.approx(L2)
    f_s, f_t = gaussian(5, 7, 2), gaussian(5, 7, 3)
    assert float(l2_loss(f_s, f_t)) == pytest.approx(float(((f_s - f_t) ** 2).sum()) / 35, rel=1e-6)
    assert float(l2_loss(f_t, f_t)) == 0.0


def test_lshl2_is_l2_plus_lsh() -> None:
    assert float(lshl2_loss(F_S, F_T, planes())) == pytest.approx(L2 + LSH, abs=1e-6)
    out = objective("lshl2", beta=1.0, gamma=0.0)(StudentOutput(Z, features=F_S), Y, TeacherOutput(Z, features=F_T))
    l2 = objective("l2", beta=1.0, gamma=0.0)(StudentOutput(Z, features=F_S), Y, TeacherOutput(Z, features=F_T))
    lsh = objective("lsh", beta=1.0, gamma=0.0)(StudentOutput(Z, features=F_S), Y, TeacherOutput(Z, features=F_T))
    assert torch.allclose(out.total, l2.total + lsh.total)


def test_no_gradient_into_hyperplanes_or_teacher_features() -> None:
    h = fit_lsh_hyperplanes(gaussian(30, 4, 0), gaussian(3, 4, 1))
    assert list(h.parameters()) == [] and {n for n, _ in h.named_buffers()} == {"weight", "bias"}
    assert not h.weight.requires_grad and not h.bias.requires_grad
    f_s = gaussian(6, 4, 2).requires_grad_(True)
    f_t = gaussian(6, 4, 3).requires_grad_(True)
    logits = gaussian(6, 3, 4).requires_grad_(True)
    t_logits = gaussian(6, 3, 5).requires_grad_(True)
    for name in LSH_METHODS:
        obj = build_objective(name)
        obj.lsh = h
        obj(StudentOutput(logits, features=f_s), torch.tensor([0, 1, 2, 0, 1, 2]),
            TeacherOutput(t_logits, features=f_t)).total.backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert f_t.grad is None and t_logits.grad is None
    assert h.weight.grad is None and h.bias.grad is None


def test_state_dict_round_trip() -> None:
    h = fit_lsh_hyperplanes(gaussian(20, 3, 0), None, num_hyperplanes=5, sigma=1.0)
    again = LSHHyperplanes.from_state_dict(h.state_dict())
    assert torch.equal(again.weight, h.weight) and torch.equal(again.bias, h.bias)


# ------------------------------------------------------------------ fitting


def test_median_bias_balances_every_bit_exactly_for_even_m() -> None:
    features = gaussian(200, 16, 0)  # continuous draws: distinct projections
    h = fit_lsh_hyperplanes(features, None, sigma=0.3, seed=1)
    counts = h.bits(features).sum(dim=0)
    assert h.num_hyperplanes == 32 * 16
    assert torch.all(counts == 100)  # each hyperplane splits the fitting set 100 : 100
    # b_j = −(midpoint of the two middle values of w_j·f_i), checked in float64
    middle = (features.double() @ h.weight.double().T).sort(dim=0).values[99:101].mean(dim=0)
    assert torch.allclose(h.bias.double(), -middle, atol=1e-5)


def test_median_bias_for_odd_m_is_within_one_of_half() -> None:
    features = gaussian(101, 8, 0)
    counts = fit_lsh_hyperplanes(features, None, sigma=1.0).bits(features).sum(dim=0)
    assert torch.all((counts - 50.5).abs() <= 0.5)  # 50 or 51
    # on a fresh draw from the same distribution the bits stay about balanced
    fresh = fit_lsh_hyperplanes(features, None, sigma=1.0).bits(gaussian(4000, 8, 9)).mean()
    assert abs(float(fresh) - 0.5) < 0.05


def test_mean_and_zero_bias() -> None:
    features = gaussian(300, 6, 0) + 2.0  # off-centre, so mean/zero/median biases differ
    classifier = gaussian(4, 6, 1)
    mean = fit_lsh_hyperplanes(features, classifier, bias="mean", seed=3)
    zero = fit_lsh_hyperplanes(features, classifier, bias="zero", seed=3)
    median = fit_lsh_hyperplanes(features, classifier, bias="median", seed=3)
    assert torch.equal(mean.weight, zero.weight) and torch.equal(zero.weight, median.weight)
    assert torch.count_nonzero(zero.bias) == 0
    # mean bias: the projections average to 0 over the fitting set, b = −W·mean(f)
    assert torch.allclose(mean.project(features).mean(dim=0), torch.zeros(6 * 32), atol=1e-4)
    assert torch.allclose(mean.bias, -(mean.weight.double() @ features.double().mean(0)).float(), atol=1e-5)
    assert not torch.allclose(mean.bias, median.bias, atol=1e-3)


def test_defaults_n_is_32_d_and_sigma_is_the_classifier_weight_std() -> None:
    classifier = gaussian(10, 64, 0) * 0.07 + 0.01
    h = fit_lsh_hyperplanes(gaussian(20, 64, 1), classifier)
    assert h.weight.shape == (32 * 64, 64) and h.bias.shape == (32 * 64,)
    sigma = float(classifier.std())
    # 131,072 draws: the sample std is within ~0.2 % (one s.e.) of σ; allow 1 %
    assert float(h.weight.std()) == pytest.approx(sigma, rel=0.01)
    assert abs(float(h.weight.mean())) < 0.01 * sigma
    assert h.weight.dtype == torch.float32
    explicit = fit_lsh_hyperplanes(gaussian(20, 64, 1), classifier, sigma=2 * sigma)
    assert torch.allclose(explicit.weight, 2 * h.weight, rtol=1e-5)  # same draw, scaled


def test_deterministic_for_a_seed() -> None:
    features = gaussian(50, 8, 0)
    a = fit_lsh_hyperplanes(features, None, num_hyperplanes=40, sigma=1.0, seed=7)
    b = fit_lsh_hyperplanes(features, None, num_hyperplanes=40, sigma=1.0, seed=7)
    c = fit_lsh_hyperplanes(features, None, num_hyperplanes=40, sigma=1.0, seed=8)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)
    # W is the seeded CPU generator's N(0, 1) draw times σ
    assert torch.equal(a.weight, torch.randn(40, 8, generator=torch.Generator().manual_seed(7)))


@pytest.mark.parametrize("m", [37, 64])
def test_chunked_median_equals_unchunked(m: int) -> None:
    features = gaussian(m, 5, 0)
    full = fit_lsh_hyperplanes(features, None, num_hyperplanes=23, sigma=1.0, chunk_size=23)
    for chunk in (1, 4, 7, None):
        part = fit_lsh_hyperplanes(features, None, num_hyperplanes=23, sigma=1.0, chunk_size=chunk)
        assert torch.allclose(part.bias, full.bias, atol=1e-6, rtol=0)


def test_fit_errors() -> None:
    features = gaussian(10, 4, 0)
    with pytest.raises(ValueError, match="sigma"):
        fit_lsh_hyperplanes(features, None)
    with pytest.raises(ValueError, match="bias"):
        fit_lsh_hyperplanes(features, None, sigma=1.0, bias="max")
    with pytest.raises(ValueError, match="num_hyperplanes"):
        fit_lsh_hyperplanes(features, None, num_hyperplanes=0, sigma=1.0)
    with pytest.raises(ValueError, match="sigma"):
        fit_lsh_hyperplanes(features, torch.ones(3, 4))  # a constant classifier has std 0
    with pytest.raises(ValueError, match="teacher_features"):
        fit_lsh_hyperplanes(torch.zeros(4), None, sigma=1.0)


def test_module_fit_hyperplanes_uses_its_knobs() -> None:
    obj = build_objective("lshl2", num_hyperplanes=12, sigma=0.5, bias="zero")
    h = obj.fit_hyperplanes(gaussian(30, 4, 0), None, seed=2)
    assert obj.lsh is h and h.weight.shape == (12, 4) and torch.count_nonzero(h.bias) == 0
    assert torch.equal(h.weight, 0.5 * torch.randn(12, 4, generator=torch.Generator().manual_seed(2)))
    assert "lsh" in dict(obj.named_modules())  # registered: objective.to(device) moves it


@pytest.mark.parametrize("name", LSH_METHODS)
def test_setup_fits_the_same_hyperplanes_as_fit_hyperplanes(name: str) -> None:
    """``setup(SetupContext)`` is ``fit_hyperplanes(first-view features, teacher classifier weight,
    seed)``, and ``fitted_state()`` is what it fitted: the bias, the seed and the weight's std."""
    from kdlib.models import build_model

    torch.manual_seed(0)
    teacher = build_model("cnn_small", 3, 1).eval()  # pooled width 64, classifier Linear(64, 3)
    features = gaussian(30, 64, 0)
    calls = []

    def first_view_features() -> torch.Tensor:
        calls.append(1)
        return features

    knobs = {"num_hyperplanes": 48, "bias": "median"}  # sigma None: the classifier weight's std
    obj = build_objective(name, **knobs)
    assert obj.lsh is None and obj.fitted_state() == {}
    obj.setup(SetupContext(seed=5, teacher=teacher, first_view_features=first_view_features))
    assert len(calls) == 1
    reference = build_objective(name, **knobs)
    expected = reference.fit_hyperplanes(features, teacher.get_classifier().weight, 5)
    assert isinstance(obj.lsh, LSHHyperplanes) and obj.lsh.weight.shape == (48, 64)
    assert torch.equal(obj.lsh.weight, expected.weight) and torch.equal(obj.lsh.bias, expected.bias)
    assert "lsh" in dict(obj.named_modules())  # installed where objective.to(device) moves it
    state = obj.fitted_state()
    assert set(state) == {"bias", "seed", "weight_std"}
    assert torch.equal(state["bias"], expected.bias) and state["seed"] == 5
    assert state["weight_std"] == float(expected.weight.std())
    assert state["weight_std"] == pytest.approx(float(teacher.get_classifier().weight.detach().std()), rel=0.1)
    ref_state = reference.fitted_state()  # fit_hyperplanes records the same state
    assert torch.equal(ref_state["bias"], state["bias"])
    assert (ref_state["seed"], ref_state["weight_std"]) == (state["seed"], state["weight_std"])
    # a different seed draws different hyperplanes
    other = build_objective(name, **knobs)
    other.setup(SetupContext(seed=6, teacher=teacher, first_view_features=first_view_features))
    assert not torch.equal(other.lsh.weight, obj.lsh.weight) and other.fitted_state()["seed"] == 6


def test_setup_of_a_distilled_teacher_uses_its_class_head() -> None:
    from kdlib.models import build_model

    torch.manual_seed(0)
    teacher = build_model("deit_tiny_distilled_patch16_224", 3, 1, img_size=16, patch_size=8, depth=1).eval()
    head, _dist_head = teacher.get_classifier()  # (class head, distillation head)
    features = gaussian(20, head.in_features, 1)
    obj = build_objective("lshl2", num_hyperplanes=16)
    obj.setup(SetupContext(seed=3, teacher=teacher, first_view_features=lambda: features))
    expected = fit_lsh_hyperplanes(features, head.weight, num_hyperplanes=16, seed=3)
    assert torch.equal(obj.lsh.weight, expected.weight) and torch.equal(obj.lsh.bias, expected.bias)


@pytest.mark.parametrize("name", ["l2", "kd", "ce"])
def test_methods_without_fitted_state_do_not_compute_teacher_features(name: str) -> None:
    def never() -> torch.Tensor:
        raise AssertionError("first_view_features must not be computed")

    obj = build_objective(name)
    obj.setup(SetupContext(seed=0, teacher=torch.nn.Linear(2, 2), first_view_features=never))
    assert obj.fitted_state() == {}


# ------------------------------------------------------------------ methods


def test_method_golden_values_and_terms() -> None:
    student, teacher = StudentOutput(Z, features=F_S), TeacherOutput(Z, features=F_T)
    out = objective("l2", beta=0.5, gamma=2.0)(student, Y, teacher)
    assert set(out.terms) == {"ce", "l2"}
    assert float(out.total) == pytest.approx(2 * CE + 0.5 * L2, abs=1e-6)
    out = objective("lsh", beta=0.5, gamma=2.0)(student, Y, teacher)
    assert set(out.terms) == {"ce", "lsh"}
    assert float(out.terms["lsh"]) == pytest.approx(LSH, abs=1e-6)
    assert float(out.total) == pytest.approx(2 * CE + 0.5 * LSH, abs=1e-6)
    out = objective("lshl2", beta=3.0)(student, Y, teacher)
    assert set(out.terms) == {"ce", "l2", "lsh"}
    assert float(out.total) == pytest.approx(CE + 3 * (L2 + LSH), abs=1e-6)
    # the teacher (Z) is right on both samples: lshl2_s equals lshl2 here
    out_s = objective("lshl2_s", beta=3.0)(student, Y, teacher)
    assert float(out_s.total) == pytest.approx(CE + 3 * (L2 + LSH), abs=1e-6)


def test_lshl2_s_averages_over_the_samples_the_teacher_gets_right() -> None:
    wrong_on_1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # argmax [0, 0] vs labels [0, 1]
    expected = L2_ROWS[0] + LSH_ROWS[0]  # = 1.2366749914917046, sample 0 only
    assert float(lshl2_s_loss(F_S, F_T, wrong_on_1, Y, planes())) == pytest.approx(expected, abs=1e-6)
    obj = objective("lshl2_s", beta=1.0, gamma=0.0)
    base = obj(StudentOutput(Z, features=F_S), Y, TeacherOutput(wrong_on_1, features=F_T)).total
    # changing the wrong sample's student and teacher features changes nothing
    f_s2, f_t2 = F_S.clone(), F_T.clone()
    f_s2[1], f_t2[1] = torch.tensor([5.0, -3.0]), torch.tensor([-2.0, 7.0])
    moved = obj(StudentOutput(Z, features=f_s2), Y, TeacherOutput(wrong_on_1, features=f_t2)).total
    assert torch.equal(base, moved)
    # ...but changing the right one does
    f_s2[0] = torch.tensor([3.0, 3.0])
    assert not torch.allclose(obj(StudentOutput(Z, features=f_s2), Y, TeacherOutput(wrong_on_1, features=f_t2)).total, base)
    # soft (mixed) targets: the label is the target's argmax
    soft = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    assert float(lshl2_s_loss(F_S, F_T, wrong_on_1, soft, planes())) == pytest.approx(expected, abs=1e-6)


def test_lshl2_s_is_zero_and_connected_when_the_teacher_is_always_wrong() -> None:
    f_s = F_S.clone().requires_grad_(True)
    always_wrong = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    out = objective("lshl2_s", beta=6.0, gamma=0.0)(StudentOutput(Z, features=f_s), Y, TeacherOutput(always_wrong, features=F_T))
    assert out.total.requires_grad
    assert float(out.total.detach()) == 0.0 and float(out.terms["l2"]) == 0.0 and float(out.terms["lsh"]) == 0.0
    out.total.backward()
    assert f_s.grad is not None and torch.count_nonzero(f_s.grad) == 0
    assert not math.isnan(float(out.total.detach()))


def test_multilabel_hard_term() -> None:
    multi_hot = torch.tensor([[1, 0], [1, 1]])
    out = objective("lshl2", multilabel=True)(StudentOutput(Z, features=F_S), multi_hot, TeacherOutput(Z, features=F_T))
    assert set(out.terms) == {"bce", "l2", "lsh"}
    bce = torch.nn.functional.binary_cross_entropy_with_logits(Z, multi_hot.float())
    assert torch.allclose(out.total, bce + L2 + LSH, atol=1e-6)


def test_missing_inputs_are_clear_errors() -> None:
    teacher = TeacherOutput(Z, features=F_T)
    with pytest.raises(RuntimeError, match="lsh"):
        build_objective("lsh")(StudentOutput(Z, features=F_S), Y, teacher)
    for name in FEATURE_METHODS:
        obj = objective(name)
        with pytest.raises(ValueError, match="StudentOutput.features"):
            obj(StudentOutput(Z), Y, teacher)
        with pytest.raises(ValueError, match="TeacherOutput.features"):
            obj(StudentOutput(Z, features=F_S), Y, TeacherOutput(Z))
        with pytest.raises(ValueError, match="teacher"):
            obj(StudentOutput(Z, features=F_S), Y, None)
        with pytest.raises(ValueError, match="feat_fc"):
            obj(StudentOutput(Z, features=torch.zeros(2, 3)), Y, teacher)


def test_class_attributes_and_stored_knobs() -> None:
    for cls in (L2Loss, LSHLoss, LSHL2Loss, LSHL2SLoss):
        assert cls.needs_teacher is True and cls.needs_features is True
        assert cls.uses_distillation_token is False
        # the LSH methods (and only they) share the hyperplane handling and take `lsh` as context
        assert issubclass(cls, LSHMethodBase) is (cls is not L2Loss)
        assert ("lsh" in cls.context_args) is (cls is not L2Loss) and "lsh" not in cls.knobs()
        assert not hasattr(cls, "needs_lsh")
    assert L2Loss.tasks == LSHLoss.tasks == LSHL2Loss.tasks == ("multiclass", "multilabel")
    assert LSHL2SLoss.tasks == ("multiclass",)
    obj = build_objective("lsh", beta=0.5, gamma=0.0, num_hyperplanes=2048, sigma=0.06, bias="mean", force_feat_fc=True)
    assert (obj.beta, obj.gamma, obj.num_hyperplanes, obj.sigma, obj.bias, obj.force_feat_fc) == (
        0.5, 0.0, 2048, 0.06, "mean", True)
    default = build_objective("lshl2_s")
    assert (default.beta, default.gamma, default.num_hyperplanes, default.sigma, default.bias,
            default.force_feat_fc, default.lsh) == (1.0, 1.0, None, None, "median", False, None)
    assert build_objective("l2", force_feat_fc=True).force_feat_fc is True


@pytest.mark.parametrize(
    "kwargs, knob",
    [
        ({"beta": -1.0}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"gamma": float("inf")}, "gamma"),
        ({"gamma": -0.5}, "gamma"),
        ({"force_feat_fc": "yes"}, "force_feat_fc"),
        ({"multilabel": 1}, "multilabel"),
    ],
)
@pytest.mark.parametrize("name", ["l2", "lsh", "lshl2"])
def test_feature_methods_refuse_bad_knobs(name: str, kwargs: dict, knob: str) -> None:
    with pytest.raises(ValueError, match=knob):
        build_objective(name, **kwargs)


@pytest.mark.parametrize(
    "kwargs, knob",
    [
        ({"num_hyperplanes": 0}, "num_hyperplanes"),
        ({"num_hyperplanes": 1.5}, "num_hyperplanes"),
        ({"num_hyperplanes": True}, "num_hyperplanes"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -0.1}, "sigma"),
        ({"bias": "max"}, "bias"),
        ({"lsh": torch.zeros(3)}, "lsh"),
    ],
)
@pytest.mark.parametrize("name", LSH_METHODS)
def test_lsh_methods_refuse_bad_setup_knobs(name: str, kwargs: dict, knob: str) -> None:
    with pytest.raises(ValueError, match=knob):
        build_objective(name, **kwargs)


def test_lshl2_s_is_single_label_only() -> None:
    with pytest.raises(ValueError, match="multilabel"):
        build_objective("lshl2_s", multilabel=True)


def test_error_message_names_value_and_range() -> None:
    with pytest.raises(ValueError, match=r"beta must be a finite number >= 0, got -1"):
        build_objective("lsh", beta=-1)
    with pytest.raises(ValueError, match=r"bias must be one of 'median', 'mean', 'zero'; got 'max'"):
        build_objective("lsh", bias="max")
