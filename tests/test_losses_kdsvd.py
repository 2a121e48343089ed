"""KD-SVD (:mod:`kdlib.losses.kdsvd`) against mdistiller's code, its layout, its pieces by hand, and its guards.

The reference functions below are copied verbatim from mdistiller (megvii-research/mdistiller,
``mdistiller/distillers/KDSVD.py`` at a08d46f10d6102bd6e3f258ca5ac880b020ea259; MIT License, Copyright (c) 2022
MEGVII Research); only their names carry an ``md_`` prefix. mdistiller's ``svd`` flattens with
``feat.view(B, size[1]·size[2], size[3])``, the author's TensorFlow ``reshape(X, [B, H·W, C])``
(github.com/sseung0703/KD_methods_with_TF ``nets/SVP.py``, 9fb5414) applied to a channels-first tensor; fed
NHWC maps it computes the original's arithmetic, which is how it is compared here (values and gradients into
the student's maps). Largest relative differences seen on these batches (float32, CPU): loss 0 (bitwise equal),
gradients 4.3e-7; against the float64 numpy
formula, loss 3e-7 (printed by ``pytest -s``).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import kdlib.models  # noqa: F401 - registers cnn_small with timm
from kdlib.distill import plan_layers
from kdlib.losses import METHODS
from kdlib.losses.base import SetupContext
from kdlib.losses.kdsvd import Connector, _GuardedSVD, align_rsv, kdsvd_loss, rbf, truncated_svd
from kdlib.losses.registry import StudentOutput, TeacherOutput
from kdlib.taps import PRE_LOGITS, LayerTaps


# ---- mdistiller (MIT), verbatim -------------------------------------------------------------------------
def md_kdsvd_loss(g_s, g_t, k):
    v_sb = None
    v_tb = None
    losses = []
    for i, f_s, f_t in zip(range(len(g_s)), g_s, g_t):
        u_t, s_t, v_t = md_svd(f_t, k)
        u_s, s_s, v_s = md_svd(f_s, k + 3)
        v_s, v_t = md_align_rsv(v_s, v_t)
        s_t = s_t.unsqueeze(1)
        v_t = v_t * s_t
        v_s = v_s * s_t

        if i > 0:
            s_rbf = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)).pow(2) / 8)
            t_rbf = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)).pow(2) / 8)

            l2loss = (s_rbf - t_rbf.detach()).pow(2)
            l2loss = torch.where(
                torch.isfinite(l2loss), l2loss, torch.zeros_like(l2loss)
            )
            losses.append(l2loss.sum())

        v_tb = v_t
        v_sb = v_s

    bsz = g_s[0].shape[0]
    losses = [l / bsz for l in losses]
    return sum(losses)


def md_svd(feat, n=1):
    size = feat.shape
    assert len(size) == 4

    x = feat.view(size[0], size[1] * size[2], size[3]).float()
    u, s, v = torch.svd(x)

    u = md_removenan(u)
    s = md_removenan(s)
    v = md_removenan(v)

    if n > 0:
        u = F.normalize(u[:, :, :n], dim=1)
        s = F.normalize(s[:, :n], dim=1)
        v = F.normalize(v[:, :, :n], dim=1)

    return u, s, v


def md_removenan(x):
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    return x


def md_align_rsv(a, b):
    cosine = torch.matmul(a.transpose(-2, -1), b)
    max_abs_cosine, _ = torch.max(torch.abs(cosine), 1, keepdim=True)
    mask = torch.where(
        torch.eq(max_abs_cosine, torch.abs(cosine)),
        torch.sign(cosine),
        torch.zeros_like(cosine),
    )
    a = torch.matmul(a, mask)
    return a, b
# ---- end of mdistiller's code ---------------------------------------------------------------------------


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """An NCHW map as the original's NHWC tensor (what mdistiller's view then flattens to (B, H·W, C))."""
    return t.permute(0, 2, 3, 1).contiguous()


def maps(seed: int, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).relu() for s in shapes]


# (student maps, teacher maps, k): equal widths per pair (the original's requirement), unequal sizes; three
# layers down to 2×2 and 1×1 maps; k = 2
CASES = [
    ([(8, 16, 8, 8), (8, 32, 4, 4)], [(8, 16, 4, 4), (8, 32, 2, 2)], 1),
    ([(6, 8, 7, 7), (6, 16, 2, 2), (6, 32, 1, 1)], [(6, 8, 4, 4), (6, 16, 2, 2), (6, 32, 1, 1)], 1),
    ([(8, 16, 8, 8), (8, 32, 4, 4)], [(8, 16, 8, 8), (8, 32, 4, 4)], 2),
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_kdsvd_equals_mdistillers_loss_on_nhwc_maps(case: int) -> None:
    s_shapes, t_shapes, k = CASES[case]
    student, teacher = maps(case, s_shapes), maps(case + 10, t_shapes)
    a = [t.clone().requires_grad_(True) for t in student]
    b = [t.clone().requires_grad_(True) for t in student]
    mine = METHODS.get("kdsvd")(k=k).feature_loss(a, [t.clone() for t in teacher])
    ref = md_kdsvd_loss([nhwc(t) for t in b], [nhwc(t) for t in teacher], k)
    assert math.isfinite(float(mine.detach())) and float(ref.detach()) > 1e-3  # a loss that can disagree
    torch.testing.assert_close(mine, ref, rtol=1e-6, atol=0)
    mine.backward()
    ref.backward()
    diffs = []
    for x, y in zip(a, b):
        assert float(y.grad.abs().max()) > 0
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-7)
        diffs.append(rel(x.grad, y.grad))
    print(f"case {case}: loss rel diff {rel(mine.detach(), ref.detach()):.1e}, grads {max(diffs):.1e}")


def test_mdistillers_raw_view_decomposes_width_not_channels() -> None:
    """mdistiller's ``view(B, C·H, W)`` on an NCHW map: its right singular vectors run over the width, and
    on the same NCHW batches its loss is another number than the original layout's."""
    student, teacher = maps(3, [(8, 16, 8, 6), (8, 32, 4, 6)]), maps(4, [(8, 16, 8, 6), (8, 32, 4, 6)])
    assert md_svd(student[0], 1)[2].shape == (8, 6, 1)  # W = 6 entries, not C = 16
    assert truncated_svd(student[0], 1)[1].shape == (8, 16, 1)
    # the view is a (C·H)×W matrix: rows are (channel, row) pairs, as a hand reshape shows
    torch.testing.assert_close(md_svd(student[0], 0)[1], torch.linalg.svdvals(student[0].reshape(8, 16 * 8, 6)))
    ours = float(kdsvd_loss(student, teacher))
    raw = float(md_kdsvd_loss(student, teacher, 1))
    assert ours == pytest.approx(float(md_kdsvd_loss([nhwc(t) for t in student], [nhwc(t) for t in teacher], 1)),
                                 rel=1e-6)
    assert abs(raw - ours) > 0.05 * max(abs(raw), abs(ours))


