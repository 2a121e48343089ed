"""OFD (``kdlib.losses.ofd``) against the original code, and the pre-ReLU layers it reads (:mod:`kdlib.taps`,
:mod:`kdlib.models.pre_relu`) against a computation by hand.

Reference code copied verbatim (only the imports are shared):

* mdistiller (megvii-research/mdistiller, ``mdistiller/distillers/OFD.py`` at a08d46f10d6102bd6e3f258ca5ac880b020ea259;
  MIT License, Copyright (c) 2022 MEGVII Research): ``feat_loss``, ``ConnectorConvBN`` and the ``OFD`` class's
  ``init_ofd_modules`` (the margins), ``ofd_loss`` and ``_align_list``, held by a stand-in class without
  mdistiller's ``Distiller`` base;
* the authors' code (clovaai/overhaul-distillation, ``ImageNet/distiller.py`` at
  76344a84a7ce23c894f41a2e05b866c9b73fd85a; MIT License, Copyright (c) 2019-present NAVER Corp.):
  ``get_margin_from_BN`` and ``distillation_loss``.

Largest relative differences seen on these batches (float32, CPU): margins 0 (float64 torch ``ndtr`` and scipy
on Python floats agree to the last float32 bit) against both; the distance 1.0e-7 (value, against mdistiller's
``feat_loss``, which sums in another order) and 0 (value against the authors', gradients against both); the whole
feature term with connectors and stage weights 0 (value) and 0 (gradients into the student's maps and the
connectors' parameters). The tolerances below are looser (1e-6) so that another BLAS may round differently.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import norm

import kdlib.models  # noqa: F401 - registers cnn_small, rescnn, mlp with timm
from kdlib.distill import plan_layers
from kdlib.losses import METHODS
from kdlib.losses.base import SetupContext
from kdlib.losses.ofd import ofd_connector, ofd_distance, ofd_margin
from kdlib.losses.registry import StudentOutput, TeacherOutput
from kdlib.models.pre_relu import pre_relu_stages
from kdlib.taps import LayerTaps, layer_shapes, module_input, pre_relu, resolve_layers


# ---- mdistiller (MIT), verbatim --------------------------------------------------------------------------
def feat_loss(source, target, margin):
    margin = margin.to(source)
    loss = (
        (source - margin) ** 2 * ((source > margin) & (target <= margin)).float()
        + (source - target) ** 2
        * ((source > target) & (target > margin) & (target <= 0)).float()
        + (source - target) ** 2 * (target > 0).float()
    )
    return torch.abs(loss).mean(dim=0).sum()


class ConnectorConvBN(nn.Module):
    def __init__(self, s_channels, t_channels, kernel_size=1):
        super(ConnectorConvBN, self).__init__()
        self.s_channels = s_channels
        self.t_channels = t_channels
        self.connectors = nn.ModuleList(
            self._make_conenctors(s_channels, t_channels, kernel_size)
        )

    def _make_conenctors(self, s_channels, t_channels, kernel_size):
        assert len(s_channels) == len(t_channels), "unequal length of feat list"
        connectors = nn.ModuleList(
            [
                self._build_feature_connector(t, s, kernel_size)
                for t, s in zip(t_channels, s_channels)
            ]
        )
        return connectors

    def _build_feature_connector(self, t_channel, s_channel, kernel_size):
        C = [
            nn.Conv2d(
                s_channel,
                t_channel,
                kernel_size=kernel_size,
                stride=1,
                padding=(kernel_size - 1) // 2,
                bias=False,
            ),
            nn.BatchNorm2d(t_channel),
        ]
        for m in C:
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
        return nn.Sequential(*C)

    def forward(self, g_s):
        out = []
        for i in range(len(g_s)):
            out.append(self.connectors[i](g_s[i]))

        return out


class MdOFD(nn.Module):
    """Holds mdistiller's ``OFD`` methods below, verbatim (its ``Distiller`` base holds the nets, unused here)."""

    def __init__(self, tea_channels, stu_channels, bn_before_relu, kernel_size=1):
        super().__init__()
        self.init_ofd_modules(tea_channels, stu_channels, bn_before_relu, kernel_size)

    def init_ofd_modules(
        self, tea_channels, stu_channels, bn_before_relu, kernel_size=1
    ):
        tea_channels, stu_channels = self._align_list(tea_channels, stu_channels)
        self.connectors = ConnectorConvBN(
            stu_channels, tea_channels, kernel_size=kernel_size
        )

        self.margins = []
        for idx, bn in enumerate(bn_before_relu):
            margin = []
            std = bn.weight.data
            mean = bn.bias.data
            for (s, m) in zip(std, mean):
                s = abs(s.item())
                m = m.item()
                if norm.cdf(-m / s) > 0.001:
                    margin.append(
                        -s
                        * math.exp(-((m / s) ** 2) / 2)
                        / math.sqrt(2 * math.pi)
                        / norm.cdf(-m / s)
                        + m
                    )
                else:
                    margin.append(-3 * s)
            margin = torch.FloatTensor(margin).to(std.device)
            self.margins.append(margin.unsqueeze(1).unsqueeze(2).unsqueeze(0).detach())

    def ofd_loss(self, feature_student, feature_teacher):
        feature_student, feature_teacher = self._align_list(
            feature_student, feature_teacher
        )
        feature_student = [
            self.connectors.connectors[idx](feat)
            for idx, feat in enumerate(feature_student)
        ]

        loss_distill = 0
        feat_num = len(feature_student)
        for i in range(feat_num):
            loss_distill = loss_distill + feat_loss(
                feature_student[i],
                F.adaptive_avg_pool2d(
                    feature_teacher[i], feature_student[i].shape[-2:]
                ).detach(),
                self.margins[i],
            ) / 2 ** (feat_num - i - 1)
        return loss_distill

    def _align_list(self, *input_list):
        min_len = min([len(l) for l in input_list])
        return [l[-min_len:] for l in input_list]


