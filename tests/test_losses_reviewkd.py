"""ReviewKD (Chen et al., CVPR 2021) against mdistiller's own code: its ``ReviewKD`` distiller (the ABF fusion
and ``hcl_loss`` inside its ``forward_train``) run unchanged on fixed batches next to ours, our ABFs given the
weights of theirs (``load_state_dict``); the loss terms, the gradients into the student's stage maps, pooled
feature and logits, the gradients of every ABF parameter and the BatchNorm statistics the pass leaves. Then the
warm-up by hand, the layers it reads on real models, what it refuses, and a training step.

Largest relative differences to mdistiller on these batches (float32, CPU; max |ours − theirs| / max |theirs|
over each tensor, over the three cases at epochs 5 and 30): 0 for every quantity — total loss, CE term, review
term, gradients into the student's stage maps, pooled feature and logits, every ABF parameter's gradient, the
BatchNorm running statistics (the same operations in the same order: bit-identical). The tolerances below
(1e-6 relative on values, 1e-5 on gradients) leave room for other CPUs' kernels only.

The reference code below is copied verbatim from mdistiller (megvii-research/mdistiller at
a08d46f10d6102bd6e3f258ca5ac880b020ea259, ``mdistiller/distillers/_base.py`` (``Distiller``) and
``mdistiller/distillers/ReviewKD.py`` (``hcl_loss``, ``ReviewKD``, ``ABF``); MIT License, Copyright (c) 2022
MEGVII Research); only the imports are shared.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import kdlib.models  # noqa: F401 - registers cnn_small, rescnn, mlp with timm
from kdlib.distill import plan_layers
from kdlib.losses import METHODS, build_objective
from kdlib.losses.base import SetupContext
from kdlib.losses.registry import Progress, StudentOutput, TeacherOutput
from kdlib.losses.reviewkd import hcl_pair, warmup_factor
from kdlib.taps import PRE_LOGITS, LayerPlan, LayerTaps


# ---- mdistiller (MIT), verbatim -------------------------------------------------------------------------
class Distiller(nn.Module):
    def __init__(self, student, teacher):
        super(Distiller, self).__init__()
        self.student = student
        self.teacher = teacher

    def train(self, mode=True):
        # teacher as eval mode by default
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        for module in self.children():
            module.train(mode)
        self.teacher.eval()
        return self

    def get_learnable_parameters(self):
        # if the method introduces extra parameters, re-impl this function
        return [v for k, v in self.student.named_parameters()]

    def get_extra_parameters(self):
        # calculate the extra parameters introduced by the distiller
        return 0

    def forward_train(self, **kwargs):
        # training function for the distillation method
        raise NotImplementedError()

    def forward_test(self, image):
        return self.student(image)[0]

    def forward(self, **kwargs):
        if self.training:
            return self.forward_train(**kwargs)
        return self.forward_test(kwargs["image"])


def hcl_loss(fstudent, fteacher):
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        n, c, h, w = fs.shape
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt = 1.0
        tot = 1.0
        for l in [4, 2, 1]:
            if l >= h:
                continue
            tmpfs = F.adaptive_avg_pool2d(fs, (l, l))
            tmpft = F.adaptive_avg_pool2d(ft, (l, l))
            cnt /= 2.0
            loss += F.mse_loss(tmpfs, tmpft, reduction="mean") * cnt
            tot += cnt
        loss = loss / tot
        loss_all = loss_all + loss
    return loss_all


class ReviewKD(Distiller):
    def __init__(self, student, teacher, cfg):
        super(ReviewKD, self).__init__(student, teacher)
        self.shapes = cfg.REVIEWKD.SHAPES
        self.out_shapes = cfg.REVIEWKD.OUT_SHAPES
        in_channels = cfg.REVIEWKD.IN_CHANNELS
        out_channels = cfg.REVIEWKD.OUT_CHANNELS
        self.ce_loss_weight = cfg.REVIEWKD.CE_WEIGHT
        self.reviewkd_loss_weight = cfg.REVIEWKD.REVIEWKD_WEIGHT
        self.warmup_epochs = cfg.REVIEWKD.WARMUP_EPOCHS
        self.stu_preact = cfg.REVIEWKD.STU_PREACT
        self.max_mid_channel = cfg.REVIEWKD.MAX_MID_CHANNEL

        abfs = nn.ModuleList()
        mid_channel = min(512, in_channels[-1])
        for idx, in_channel in enumerate(in_channels):
            abfs.append(
                ABF(
                    in_channel,
                    mid_channel,
                    out_channels[idx],
                    idx < len(in_channels) - 1,
                )
            )
        self.abfs = abfs[::-1]

    def get_learnable_parameters(self):
        return super().get_learnable_parameters() + list(self.abfs.parameters())

    def get_extra_parameters(self):
        num_p = 0
        for p in self.abfs.parameters():
            num_p += p.numel()
        return num_p

    def forward_train(self, image, target, **kwargs):
        logits_student, features_student = self.student(image)
        with torch.no_grad():
            logits_teacher, features_teacher = self.teacher(image)

        # get features
        if self.stu_preact:
            x = features_student["preact_feats"] + [
                features_student["pooled_feat"].unsqueeze(-1).unsqueeze(-1)
            ]
        else:
            x = features_student["feats"] + [
                features_student["pooled_feat"].unsqueeze(-1).unsqueeze(-1)
            ]
        x = x[::-1]
        results = []
        out_features, res_features = self.abfs[0](x[0], out_shape=self.out_shapes[0])
        results.append(out_features)
        for features, abf, shape, out_shape in zip(
            x[1:], self.abfs[1:], self.shapes[1:], self.out_shapes[1:]
        ):
            out_features, res_features = abf(features, res_features, shape, out_shape)
            results.insert(0, out_features)
        features_teacher = features_teacher["preact_feats"][1:] + [
            features_teacher["pooled_feat"].unsqueeze(-1).unsqueeze(-1)
        ]
        # losses
        loss_ce = self.ce_loss_weight * F.cross_entropy(logits_student, target)
        loss_reviewkd = (
            self.reviewkd_loss_weight
            * min(kwargs["epoch"] / self.warmup_epochs, 1.0)
            * hcl_loss(results, features_teacher)
        )
        losses_dict = {
            "loss_ce": loss_ce,
            "loss_kd": loss_reviewkd,
        }
        return logits_student, losses_dict


class ABF(nn.Module):
    def __init__(self, in_channel, mid_channel, out_channel, fuse):
        super(ABF, self).__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channel),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(
                mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False
            ),
            nn.BatchNorm2d(out_channel),
        )
        if fuse:
            self.att_conv = nn.Sequential(
                nn.Conv2d(mid_channel * 2, 2, kernel_size=1),
                nn.Sigmoid(),
            )
        else:
            self.att_conv = None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)  # pyre-ignore
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)  # pyre-ignore

    def forward(self, x, y=None, shape=None, out_shape=None):
        n, _, h, w = x.shape
        # transform student features
        x = self.conv1(x)
        if self.att_conv is not None:
            # upsample residual features
            y = F.interpolate(y, (shape, shape), mode="nearest")
            # fusion
            z = torch.cat([x, y], dim=1)
            z = self.att_conv(z)
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        # output
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        y = self.conv2(x)
        return y, x
# ---- end of mdistiller's code ---------------------------------------------------------------------------


class FixedOutputs(nn.Module):
    """What an mdistiller model returns for the batch, ``(logits, {"feats", "preact_feats", "pooled_feat"})``,
    given as tensors: mdistiller's ``forward_train`` runs on fixed stage maps (index 0: the stem, which
    ReviewKD does not read)."""

    def __init__(self, logits: torch.Tensor, feats: list[torch.Tensor], pooled: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.feats, self.pooled = logits, feats, pooled

    def forward(self, image: object) -> tuple[torch.Tensor, dict]:
        return self.logits, {"feats": list(self.feats), "preact_feats": list(self.feats), "pooled_feat": self.pooled}


# (student stage maps after the stem, pooled width; teacher's likewise), per image, shallow to deep:
CASES = [
    # equal sizes (mdistiller's CIFAR ResNet pairs)
    ([(8, 16, 16), (16, 8, 8), (32, 4, 4)], 32, [(16, 16, 16), (32, 8, 8), (64, 4, 4)], 64),
    # the student's maps half the teacher's (mdistiller's ShuffleNet students: OUT_SHAPES ≠ SHAPES)
    ([(24, 8, 8), (48, 4, 4), (96, 2, 2)], 96, [(16, 16, 16), (32, 8, 8), (64, 4, 4)], 64),
    # larger student maps, and a pooled width over 512 (the fusion width is capped at 512)
    ([(8, 8, 8), (16, 4, 4)], 520, [(16, 4, 4), (32, 2, 2)], 24),
]
BATCH, CLASSES = 6, 10


def run_both(case: int, epoch: int, feat_weight: float = 5.0):
    """Both implementations on the case's fixed batch, with the same ABF weights; returns (our method, their
    distiller, our output, their loss dict, our leaf inputs, their leaf inputs)."""
    s_maps, s_pool, t_maps, t_pool = CASES[case]
    g = torch.Generator().manual_seed(100 + case)
    stem = torch.randn(BATCH, 4, 32, 32, generator=g)
    s_feats = [torch.randn(BATCH, *s, generator=g).relu() for s in s_maps]
    s_pooled = torch.randn(BATCH, s_pool, generator=g).relu()
    t_feats = [torch.randn(BATCH, *t, generator=g).relu() for t in t_maps]
    t_pooled = torch.randn(BATCH, t_pool, generator=g).relu()
    logits, t_logits = torch.randn(BATCH, CLASSES, generator=g), torch.randn(BATCH, CLASSES, generator=g)
    targets = torch.randint(0, CLASSES, (BATCH,), generator=g)

    cfg = SimpleNamespace(REVIEWKD=SimpleNamespace(
        CE_WEIGHT=1.0, REVIEWKD_WEIGHT=feat_weight, WARMUP_EPOCHS=20, STU_PREACT=False, MAX_MID_CHANNEL=512,
        SHAPES=[1] + [s[1] for s in s_maps][::-1], OUT_SHAPES=[1] + [t[1] for t in t_maps][::-1],
        IN_CHANNELS=[s[0] for s in s_maps] + [s_pool], OUT_CHANNELS=[t[0] for t in t_maps] + [t_pool]))
    theirs_in = [x.clone().requires_grad_(True) for x in (logits, *s_feats, s_pooled)]
    torch.manual_seed(case)
    theirs = ReviewKD(FixedOutputs(theirs_in[0], [stem, *theirs_in[1:-1]], theirs_in[-1]),
                      FixedOutputs(t_logits, [stem, *t_feats], t_pooled), cfg)
    theirs.train()

    method = METHODS.get("reviewkd")(feat_weight=feat_weight, warmup=20)
    paths_s, paths_t = (*[f"s{i}" for i in range(len(s_maps))], PRE_LOGITS), (*[f"t{i}" for i in range(len(t_maps))],
                                                                             PRE_LOGITS)
    method.build_adapters(LayerPlan(paths_s, paths_t, (*s_maps, (s_pool,)), (*t_maps, (t_pool,))))
    method.abfs.load_state_dict(theirs.abfs.state_dict())
    method.train()
    ours_in = [x.clone().requires_grad_(True) for x in (logits, *s_feats, s_pooled)]

    _, ref = theirs.forward_train(image=None, target=targets, epoch=epoch)
    out = method(StudentOutput(ours_in[0], layers=tuple(ours_in[1:])), targets,
                 TeacherOutput(t_logits, layers=(*t_feats, t_pooled)), progress=Progress(epoch, 240, 1, 100))
    return method, theirs, out, ref, ours_in, theirs_in


@pytest.mark.parametrize("epoch", [5, 30])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_the_same_as_mdistillers_reviewkd_values_and_gradients(case: int, epoch: int) -> None:
    method, theirs, out, ref, ours_in, theirs_in = run_both(case, epoch)
    ramp = min(epoch / 20, 1.0)
    assert float(out.terms["warmup"]) == pytest.approx(ramp, rel=1e-7)
    torch.testing.assert_close(out.terms["ce"], ref["loss_ce"].detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(5.0 * ramp * out.terms["hcl"], ref["loss_kd"].detach(), rtol=1e-6, atol=0)
    total = ref["loss_ce"] + ref["loss_kd"]
    torch.testing.assert_close(out.total.detach(), total.detach(), rtol=1e-6, atol=0)
    out.total.backward()
    total.backward()
    for name, a, b in zip(["logits", *[f"stage {i}" for i in range(len(ours_in) - 2)], "pooled"], ours_in, theirs_in):
        assert b.grad is not None and b.grad.abs().max() > 0, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6 * float(b.grad.abs().max()), msg=name)
    theirs_params = dict(theirs.abfs.named_parameters())
    for name, p in method.abfs.named_parameters():
        q = theirs_params.pop(name)
        assert q.grad is not None and p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6 * float(q.grad.abs().max()), msg=name)
    assert not theirs_params  # every one of mdistiller's ABF parameters has its counterpart
    for (name, a), (_, b) in zip(method.abfs.named_buffers(), theirs.abfs.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)  # the BatchNorm statistics the pass left


def test_trainable_parameters_are_every_abf_parameter() -> None:
    for case in range(len(CASES)):
        method, theirs, *_ = run_both(case, 1)
        own = method.trainable_parameters()
        assert sum(p.numel() for p in own) == theirs.get_extra_parameters()
        assert {id(p) for p in own} == {id(p) for p in method.abfs.parameters()}
    # the fusion width: min(512, the pooled width), mdistiller's mid_channel
    assert method.abfs[0].conv1[0].out_channels == 512 and method.abfs[-1].conv2[0].out_channels == 16


def test_hcl_by_hand() -> None:
    """A 4×4 map pair differing by 1 in one element: the MSE is 1/16, the 2×2 pool's (a quarter in one cell)
    (1/4)²/4 = 1/64, the 1×1's (1/16)² = 1/256, weighted 1, 1/2, 1/4 (4 ≥ H is skipped) over 7/4."""
    f_t = torch.zeros(1, 1, 4, 4)
    f_s = f_t.clone()
    f_s[0, 0, 0, 0] = 1.0
    expected = (1 / 16 + 1 / 2 * 1 / 64 + 1 / 4 * 1 / 256) / (7 / 4)
    assert float(hcl_pair(f_s, f_t)) == pytest.approx(expected, rel=1e-6)
    # a 1×1 map is its plain MSE; an 8×8 one gets all three levels (weights 1, ½, ¼, ⅛ over 15/8)
    assert float(hcl_pair(torch.ones(1, 2, 1, 1), torch.zeros(1, 2, 1, 1))) == pytest.approx(1.0)
    big_s = torch.zeros(1, 1, 8, 8)
    big_s[..., :4, :4] = 1.0  # one quadrant: MSE 1/4; pools 4×4 (1/4), 2×2 (1/4), 1×1 (1/16)
    expected = (1 / 4 + 1 / 2 * 1 / 4 + 1 / 4 * 1 / 4 + 1 / 8 * 1 / 16) / (15 / 8)
    assert float(hcl_pair(big_s, torch.zeros(1, 1, 8, 8))) == pytest.approx(expected, rel=1e-6)