# ------------------------------------------------------------------ the pieces, by hand

def test_rbf_on_hand_computed_values() -> None:
    v = torch.tensor([[[1.0], [3.0]]])  # (B=1, D=2, k=1)
    before = torch.tensor([[[-1.0], [1.0], [0.5]]])  # (1, 3, 1)
    expected = torch.tensor([[math.exp(-4 / 8), 1.0, math.exp(-0.25 / 8)],
                             [math.exp(-16 / 8), math.exp(-4 / 8), math.exp(-6.25 / 8)]])
    torch.testing.assert_close(rbf(v, before), expected.reshape(1, 2, 3, 1))


def test_align_picks_the_most_similar_student_vector_with_its_sign() -> None:
    e = torch.eye(3)
    student = torch.stack([e[0], -e[1], (e[1] + e[2]) / math.sqrt(2)], dim=1).unsqueeze(0)  # columns
    teacher = torch.stack([e[1], e[2]], dim=1).unsqueeze(0)
    # teacher e1: |cos| 1 with −e1 (flipped), 0.707 with (e1+e2)/√2; teacher e2: 0.707 with the third only
    expected = torch.stack([e[1], (e[1] + e[2]) / math.sqrt(2)], dim=1).unsqueeze(0)
    torch.testing.assert_close(align_rsv(student, teacher), expected)


