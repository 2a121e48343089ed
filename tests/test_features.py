"""Pooled penultimate features (kdlib.features), the models' global pooling, and FeatureStudent:
projection choice, frozen-backbone alignment through the real training loop, checkpoint round trip."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from kdlib.checkpoint import ModelRecord, load_checkpoint, model_from_checkpoint, save_checkpoint
from kdlib.data import BatchNormalizer, IndexedImageDataset, Record, build_transforms
from kdlib.features import FeatureStudent, feature_width, logits_and_features, make_feature_student
from kdlib.losses import build_objective
from kdlib.models import build_model, count_parameters
from kdlib.runtime import seed_everything
from kdlib.teacher import OnlineTeacher
from kdlib.train import Recipe, TrainData, fit

CASES = [  # arch, classes, channels, kwargs, pooled feature width
    ("resnet18", 5, 1, {}, 512),
    ("cnn_small", 10, 1, {}, 64),
    ("rescnn", 6, 3, {"blocks": 4}, 32),  # 64 channels, hidden head C/2 = 32
]


def _input(channels: int, batch: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,classes,channels,kwargs,width", CASES)
def test_logits_and_features_equal_forward_and_pooled_pre_logits(arch, classes, channels, kwargs, width):
    torch.manual_seed(0)
    model = build_model(arch, classes, channels, **kwargs).eval()
    x = _input(channels)
    with torch.no_grad():
        logits, feats = logits_and_features(model, x)
        assert logits.shape == (4, classes) and feats.shape == (4, width)
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
        # the pooled features are what the classifier reads: fc(features) == logits
        torch.testing.assert_close(model.get_classifier()(feats), logits, rtol=1e-5, atol=1e-5)
        # and what the model returns once its classifier is removed
        headless = copy.deepcopy(model)
        headless.reset_classifier(0)
        torch.testing.assert_close(headless(x), feats, rtol=0, atol=0)
    assert feature_width(model, channels, 16) == width
    assert not model.training  # feature_width restores the mode
    model.train()
    feature_width(model, channels, 16)
    assert model.training


def _pool(feature_map: torch.Tensor, kind: str) -> torch.Tensor:
    avg, mx = feature_map.mean(dim=(2, 3)), feature_map.amax(dim=(2, 3))
    return {"avg": avg, "max": mx, "avgmax": (avg + mx) / 2}[kind]


@pytest.mark.parametrize("arch,channels,kwargs", [("cnn_small", 1, {}), ("rescnn", 3, {"blocks": 4})])
def test_global_pool_options(arch, channels, kwargs):
    x = _input(channels, size=20)
    pooled = {}
    for kind in ("avg", "max", "avgmax"):
        torch.manual_seed(0)
        model = build_model(arch, 7, channels, global_pool=kind, **kwargs).eval()
        with torch.no_grad():
            fmap = model.forward_features(x)
            expected = _pool(fmap, kind)
            pooled[kind] = expected
            if arch == "rescnn":  # pre-logits of rescnn = its hidden MLP on the pooled map
                expected = model.head_hidden(expected)
            torch.testing.assert_close(model.forward_head(fmap, pre_logits=True), expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(logits_and_features(model, x)[1], expected, rtol=1e-5, atol=1e-6)
        assert count_parameters(model) == count_parameters(build_model(arch, 7, channels, **kwargs))
    torch.testing.assert_close(pooled["avgmax"], (pooled["avg"] + pooled["max"]) / 2)
    assert not torch.allclose(pooled["avg"], pooled["max"])


def test_reset_classifier_and_parameter_counts():
    small = build_model("cnn_small", 10, 1)
    assert count_parameters(small) == 56_554
    res = build_model("rescnn", 6, 3, blocks=4)
    assert count_parameters(res) == 98_294
    for model, channels, head in ((small, 1, 64 * 10 + 10), (res, 3, 32 * 6 + 6)):
        model.eval()
        x = _input(channels)
        with torch.no_grad():
            pre = model.forward_head(model.forward_features(x), pre_logits=True)
            total = count_parameters(model)
            model.reset_classifier(0)
            assert isinstance(model.get_classifier(), nn.Identity) and model.num_classes == 0
            torch.testing.assert_close(model(x), pre, rtol=0, atol=0)
        assert count_parameters(model) == total - head
        model.reset_classifier(4)
        assert model(x).shape == (4, 4)
        assert count_parameters(model) == total - head + model.head_hidden_size * 4 + 4


def test_feature_student_projection_choice():
    def student(width_teacher: int, force: bool = False) -> FeatureStudent:
        torch.manual_seed(0)
        return make_feature_student(build_model("cnn_small", 10, 1), width_teacher, 1, 16, force)

    wide = student(512)
    assert isinstance(wide.feat_fc, nn.Linear) and wide.projected
    assert (wide.feat_fc.in_features, wide.feat_fc.out_features) == (64, 512)
    assert (wide.fc.in_features, wide.fc.out_features) == (512, 10)
    assert wide.config() == {"student_width": 64, "teacher_width": 512, "project": True}
    same = student(64)
    assert isinstance(same.feat_fc, nn.Identity) and not same.projected
    assert same.config()["project"] is False
    forced = student(64, force=True)
    assert isinstance(forced.feat_fc, nn.Linear) and forced.projected
    for model in (wide, same, forced):
        model.eval()
        x = _input(1)
        with torch.no_grad():
            logits, feats = model.forward_distill(x)
            torch.testing.assert_close(model(x), logits, rtol=0, atol=0)
            assert feats.shape == (4, model.teacher_width) and logits.shape == (4, 10)
            torch.testing.assert_close(model.fc(feats), logits, rtol=0, atol=0)
        assert isinstance(model.backbone.get_classifier(), nn.Identity)


# ------------------------------------------------------------------- frozen alignment

RECORD = ModelRecord(arch="cnn_small", num_classes=3, in_chans=1, model_kwargs={}, input_size=16,
                     mean=[0.5], std=[0.25], classes=["a", "b", "c"])


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[IndexedImageDataset, IndexedImageDataset]:
    root = tmp_path_factory.mktemp("imgs")
    gen = torch.Generator().manual_seed(0)
    records = []
    for i in range(32):
        label = i % 3
        pixels = (torch.rand(16, 16, generator=gen) * 80 + 80 * label).to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(root / f"{i}.png")
        records.append(Record(f"{i}.png", label, "train" if i < 24 else "val"))
    augment = build_transforms("shift", 16, 16, True, {"shift_px": 2})
    train = IndexedImageDataset(root, [r for r in records if r.split == "train"], 1, augment.sample,
                                preload=True, batch_transform=augment.batch)
    val = IndexedImageDataset(root, [r for r in records if r.split == "val"], 1, None, preload=True)
    return train, val


def _aligned_student(tiny_sets, out: Path) -> tuple[FeatureStudent, dict[str, torch.Tensor], dict]:
    train, val = tiny_sets
    seed_everything(0)
    teacher_model = build_model("resnet18", 3, 1)
    student = make_feature_student(build_model("cnn_small", 3, 1), 512, 1, 16)
    # a backbone with non-trivial BN statistics, as after distillation
    with torch.no_grad():
        student.train()
        student(_input(1, batch=8) * 3 + 1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    student.freeze_backbone()
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {"feat_fc.weight", "feat_fc.bias"}
    student.train()
    assert student.training and student.feat_fc.training
    assert not student.backbone.training
    assert all(not m.training for m in student.backbone.modules())
    teacher = OnlineTeacher(teacher_model, features=True)
    objective = build_objective("l2", beta=1.0, gamma=0.0)
    recipe = Recipe(epochs=2, batch_size=8, lr=0.05, warmup_epochs=0, weight_decay=0.0)
    record = dataclasses.replace(RECORD, feature_student=student.config())
    result = fit(student, objective, recipe, TrainData(train, val, BatchNormalizer([0.5], [0.25])), out, record,
                 seed=0, teacher=teacher, progress=False, select_best=False)
    return student, before, {"result": result, "meta": record.as_meta()}


def test_frozen_backbone_alignment_trains_only_feat_fc(tiny_sets, tmp_path):
    student, before, info = _aligned_student(tiny_sets, tmp_path)
    after = student.state_dict()
    for name, value in after.items():
        if name.startswith(("backbone.", "fc.")):  # weights and BN running stats, bit for bit
            assert torch.equal(value, before[name]), name
    assert any(name.startswith("backbone.") and "running_mean" in name for name in after)
    assert not torch.equal(after["feat_fc.weight"], before["feat_fc.weight"])
    assert not torch.equal(after["feat_fc.bias"], before["feat_fc.bias"])
    assert not student.backbone.training  # still eval after fit's model.train()
    result = info["result"]
    assert result.last_epoch == 2 and len(result.history) == 2
    assert "train/l2" in result.history[0] and not any(k.startswith("val/") for k in result.history[0])
    # select_best=False: no validation, only last.pt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["meta"]["epoch"] == 2


def test_feature_student_checkpoint_round_trip(tiny_sets, tmp_path):
    student, _, info = _aligned_student(tiny_sets, tmp_path / "align")
    path = tmp_path / "student.pt"
    save_checkpoint(path, student, info["meta"])
    rebuilt, meta = model_from_checkpoint(path)
    assert isinstance(rebuilt, FeatureStudent) and meta["feature_student"] == student.config()
    assert rebuilt.projected and not rebuilt.training
    student.eval()
    x = _input(1, batch=6)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), student(x), rtol=0, atol=0)
        torch.testing.assert_close(rebuilt.forward_distill(x)[1], student.forward_distill(x)[1], rtol=0, atol=0)
    # the align checkpoint written by fit rebuilds the same model too
    from_fit, _ = model_from_checkpoint(tmp_path / "align" / "last.pt")
    with torch.no_grad():
        torch.testing.assert_close(from_fit(x), student(x), rtol=0, atol=0)
    # an Identity feat_fc round-trips as well
    torch.manual_seed(1)
    same = make_feature_student(build_model("cnn_small", 3, 1), 64, 1, 16).eval()
    save_checkpoint(tmp_path / "same.pt", same, dataclasses.replace(RECORD, feature_student=same.config()).as_meta())
    back, _ = model_from_checkpoint(tmp_path / "same.pt")
    assert isinstance(back, FeatureStudent) and not back.projected
    with torch.no_grad():
        torch.testing.assert_close(back(x), same(x), rtol=0, atol=0)
