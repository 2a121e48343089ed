"""The feature-map methods (FitNet, AT, NST, SP, PKT, RKD) against mdistiller's own code, and the forward
hooks that feed them (:mod:`kdlib.taps`) against timm's ``forward_intermediates``.

The reference functions below are copied verbatim from mdistiller (megvii-research/mdistiller,
``mdistiller/distillers/{AT,NST,SP,PKT,RKD,FitNet,_common}.py`` at a08d46f; MIT License, Copyright (c) 2022
MEGVII Research); only their imports are shared. Each comparison runs both on the same fixed batches, the
loss values and the gradients they send into the student's features.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import kdlib.models  # noqa: F401 - registers cnn_small, rescnn, mlp with timm
from kdlib.distill import plan_layers
from kdlib.losses import METHODS
from kdlib.losses.at import at_loss
from kdlib.losses.base import SetupContext
from kdlib.losses.fitnet import ConvRegressor
from kdlib.losses.nst import nst_loss
from kdlib.losses.pkt import pkt_loss
from kdlib.losses.registry import Progress, StudentOutput, TeacherOutput
from kdlib.losses.rkd import rkd_loss
from kdlib.losses.sp import sp_loss
from kdlib.taps import PRE_LOGITS, LayerTaps, layer_shapes, resolve_layers, stage_modules
from stages.params import read_params

REPO = Path(__file__).resolve().parents[1]


# ---- mdistiller (MIT), verbatim -------------------------------------------------------------------------
def md_single_stage_at_loss(f_s, f_t, p):
    def _at(feat, p):
        return F.normalize(feat.pow(p).mean(1).reshape(feat.size(0), -1))

    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
    return (_at(f_s, p) - _at(f_t, p)).pow(2).mean()


def md_at_loss(g_s, g_t, p):
    return sum([md_single_stage_at_loss(f_s, f_t, p) for f_s, f_t in zip(g_s, g_t)])


def md_nst_loss(g_s, g_t):
    return sum([md_single_stage_nst_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)])


def md_single_stage_nst_loss(f_s, f_t):
    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))

    f_s = f_s.view(f_s.shape[0], f_s.shape[1], -1)
    f_s = F.normalize(f_s, dim=2)
    f_t = f_t.view(f_t.shape[0], f_t.shape[1], -1)
    f_t = F.normalize(f_t, dim=2)

    return (
        md_poly_kernel(f_t, f_t).mean().detach()
        + md_poly_kernel(f_s, f_s).mean()
        - 2 * md_poly_kernel(f_s, f_t).mean()
    )


def md_poly_kernel(a, b):
    a = a.unsqueeze(1)
    b = b.unsqueeze(2)
    res = (a * b).sum(-1).pow(2)
    return res


def md_sp_loss(g_s, g_t):
    return sum([md_similarity_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)])


def md_similarity_loss(f_s, f_t):
    bsz = f_s.shape[0]
    f_s = f_s.view(bsz, -1)
    f_t = f_t.view(bsz, -1)

    G_s = torch.mm(f_s, torch.t(f_s))
    G_s = torch.nn.functional.normalize(G_s)
    G_t = torch.mm(f_t, torch.t(f_t))
    G_t = torch.nn.functional.normalize(G_t)

    G_diff = G_t - G_s
    loss = (G_diff * G_diff).view(-1, 1).sum(0) / (bsz * bsz)
    return loss


def md_pkt_loss(f_s, f_t, eps=1e-7):
    # Normalize each vector by its norm
    output_net_norm = torch.sqrt(torch.sum(f_s**2, dim=1, keepdim=True))
    f_s = f_s / (output_net_norm + eps)
    f_s[f_s != f_s] = 0
    target_net_norm = torch.sqrt(torch.sum(f_t**2, dim=1, keepdim=True))
    f_t = f_t / (target_net_norm + eps)
    f_t[f_t != f_t] = 0

    # Calculate the cosine similarity
    model_similarity = torch.mm(f_s, f_s.transpose(0, 1))
    target_similarity = torch.mm(f_t, f_t.transpose(0, 1))
    # Scale cosine similarity to 0..1
    model_similarity = (model_similarity + 1.0) / 2.0
    target_similarity = (target_similarity + 1.0) / 2.0
    # Transform them into probabilities
    model_similarity = model_similarity / torch.sum(
        model_similarity, dim=1, keepdim=True
    )
    target_similarity = target_similarity / torch.sum(
        target_similarity, dim=1, keepdim=True
    )
    # Calculate the KL-divergence
    loss = torch.mean(
        target_similarity
        * torch.log((target_similarity + eps) / (model_similarity + eps))
    )
    return loss


def md_pdist(e, squared, eps):
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)

    if not squared:
        res = res.sqrt()

    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def md_rkd_loss(f_s, f_t, squared=False, eps=1e-12, distance_weight=25, angle_weight=50):
    stu = f_s.view(f_s.shape[0], -1)
    tea = f_t.view(f_t.shape[0], -1)

    # RKD distance loss
    with torch.no_grad():
        t_d = md_pdist(tea, squared, eps)
        mean_td = t_d[t_d > 0].mean()
        t_d = t_d / mean_td

    d = md_pdist(stu, squared, eps)
    mean_d = d[d > 0].mean()
    d = d / mean_d

    loss_d = F.smooth_l1_loss(d, t_d)

    # RKD Angle loss
    with torch.no_grad():
        td = tea.unsqueeze(0) - tea.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)

    sd = stu.unsqueeze(0) - stu.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)

    loss_a = F.smooth_l1_loss(s_angle, t_angle)

    loss = distance_weight * loss_d + angle_weight * loss_a
    return loss


class MdConvReg(nn.Module):
    """Convolutional regression"""

    def __init__(self, s_shape, t_shape, use_relu=True):
        super(MdConvReg, self).__init__()
        self.use_relu = use_relu
        s_N, s_C, s_H, s_W = s_shape
        t_N, t_C, t_H, t_W = t_shape
        if s_H == 2 * t_H:
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=3, stride=2, padding=1)
        elif s_H * 2 == t_H:
            self.conv = nn.ConvTranspose2d(s_C, t_C, kernel_size=4, stride=2, padding=1)
        elif s_H >= t_H:
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=(1 + s_H - t_H, 1 + s_W - t_W))
        else:
            raise NotImplemented("student size {}, teacher size {}".format(s_H, t_H))
        self.bn = nn.BatchNorm2d(t_C)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.conv(x)
        if self.use_relu:
            return self.relu(self.bn(x))
        else:
            return self.bn(x)
# ---- end of mdistiller's code ---------------------------------------------------------------------------


def maps(seed: int, shapes: list[tuple[int, ...]], relu: bool = True) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(*s, generator=g) for s in shapes]
    return [t.relu() if relu else t for t in out]


# (student maps, teacher maps): equal sizes, a larger student map, a larger teacher map
PAIRS = [
    ([(16, 8, 8, 8), (16, 16, 4, 4)], [(16, 32, 8, 8), (16, 64, 4, 4)]),
    ([(16, 8, 14, 14), (16, 16, 7, 7)], [(16, 32, 4, 4), (16, 64, 2, 2)]),
    ([(16, 8, 4, 4)], [(16, 32, 8, 8)]),
]


def compare(ours, theirs, student: list[torch.Tensor], teacher: list[torch.Tensor], rel: float = 1e-5) -> None:
    a = [t.clone().requires_grad_(True) for t in student]
    b = [t.clone().requires_grad_(True) for t in student]
    mine, ref = ours(a, [t.clone() for t in teacher]), theirs(b, [t.clone() for t in teacher])
    ref = ref.reshape(())
    assert math.isfinite(float(mine.detach()))
    assert float(mine.detach()) == pytest.approx(float(ref.detach()), rel=rel, abs=1e-9)
    mine.backward()
    ref.backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("case", range(len(PAIRS)))
@pytest.mark.parametrize("p", [2.0, 1.0])
def test_at_equals_mdistillers_at_loss(case: int, p: float) -> None:
    s_shapes, t_shapes = PAIRS[case]
    compare(METHODS.get("at")(p=p).feature_loss, lambda s, t: md_at_loss(s, t, p), maps(case, s_shapes),
            maps(case + 10, t_shapes))
    compare(lambda s, t: at_loss(s[0], t[0], p), lambda s, t: md_single_stage_at_loss(s[0], t[0], p),
            maps(case, s_shapes), maps(case + 10, t_shapes))


@pytest.mark.parametrize("case", range(len(PAIRS)))
def test_nst_equals_mdistillers_nst_loss(case: int) -> None:
    s_shapes, t_shapes = PAIRS[case]
    compare(METHODS.get("nst")().feature_loss, md_nst_loss, maps(case, s_shapes), maps(case + 10, t_shapes))
    compare(lambda s, t: nst_loss(s[0], t[0]), lambda s, t: md_single_stage_nst_loss(s[0], t[0]),
            maps(case, s_shapes), maps(case + 10, t_shapes))


@pytest.mark.parametrize("case", range(len(PAIRS)))
def test_sp_equals_mdistillers_sp_loss(case: int) -> None:
    s_shapes, t_shapes = PAIRS[case]
    compare(METHODS.get("sp")().feature_loss, md_sp_loss, maps(case, s_shapes), maps(case + 10, t_shapes))


@pytest.mark.parametrize("seed", range(3))
def test_pkt_equals_mdistillers_pkt_loss(seed: int) -> None:
    s, t = maps(seed, [(32, 64)], relu=False), maps(seed + 10, [(32, 512)])
    compare(lambda a, b: pkt_loss(a[0], b[0]), lambda a, b: md_pkt_loss(a[0], b[0]), s, t)
    # an all-zero student row (dead ReLUs): the same value, and a finite gradient where mdistiller's is NaN
    s[0][3] = 0.0
    a = s[0].clone().requires_grad_(True)
    value = pkt_loss(a, t[0])
    assert float(value.detach()) == pytest.approx(float(md_pkt_loss(s[0].clone(), t[0]).detach()), rel=1e-5)
    value.backward()
    assert torch.isfinite(a.grad).all()
    b = s[0].clone().requires_grad_(True)
    md_pkt_loss(b, t[0]).backward()
    assert torch.isnan(b.grad).any()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("squared", [False, True])
def test_rkd_equals_mdistillers_rkd_loss(seed: int, squared: bool) -> None:
    s, t = maps(seed, [(16, 64)], relu=False), maps(seed + 10, [(16, 512)])
    compare(lambda a, b: rkd_loss(a[0], b[0], squared, 1e-12, 25.0, 50.0),
            lambda a, b: md_rkd_loss(a[0], b[0], squared, 1e-12, 25, 50), s, t, rel=1e-4)


def test_pkt_and_sp_by_hand() -> None:
    """Independent of any code: two images in 2-D features."""
    # PKT: student rows (1,0),(0,1): cos 0 → similarity 1/2 off the diagonal, 1 on it → p = [[2/3,1/3],[1/3,2/3]];
    # teacher rows (1,0),(1,0): all similarities 1 → p = 1/2 everywhere
    f_s, f_t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    expected = (2 * 0.5 * math.log(0.5 / (2 / 3)) + 2 * 0.5 * math.log(0.5 / (1 / 3))) / 4
    assert float(pkt_loss(f_s, f_t)) == pytest.approx(expected, rel=1e-5)
    # SP: G_s = I → rows (1,0),(0,1); G_t = [[1,2],[2,4]] → rows (1,2)/√5, (1,2)/√5
    g_t = torch.tensor([[1.0, 2.0], [1.0, 2.0]]) / math.sqrt(5)
    expected = float(((g_t - torch.eye(2)) ** 2).sum()) / 4
    assert float(sp_loss(f_s, f_t)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("s_shape,t_shape", [((8, 8, 8), (16, 4, 4)), ((8, 4, 4), (16, 8, 8)),
                                             ((8, 7, 7), (16, 4, 4)), ((8, 4, 4), (16, 4, 4))])
def test_fitnet_equals_mdistillers_hint_with_the_same_regressor(s_shape, t_shape) -> None:
    """mdistiller's FitNet term ``FEAT_WEIGHT · mse(ConvReg(f_s), f_t)`` and its CE term, with our regressor
    given the weights of theirs; the gradient reaches the student's map and the regressor alike."""
    method = METHODS.get("fitnet")(ce_weight=1.0, feat_weight=100.0)
    torch.manual_seed(0)
    theirs = MdConvReg((1, *s_shape), (1, *t_shape))
    ours = ConvRegressor(s_shape, t_shape)
    ours.load_state_dict(theirs.state_dict())
    method.regressors = nn.ModuleList([ours])
    f_s, f_t = maps(1, [(8, *s_shape)])[0], maps(2, [(8, *t_shape)])[0]
    logits, targets = torch.randn(8, 10), torch.arange(8) % 10
    a, b = f_s.clone().requires_grad_(True), f_s.clone().requires_grad_(True)
    out = method(StudentOutput(logits, layers=(a,)), targets, TeacherOutput(torch.randn(8, 10), layers=(f_t,)))
    ref = 1.0 * F.cross_entropy(logits, targets) + 100.0 * F.mse_loss(theirs(b), f_t)
    assert float(out.total) == pytest.approx(float(ref), rel=1e-5)
    out.total.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(ours.conv.weight.grad, theirs.conv.weight.grad, rtol=1e-4, atol=1e-9)
    assert sum(p.numel() for p in method.trainable_parameters()) == sum(p.numel() for p in theirs.parameters())


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2_100"])
def test_taps_read_what_timms_forward_intermediates_returns(arch: str) -> None:
    """Stage indices name timm's feature_info modules; the hooked outputs are timm's own intermediates."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=5).eval()
    paths = resolve_layers(model, list(range(len(stage_modules(model)))), "teacher")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, layers = LayerTaps(model, paths).forward(x)
        _, reference = model.forward_intermediates(x)
        torch.testing.assert_close(logits, model(x))
    assert len(layers) == len(reference)
    for ours, theirs in zip(layers, reference):
        torch.testing.assert_close(ours, theirs)
    assert layer_shapes(model, paths, 3, 64) == [tuple(t.shape[1:]) for t in reference]


def test_taps_pre_logits_and_own_models() -> None:
    model = timm.create_model("cnn_small", num_classes=10, in_chans=1).eval()
    assert stage_modules(model) == ["features.2", "features.6", "features.10"]
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        logits, (pooled, last) = LayerTaps(model, (PRE_LOGITS, "features.10")).forward(x)
        torch.testing.assert_close(logits, model(x))
        torch.testing.assert_close(pooled, model.forward_head(model.forward_features(x), pre_logits=True))
        torch.testing.assert_close(last, model.forward_features(x))
    rescnn = timm.create_model("rescnn", num_classes=6, in_chans=3, blocks=4)
    assert stage_modules(rescnn) == ["stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert layer_shapes(rescnn, stage_modules(rescnn), 3, 32) == [(16, 32, 32), (16, 32, 32), (32, 16, 16),
                                                                  (32, 16, 16), (64, 8, 8)]
    mlp = timm.create_model("mlp", num_classes=10, in_chans=1, img_size=28)
    assert [s[0] for s in layer_shapes(mlp, stage_modules(mlp), 1, 28)] == [i["num_chs"] for i in mlp.feature_info]


def test_bad_layers_are_refused_naming_what_exists() -> None:
    student = timm.create_model("cnn_small", num_classes=10, in_chans=1)
    teacher = timm.create_model("resnet18", num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match=r"stage 5 of the teacher.*has 5 \(0-4: act1, layer1"):
        resolve_layers(teacher, [5], "teacher")
    with pytest.raises(ValueError, match=r"no module 'layer9'.*its stages: act1"):
        resolve_layers(teacher, ["layer9"], "teacher")
    with pytest.raises(ValueError, match="expected stage indices or module paths"):
        resolve_layers(teacher, [1.5], "teacher")
    with pytest.raises(ValueError, match="one to one: got 2 student layers.*1 teacher layers"):
        plan_layers(METHODS.get("at")(student_layers=[1, 2], teacher_layers=[3]), student, teacher, (1, 28), (1, 28))
    with pytest.raises(ValueError, match=r"compares \(C, H, W\) feature maps"):
        plan_layers(METHODS.get("at")(student_layers=["pre_logits"], teacher_layers=["pre_logits"]), student, teacher,
                    (1, 28), (1, 28))
    # cnn_small's last stage (7x7 at 28 px) to resnet18's layer1 at 84 px (21x21): a student map smaller than the
    # teacher's and not half of it has no regressor; at 56 px (14x14) it is half, and a transposed conv maps it
    with pytest.raises(ValueError, match="regressor .*cannot map it"):
        plan_layers(METHODS.get("fitnet")(student_layers=[2], teacher_layers=[1]), student, teacher, (1, 28),
                    (1, 84))
    plan = plan_layers(METHODS.get("fitnet")(student_layers=[2], teacher_layers=[1]), student, teacher, (1, 28), (1, 56))
    assert plan.student_shapes == ((64, 7, 7),) and plan.teacher_shapes == ((64, 14, 14),)
    with pytest.raises(ValueError, match="student_layers must be null"):
        METHODS.get("sp")(student_layers=[])
    with pytest.raises(ValueError, match="student_layers must be null"):
        METHODS.get("sp")(student_layers=[True])


@pytest.mark.parametrize("name", [m for m in METHODS.names() if METHODS.get(m).uses_layers])
def test_each_feature_map_method_trains_a_step_on_real_models(name: str) -> None:
    """Every registered method that reads layers, with its params.yaml knobs: planned on cnn_small → resnet18 at
    MNIST's size, set up, one step: finite terms, a gradient in the student's first convolution and in every
    parameter the method owns (FitNet's regressor, VID's variances, ...)."""
    torch.manual_seed(0)
    student = timm.create_model("cnn_small", num_classes=10, in_chans=1)
    teacher = timm.create_model("resnet18", num_classes=10, in_chans=1).eval()
    cls = METHODS.get(name)
    method = cls(**read_params(REPO / "params.yaml")["distill"][name])  # the knobs the pipeline runs with
    plan = plan_layers(method, student, teacher, (1, 28), (1, 28))
    labels = torch.arange(2000) % 10  # a training set of 2000 images, 200 per class
    method.setup(SetupContext(0, teacher, lambda: torch.zeros(0), plan, labels))
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8)
    logits, layers = LayerTaps(student, method.student_layer_paths()).forward(x)
    with torch.no_grad():
        t_logits, t_layers = LayerTaps(teacher, plan.teacher).forward(x)
    context = {"positions": y + 10 * torch.arange(8)} if cls.uses_positions else {}
    if cls.uses_progress:
        context["progress"] = Progress(epoch=30, epochs=30, step=1, steps_per_epoch=10)
    out = method(StudentOutput(logits, layers=layers), y, TeacherOutput(t_logits, layers=t_layers), **context)
    assert all(math.isfinite(float(v)) for v in out.terms.values()) and set(out.terms) >= {"ce"}
    out.total.backward()
    assert student.features[0].weight.grad is not None and student.features[0].weight.grad.abs().sum() > 0
    own = method.trainable_parameters()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in own), name
    if name in ("fitnet", "vid"):  # what their papers train beside the student
        assert own


# mdistiller's vid_loss (MIT, verbatim; mdistiller/distillers/VID.py)
def md_vid_loss(regressor, log_scale, f_s, f_t, eps=1e-5):
    # pool for dimentsion match
    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
    else:
        pass
    pred_mean = regressor(f_s)
    pred_var = torch.log(1.0 + torch.exp(log_scale)) + eps
    pred_var = pred_var.view(1, -1, 1, 1).to(pred_mean)
    neg_log_prob = 0.5 * ((pred_mean - f_t) ** 2 / pred_var + torch.log(pred_var))
    loss = torch.mean(neg_log_prob)
    return loss


@pytest.mark.parametrize("case", range(len(PAIRS)))
def test_vid_equals_mdistillers_vid_loss_and_trains_its_variances(case: int) -> None:
    """With the same regressors and variances, the value and the student's gradient are mdistiller's; the
    variances start at init_pred_var (mdistiller's inverse softplus) and, unlike in mdistiller, are the
    method's own parameters (they get a gradient and join the optimizer)."""
    s_shapes, t_shapes = PAIRS[case]
    s, t = maps(case, s_shapes), maps(case + 10, t_shapes)
    method = METHODS.get("vid")()
    from kdlib.taps import LayerPlan
    torch.manual_seed(case)
    method.build_adapters(LayerPlan(("a",) * len(s), ("b",) * len(t), tuple(x.shape[1:] for x in s),
                                    tuple(x.shape[1:] for x in t)))
    for log_scale in method.log_scales:
        variance = torch.log(1.0 + torch.exp(log_scale)) + 1e-5
        torch.testing.assert_close(variance, torch.full_like(variance, 5.0))
    compare(method.feature_loss,
            lambda a, b: sum(md_vid_loss(r, ls, x, y) for r, ls, x, y in zip(method.regressors, method.log_scales, a, b)),
            s, t)
    own = method.trainable_parameters()
    assert all(any(p is q for q in own) for p in method.log_scales)
    assert sum(p.numel() for p in own) == sum(p.numel() for r in method.regressors for p in r.parameters()) + sum(
        x.shape[1] for x in t)
    method.zero_grad()
    method.feature_loss(s, t).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.log_scales)