# ---- the authors' code (clovaai/overhaul-distillation, MIT), verbatim -------------------------------------
def distillation_loss(source, target, margin):
    target = torch.max(target, margin)
    loss = torch.nn.functional.mse_loss(source, target, reduction="none")
    loss = loss * ((source > target) | (target > 0)).float()
    return loss.sum()


def get_margin_from_BN(bn):
    margin = []
    std = bn.weight.data
    mean = bn.bias.data
    for (s, m) in zip(std, mean):
        s = abs(s.item())
        m = m.item()
        if norm.cdf(-m / s) > 0.001:
            margin.append(- s * math.exp(- (m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / norm.cdf(-m / s) + m)
        else:
            margin.append(-3 * s)

    return torch.FloatTensor(margin).to(std.device)


# ---- helpers ---------------------------------------------------------------------------------------------
def set_bn(bn: nn.BatchNorm2d, seed: int) -> nn.BatchNorm2d:
    """Affine parameters spanning both margin branches: negative γ, β far above 0 (Φ(−β/γ) ≤ 0.001), β < 0."""
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.randn(c, generator=g) * 0.8)
        bn.bias.copy_(torch.randn(c, generator=g) * 1.5)
        bn.weight[0], bn.bias[0] = -0.5, 2.5  # negative γ: |γ| is the std
        bn.bias[1] = 5.0 * abs(float(bn.weight[1])) + 0.1  # Φ(−β/|γ|) < 0.001: the −3|γ| branch
        bn.bias[2] = -3.0
    return bn


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-12)).max())


def resnet18_teacher(seed: int = 0) -> nn.Module:
    """A resnet18 whose BNs have set affine parameters and running statistics (as a trained one would)."""
    torch.manual_seed(seed)
    teacher = timm.create_model("resnet18", num_classes=10, in_chans=1)
    for i, m in enumerate(m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)):
        set_bn(m, 100 + i)
        with torch.no_grad():
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return teacher.eval()


# ---- margins, distance, connector ------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_margin_equals_the_authors_and_mdistillers(seed: int) -> None:
    bn = set_bn(nn.BatchNorm2d(64), seed)
    ours = ofd_margin(bn.weight, bn.bias)
    authors = get_margin_from_BN(bn)
    mdistiller = MdOFD([64], [8], [bn]).margins[0].flatten()
    torch.testing.assert_close(ours, authors, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours, mdistiller, rtol=1e-6, atol=1e-7)
    assert rel(ours, authors) < 1e-6
    assert float(ours[1]) == pytest.approx(-3 * abs(float(bn.weight[1].detach())))  # the far-from-zero branch is exercised
    assert bool((ours <= 0).all())  # what makes the authors' and mdistiller's distances agree
    # the paper's eq. 3 by hand for channel 2 (β = −3): E[x | x < 0] of N(β, γ²)
    s, m = abs(float(bn.weight[2].detach())), -3.0
    by_hand = m - s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / norm.cdf(-m / s)
    assert float(ours[2]) == pytest.approx(by_hand, rel=1e-6)
    draws = np.random.default_rng(seed).normal(m, s, 2_000_000)
    assert float(ours[2]) == pytest.approx(draws[draws < 0].mean(), abs=5e-3)