def test_the_warm_up_by_hand() -> None:
    """mdistiller's ``min(epoch / WARMUP_EPOCHS, 1)``, epochs counted from 1; W = 0: none."""
    for epoch, factor in [(1, 0.05), (2, 0.1), (10, 0.5), (19, 0.95), (20, 1.0), (21, 1.0), (240, 1.0)]:
        assert warmup_factor(epoch, 20) == pytest.approx(factor, abs=1e-15)
    assert warmup_factor(1, 2.5) == pytest.approx(0.4) and warmup_factor(3, 2.5) == 1.0
    assert warmup_factor(1, 0) == 1.0
    # through the method: the review term at epoch e is w·min(e/20, 1)·HCL, with the same HCL every epoch
    method, _, first, *_ = run_both(0, 1)
    hcl = float(first.terms["hcl"])
    for epoch in (1, 4, 20, 100):
        _, _, out, ref, *_ = run_both(0, epoch)
        assert float(out.terms["warmup"]) == pytest.approx(min(epoch / 20, 1.0), rel=1e-7)
        assert float(out.total.detach() - out.terms["ce"]) == pytest.approx(5.0 * min(epoch / 20, 1.0) * hcl, rel=1e-6)


def plan_for(student_arch: str, teacher_arch: str, size: int = 28, **knobs):
    student = timm.create_model(student_arch, num_classes=10, in_chans=1)
    teacher = timm.create_model(teacher_arch, num_classes=10, in_chans=1)
    method = METHODS.get("reviewkd")(**knobs)
    return method, student, teacher, plan_layers(method, student, teacher, (1, size), (1, size), student_arch,
                                                 teacher_arch)