def test_truncated_svd_of_a_rank_one_map_is_its_channel_profile() -> None:
    """A map ``F[c, h, w] = a[h, w]·b[c]`` is the (H·W)×C matrix ``a bᵀ``: one singular vector, ±b/‖b‖."""
    a, b = torch.rand(3, 4) + 0.1, torch.tensor([3.0, 0.0, 4.0, 0.0, 0.0])
    s, v = truncated_svd((b[:, None, None] * a[None]).unsqueeze(0), 2)
    torch.testing.assert_close(s, torch.tensor([[1.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(v[0, :, 0].abs(), b / 5, atol=1e-6, rtol=0)


def _numpy_kdsvd(student: list[np.ndarray], teacher: list[np.ndarray], k: int, signs: list[np.ndarray]) -> float:
    """The paper's loss from the formula, in float64 numpy, independent of both codes: per image, the map as
    (H·W)×C, top right singular vectors, student's matched to the teacher's by |cos| with its sign.

    A singular vector's sign is arbitrary, and the relation of two layers' vectors depends on the teacher's
    (so does the original's loss: it takes whatever sign LAPACK returns); ``signs[l][i]`` holds, per teacher
    vector, the vectors the other code chose (``(C, k)``), and this reference adopts their signs."""
    total = 0.0
    for i in range(student[0].shape[0]):
        prev = None
        for f_s, f_t, sign in zip(student, teacher, signs):
            x_s = f_s[i].transpose(1, 2, 0).reshape(-1, f_s.shape[1])
            x_t = f_t[i].transpose(1, 2, 0).reshape(-1, f_t.shape[1])
            _, sv_t, vh_t = np.linalg.svd(x_t, full_matrices=False)
            _, _, vh_s = np.linalg.svd(x_s, full_matrices=False)
            v_t, v_s = vh_t[:k].T, vh_s[:k + 3].T
            agree = (v_t * sign[i]).sum(0)
            assert np.allclose(np.abs(agree), 1.0, atol=1e-4)  # the same vectors, up to their sign
            v_t = v_t * np.sign(agree)
            cos = v_s.T @ v_t
            best = np.abs(cos).argmax(axis=0)
            v_s = v_s[:, best] * np.sign(cos[best, np.arange(k)])
            sigma = sv_t[:k] / np.linalg.norm(sv_t[:k])
            v_t, v_s = v_t * sigma, v_s * sigma
            if prev is not None:
                r_s = np.exp(-(v_s[:, None, :] - prev[0][None, :, :]) ** 2 / 8)
                r_t = np.exp(-(v_t[:, None, :] - prev[1][None, :, :]) ** 2 / 8)
                total += ((r_s - r_t) ** 2).sum()
            prev = (v_s, v_t)
    return total / student[0].shape[0]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_kdsvd_equals_the_papers_formula_in_float64_numpy(case: int) -> None:
    s_shapes, t_shapes, k = CASES[case]
    student, teacher = maps(case, s_shapes), maps(case + 10, t_shapes)
    signs = [truncated_svd(t, k)[1].double().numpy() for t in teacher]
    expected = _numpy_kdsvd([t.double().numpy() for t in student], [t.double().numpy() for t in teacher], k, signs)
    mine = float(kdsvd_loss(student, teacher, k))
    assert mine == pytest.approx(expected, rel=1e-4)
    print(f"case {case}: loss rel diff to float64 numpy {abs(mine - expected) / expected:.1e}")


# ------------------------------------------------------------------ the SVD's gradient and its guard

def test_guarded_svd_gradient_is_the_numerical_derivative() -> None:
    """Against finite differences (gradcheck, float64), on tall and wide matrices (the two branches)."""
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 9, 4), (2, 3, 7)]:
        x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
        w_v = torch.randn(shape[0], shape[2], 2, generator=g, dtype=torch.float64)
        w_s = torch.randn(shape[0], 2, generator=g, dtype=torch.float64)

        def f(x: torch.Tensor) -> torch.Tensor:
            s, v = _GuardedSVD.apply(x)
            v = v[..., :2] * torch.sign(v[..., :1, :2])  # the sign the SVD picks is arbitrary: fix it
            return (v * w_v).sum() + (s[..., :2] * w_s).sum()

        assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_a_zero_map_gives_mdistiller_a_nan_gradient_and_this_method_a_finite_one() -> None:
    """A student map that is all zeros (a dead stage): 0/0 in PyTorch's SVD backward reaches mdistiller's
    gradient (its removenan only cleans the forward); the guarded one is finite."""
    student, teacher = maps(5, [(4, 8, 2, 2), (4, 16, 2, 2)]), maps(6, [(4, 8, 2, 2), (4, 16, 2, 2)])
    student[1] = torch.zeros_like(student[1])
    a = [t.clone().requires_grad_(True) for t in student]
    b = [t.clone().requires_grad_(True) for t in student]
    md_kdsvd_loss([nhwc(t) for t in b], [nhwc(t) for t in teacher], 1).backward()
    assert not all(bool(t.grad.isfinite().all()) for t in b)
    loss = kdsvd_loss(a, teacher)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and all(bool(t.grad.isfinite().all()) for t in a)


@pytest.mark.parametrize("size", [1, 2])
def test_tiny_maps_give_a_finite_loss_and_gradient(size: int) -> None:
    student = [t.requires_grad_(True) for t in maps(7, [(4, 8, size, size), (4, 16, size, size)])]
    teacher = maps(8, [(4, 8, 1, 1), (4, 16, size, size)])
    loss = kdsvd_loss(student, teacher)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and all(bool(t.grad.isfinite().all()) for t in student)


# ------------------------------------------------------------------ the method on real models

def _step(method, student: nn.Module, teacher: nn.Module, plan) -> tuple[dict, torch.Tensor]:
    method.setup(SetupContext(0, teacher, lambda: torch.zeros(0), plan))
    x, y = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.arange(8)
    logits, layers = LayerTaps(student, method.student_layer_paths()).forward(x)
    with torch.no_grad():
        t_logits, t_layers = LayerTaps(teacher, plan.teacher).forward(x)
    out = method(StudentOutput(logits, layers=layers), y, TeacherOutput(t_logits, layers=t_layers))
    out.total.backward()
    return out.terms, student.features[0].weight.grad


def test_default_pairing_cnn_small_to_resnet18_builds_connectors_and_trains_a_step() -> None:
    """cnn_small's last two stages (64×14×14, 64×7×7) against resnet18's (256×2×2, 512×1×1): the widths differ,
    so each pair gets a 1×1 conv + BN connector, the method's own parameters; one step is finite and reaches the
    student's first convolution and the connectors."""
    torch.manual_seed(0)
    student = timm.create_model("cnn_small", num_classes=10, in_chans=1)
    teacher = timm.create_model("resnet18", num_classes=10, in_chans=1).eval()
    method = METHODS.get("kdsvd")()
    plan = plan_layers(method, student, teacher, (1, 28), (1, 28))
    assert plan.student_shapes == ((64, 14, 14), (64, 7, 7)) and plan.teacher_shapes == ((256, 2, 2), (512, 1, 1))
    terms, grad = _step(method, student, teacher, plan)
    assert set(terms) == {"ce", "svd"} and all(math.isfinite(float(v)) for v in terms.values())
    assert float(terms["svd"]) > 0 and grad is not None and float(grad.abs().sum()) > 0
    assert [type(c) for c in method.connectors] == [Connector, Connector]
    assert method.connectors[1].conv.weight.shape == (512, 64, 1, 1)
    params = method.trainable_parameters()
    assert len(params) == 6 and all(p.grad is not None and bool(p.grad.isfinite().all()) for p in params)


def test_equal_widths_get_no_connector() -> None:
    torch.manual_seed(0)
    student = timm.create_model("cnn_small", num_classes=10, in_chans=1)
    teacher = timm.create_model("cnn_small", num_classes=10, in_chans=1).eval()
    method = METHODS.get("kdsvd")(student_layers=[0, 1, 2], teacher_layers=[0, 1, 2])
    plan = plan_layers(method, student, teacher, (1, 28), (1, 28))
    terms, grad = _step(method, student, teacher, plan)
    assert all(isinstance(c, nn.Identity) for c in method.connectors) and method.trainable_parameters() == []
    assert math.isfinite(float(terms["svd"])) and float(grad.abs().sum()) > 0


def test_refusals_name_the_knob_or_the_layer() -> None:
    student = timm.create_model("cnn_small", num_classes=10, in_chans=1)
    teacher = timm.create_model("resnet18", num_classes=10, in_chans=1)
    for bad in (0, 1.5, True, "1"):
        with pytest.raises(ValueError, match="k .*integer >= 1"):
            METHODS.get("kdsvd")(k=bad)
    with pytest.raises(ValueError, match="at least 2 layer pairs"):
        plan_layers(METHODS.get("kdsvd")(student_layers=[2], teacher_layers=[4]), student, teacher, (1, 28), (1, 28))
    with pytest.raises(ValueError, match=r"layer4 \(512×1×1\) has only 1"):
        plan_layers(METHODS.get("kdsvd")(k=2), student, teacher, (1, 28), (1, 28))
    with pytest.raises(ValueError, match="compares \\(C, H, W\\) feature maps"):
        plan_layers(METHODS.get("kdsvd")(student_layers=[2, PRE_LOGITS], teacher_layers=[3, PRE_LOGITS]),
                    student, teacher, (1, 28), (1, 28))
    with pytest.raises(ValueError, match="no connector is built"):
        METHODS.get("kdsvd")().feature_loss(maps(0, [(2, 8, 2, 2), (2, 8, 2, 2)]), maps(1, [(2, 4, 2, 2), (2, 8, 2, 2)]))