def test_margin_of_a_zero_scale_channel_is_its_limit() -> None:
    """γ = 0 divides by zero in the original; the margin is then the limit: β below zero, else 0."""
    margin = ofd_margin(torch.tensor([0.0, 0.0, 0.0, 1e-6]), torch.tensor([-0.7, 0.4, 0.0, -0.7]))
    torch.testing.assert_close(margin, torch.tensor([-0.7, 0.0, 0.0, -0.7]))
    with pytest.raises(ZeroDivisionError):
        bn = nn.BatchNorm2d(1)
        with torch.no_grad():
            bn.weight.zero_()
        get_margin_from_BN(bn)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distance_equals_the_authors_and_mdistillers_values_and_gradients(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    bn = set_bn(nn.BatchNorm2d(16), seed)
    margin = ofd_margin(bn.weight, bn.bias)
    source = (torch.randn(6, 16, 5, 5, generator=g) * 2).requires_grad_(True)
    target = torch.randn(6, 16, 5, 5, generator=g) * 2
    ours = ofd_distance(source, target, margin)
    (grad_ours,) = torch.autograd.grad(ours, source)
    md = feat_loss(source, target, margin.view(1, -1, 1, 1))
    (grad_md,) = torch.autograd.grad(md, source)
    authors = distillation_loss(source, target, margin.view(1, -1, 1, 1)) / source.shape[0]
    (grad_authors,) = torch.autograd.grad(authors, source)
    torch.testing.assert_close(ours, md, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours, authors, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_ours, grad_md, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad_ours, grad_authors, rtol=1e-6, atol=1e-8)
    # every case of the partial L2 is present, so the comparison covers them all
    t = torch.max(target, margin.view(1, -1, 1, 1))
    for case in ((source > t) & (target <= margin.view(1, -1, 1, 1)), (source <= t) & (t <= 0), target > 0):
        assert bool(case.any())


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_connector_is_mdistillers_from_the_same_seed(kernel_size: int) -> None:
    torch.manual_seed(7)
    md = ConnectorConvBN([24], [48], kernel_size).connectors[0]
    torch.manual_seed(7)
    ours = ofd_connector(24, 48, kernel_size)
    for (name, a), (_, b) in zip(md.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(4, 24, 6, 6)
    torch.testing.assert_close(ours(x), md(x), rtol=0, atol=0)
    assert ours(x).shape == (4, 48, 6, 6)


# ---- the method against mdistiller's ofd_loss ------------------------------------------------------------
def test_feature_term_equals_mdistillers_ofd_loss_with_the_teachers_bns() -> None:
    """cnn_small ← resnet18 at 28 px: the plan pairs the student's two last stages with layer3 and layer4, the
    margins come from those blocks' bn2 (mdistiller's get_bn_before_relu), and with the same connectors the
    value and the gradients into the student's maps and the connectors are mdistiller's."""
    teacher = resnet18_teacher()
    student = timm.create_model("cnn_small", num_classes=10, in_chans=1)
    method = METHODS.get("ofd")()
    plan = plan_layers(method, student, teacher, (1, 28), (1, 28))
    assert plan.teacher == ("layer3.1.act2:input", "layer4.1.act2:input")
    assert plan.student == ("features.6:input", "features.10:input")
    method.setup(SetupContext(0, teacher, lambda: torch.zeros(0), plan))
    md = MdOFD([256, 512], [64, 64], [teacher.layer3[-1].bn2, teacher.layer4[-1].bn2])
    for a, b in zip(method.margins, md.margins):
        torch.testing.assert_close(a, b.flatten(), rtol=1e-6, atol=1e-7)
    method.connectors.load_state_dict(md.connectors.connectors.state_dict())
    g = torch.Generator().manual_seed(3)
    s = [torch.randn(8, *shape, generator=g).requires_grad_(True) for shape in plan.student_shapes]
    t = [torch.randn(8, *shape, generator=g) * 1.5 for shape in plan.teacher_shapes]
    ours = method.feature_loss(s, t)
    grads_ours = torch.autograd.grad(ours, s + list(method.connectors.parameters()))
    theirs = md.ofd_loss(s, t)
    grads_md = torch.autograd.grad(theirs, s + list(md.connectors.parameters()))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    for a, b in zip(grads_ours, grads_md):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the stage weights: the deepest pair counts 1, the one before ½
    single = [method.pair_loss(i, s[i], t[i]) * 2 ** (1 - i) for i in range(2)]
    torch.testing.assert_close(ours, single[0] / 2 + single[1], rtol=1e-6, atol=0)


def test_a_training_step_through_the_hooks_reaches_student_and_connectors() -> None:
    teacher = resnet18_teacher()
    torch.manual_seed(0)
    student = timm.create_model("cnn_small", num_classes=10, in_chans=1)
    method = METHODS.get("ofd")(feat_weight=1e-3)
    plan = plan_layers(method, student, teacher, (1, 28), (1, 28))
    method.setup(SetupContext(0, teacher, lambda: torch.zeros(0), plan))
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8)
    logits, layers = LayerTaps(student, method.student_layer_paths()).forward(x)
    with torch.no_grad():
        t_logits, t_layers = LayerTaps(teacher, plan.teacher).forward(x)
    out = method(StudentOutput(logits, layers=layers), y, TeacherOutput(t_logits, layers=t_layers))
    assert set(out.terms) == {"ce", "ofd"} and all(math.isfinite(float(v)) for v in out.terms.values())
    torch.testing.assert_close(out.total, out.terms["ce"] + 1e-3 * out.terms["ofd"])
    out.total.backward()
    assert student.features[0].weight.grad is not None and student.features[0].weight.grad.abs().sum() > 0
    own = method.trainable_parameters()
    assert len(own) == 6 and all(p.grad is not None for p in own)  # conv + BN γ, β per pair
    assert {id(p) for p in own} == {id(p) for p in method.connectors.parameters()}
    method.to(torch.float64)  # the margins are buffers: they follow the method
    assert all(m.dtype == torch.float64 for m in method.margins)
    assert "margin0" not in method.state_dict()  # derived from the teacher at setup, not saved


# ---- pre-ReLU layers -------------------------------------------------------------------------------------
def test_pre_relu_taps_equal_resnet18_recomputed_by_hand() -> None:
    teacher = resnet18_teacher(1)
    x = torch.randn(3, 1, 32, 32)
    paths = resolve_layers(teacher, [pre_relu(0), pre_relu(2), pre_relu(-1)], "teacher")
    assert paths == ("act1:input", "layer2.1.act2:input", "layer4.1.act2:input")
    taps = LayerTaps(teacher, paths)
    with torch.no_grad():
        logits, (stem, stage2, stage4) = taps.forward(x)
        taps.remove()
        assert torch.equal(logits, teacher(x))  # reading the inputs changes nothing downstream

        def last_block_pre_relu(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
            out = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(h)))))
            return out + (block.downsample(h) if block.downsample is not None else h)

        h0 = teacher.bn1(teacher.conv1(x))
        h = teacher.layer1(teacher.maxpool(F.relu(h0)))
        h2 = last_block_pre_relu(teacher.layer2[1], teacher.layer2[0](h))
        h = teacher.layer3(F.relu(h2))
        h4 = last_block_pre_relu(teacher.layer4[1], teacher.layer4[0](h))
    for tapped, by_hand in ((stem, h0), (stage2, h2), (stage4, h4)):
        torch.testing.assert_close(tapped, by_hand, rtol=1e-5, atol=1e-5)
        assert bool((tapped < 0).any())  # before the ReLU, not after
    assert pre_relu_stages(teacher)[4].bn == "layer4.1.bn2"  # mdistiller's get_bn_before_relu