def test_layers_every_stage_after_the_stem_and_the_pooled_feature() -> None:
    _, _, _, plan = plan_for("rescnn", "resnet18", 32)  # 5 stages each: mdistiller's feats[1:] + [pooled_feat]
    # the teacher's stages before their last ReLU (the original's preact_feats), the student's after it
    assert plan.student == ("blocks.0", "blocks.1", "blocks.2", "blocks.3", PRE_LOGITS)
    assert plan.teacher == ("layer1.1.act2:input", "layer2.1.act2:input", "layer3.1.act2:input",
                            "layer4.1.act2:input", PRE_LOGITS)
    _, _, _, plan = plan_for("cnn_small", "resnet18")  # 3 stages: the teacher's deepest meet them
    assert plan.student == ("features.6", "features.10", PRE_LOGITS)
    assert plan.teacher == ("layer3.1.act2:input", "layer4.1.act2:input", PRE_LOGITS)
    assert plan.student_shapes == ((64, 14, 14), (64, 7, 7), (64,))
    assert plan.teacher_shapes == ((256, 2, 2), (512, 1, 1), (512,))
    _, _, _, plan = plan_for("rescnn", "resnet18", 32, student_preact=True)  # mdistiller's STU_PREACT
    assert plan.student == ("blocks.0.relu2:input", "blocks.1.relu2:input", "blocks.2.relu2:input",
                            "blocks.3.relu2:input", PRE_LOGITS)
    with pytest.raises(ValueError, match="no known pre-ReLU stage features"):  # a teacher without them
        plan_for("cnn_small", "convnext_atto")


def test_models_without_feature_maps_and_bad_knobs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"the student's layer hidden\.\d+ gives \(\d+,\).*mlp"):
        plan_for("mlp", "resnet18")
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, in_chans=1, img_size=32, patch_size=8, depth=2)
    teacher = timm.create_model("resnet18", num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match=r"the student's layer blocks\.1 gives \(17, 192\)"):
        plan_layers(METHODS.get("reviewkd")(), vit, teacher, (1, 32), (1, 32), "vit_tiny_patch16_224", "resnet18")
    with pytest.raises(ValueError, match="one to one: got 2 student layers"):  # unequal pairs
        plan_for("cnn_small", "resnet18", student_layers=[1, 2], teacher_layers=[4])
    for knobs, text in [({"warmup": -1}, "warmup must be"), ({"warmup": True}, "warmup must be"),
                        ({"warmup": float("nan")}, "warmup must be"), ({"max_mid_channels": 0}, "max_mid_channels"),
                       ({"student_preact": 1}, "student_preact must be true or false"),
                        ({"max_mid_channels": 2.5}, "max_mid_channels"), ({"feat_weight": -1}, "feat_weight")]:
        with pytest.raises(ValueError, match=text):
            build_objective("reviewkd", **knobs)
    method = build_objective("reviewkd")
    with pytest.raises(ValueError, match="progress"):
        method(StudentOutput(torch.zeros(2, 3), layers=()), torch.zeros(2, dtype=torch.long),
               TeacherOutput(torch.zeros(2, 3), layers=()))