def test_pre_relu_of_own_models_and_mobilenet_by_hand() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    small = timm.create_model("cnn_small", num_classes=10, in_chans=1).eval()
    _, (first,) = LayerTaps(small, resolve_layers(small, [pre_relu(0)], "student")).forward(x)
    torch.testing.assert_close(first, small.features[:2](x))
    res = timm.create_model("rescnn", num_classes=10, in_chans=1, blocks=2).eval()
    _, (last,) = LayerTaps(res, resolve_layers(res, [pre_relu(-1)], "student")).forward(x)
    block, h = res.blocks[1], res.blocks[0](res.stem(x))
    torch.testing.assert_close(last, block.bn2(block.conv2(block.relu1(block.bn1(block.conv1(h))))) + block.shortcut(h))
    mnv2 = timm.create_model("mobilenetv2_100", num_classes=10, in_chans=1).eval()
    stages = pre_relu_stages(mnv2)
    assert stages is not None and stages[-1].feature == "blocks.6" and stages[-1].bn == "blocks.6.0.bn3"
    assert isinstance(mnv2.get_submodule(stages[-1].bn).act, nn.Identity)  # a linear bottleneck: no ReLU after


def test_plan_shapes_on_the_meta_device() -> None:
    with torch.device("meta"):
        student = timm.create_model("cnn_small", num_classes=10, in_chans=1)
        teacher = timm.create_model("resnet50", num_classes=10, in_chans=3)
    plan = plan_layers(METHODS.get("ofd")(student_layers=[0, 1, 2], teacher_layers=[1, 2, 3]), student, teacher,
                       (1, 28), (3, 64))
    assert plan.student == tuple(module_input(f"features.{i}") for i in (2, 6, 10))
    assert plan.teacher == ("layer1.2.act3:input", "layer2.3.act3:input", "layer3.5.act3:input")
    assert plan.student_shapes == ((32, 28, 28), (64, 14, 14), (64, 7, 7))
    assert plan.teacher_shapes == ((256, 16, 16), (512, 8, 8), (1024, 4, 4))
    assert layer_shapes(teacher, ["layer3.5.act3"], 3, 64) == [(1024, 4, 4)]  # the output: same shape, after ReLU