def test_a_training_step_on_real_models_and_a_batch_of_one() -> None:
    """cnn_small → resnet18 at MNIST's size: the ABFs are built from the plan, the student's first convolution
    and every ABF parameter get a gradient; a one-image batch (BatchNorm of a 1×1 map) runs too."""
    torch.manual_seed(0)
    method, student, teacher, plan = plan_for("cnn_small", "resnet18", max_mid_channels=32)
    teacher.eval()
    method.setup(SetupContext(0, teacher, lambda: torch.zeros(0), plan))
    assert method.abfs[0].conv1[0].out_channels == 32  # min(32, 64)
    for batch in (8, 1):
        student.zero_grad()
        method.zero_grad()
        x, y = torch.randn(batch, 1, 28, 28), torch.arange(batch)
        logits, layers = LayerTaps(student, method.student_layer_paths()).forward(x)
        with torch.no_grad():
            t_logits, t_layers = LayerTaps(teacher, plan.teacher).forward(x)
        out = method(StudentOutput(logits, layers=layers), y, TeacherOutput(t_logits, layers=t_layers),
                     progress=Progress(2, 30, 1, 10))
        assert set(out.terms) == {"ce", "hcl", "warmup"} and all(math.isfinite(float(v)) for v in out.terms.values())
        assert not any(v.requires_grad for v in out.terms.values())
        out.total.backward()
        assert student.features[0].weight.grad.abs().sum() > 0
        assert all(p.grad is not None for p in method.trainable_parameters())
        assert method.abfs.training  # the one-image batch's eval-mode pass leaves training mode on