@pytest.mark.parametrize("student_arch, teacher_arch, bad", [
    ("mlp", "resnet18", "student"), ("cnn_small", "convnext_atto", "teacher"),
])
def test_a_model_without_pre_relu_stages_is_refused_naming_it_and_those_that_work(student_arch, teacher_arch,
                                                                                   bad) -> None:
    with torch.device("meta"):
        student = timm.create_model(student_arch, num_classes=10, in_chans=3)
        teacher = timm.create_model(teacher_arch, num_classes=10, in_chans=3)
    arch = student_arch if bad == "student" else teacher_arch
    with pytest.raises(ValueError, match=rf"{bad}_layers: the {bad} \({arch}\) has no known pre-ReLU stage "
                                         r"features; the models that have them: .*resnet.*cnn_small, rescnn"):
        plan_layers(METHODS.get("ofd")(), student, teacher, (3, 32), (3, 32), student_arch, teacher_arch)


def test_a_stage_that_ends_in_hard_swish_is_refused() -> None:
    with torch.device("meta"):
        student = timm.create_model("cnn_small", num_classes=10, in_chans=3)
        teacher = timm.create_model("mobilenetv3_large_100", num_classes=10, in_chans=3)
    with pytest.raises(ValueError, match=r"'pre_relu:4': stage 4 of the teacher .* does not end in a ReLU.*0, 1, 2, 3"):
        plan_layers(METHODS.get("ofd")(teacher_layers=[3, 4]), student, teacher, (3, 32), (3, 32))
    plan = plan_layers(METHODS.get("ofd")(teacher_layers=[2, 3]), student, teacher, (3, 32), (3, 32))
    assert plan.teacher == ("blocks.2", "blocks.4")


def test_input_and_pre_relu_names_are_checked_and_read_beside_outputs() -> None:
    model = resnet18_teacher(2)  # timm zero-initializes each block's last BN: its pre-ReLU sum would be ≥ 0
    with pytest.raises(ValueError, match=r"has no module 'layer9.act2:input'"):
        resolve_layers(model, ["layer9.act2:input"], "teacher")
    with pytest.raises(ValueError, match=r"'pre_relu:x': expected pre_relu:<stage index>"):
        resolve_layers(model, ["pre_relu:x"], "teacher")
    with pytest.raises(ValueError, match=r"'pre_relu:5': stage 5 of the teacher \(ResNet\), which has 5"):
        resolve_layers(model, [pre_relu(5)], "teacher")
    with torch.no_grad():
        _, (before, after) = LayerTaps(model, ["layer4.1.act2:input", "layer4.1.act2"]).forward(torch.randn(2, 1, 32, 32))
    torch.testing.assert_close(after, F.relu(before))
    assert bool((before < 0).any())


@pytest.mark.parametrize("knobs, match", [
    ({"kernel_size": 2}, "kernel_size must be a positive odd integer"),
    ({"kernel_size": 0}, "kernel_size must be a positive odd integer"),
    ({"student_layers": ["layer2"]}, "student_layers must be null or a list of stage indices"),
    ({"teacher_layers": [True]}, "teacher_layers must be null"),
    ({"feat_weight": -1.0}, "feat_weight"),
])
def test_bad_knobs_are_refused_naming_them(knobs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        METHODS.get("ofd")(**knobs)
