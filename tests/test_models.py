"""Model construction through timm, parameter counts, pretrained-weight resolution, checkpoints."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import timm
import torch

import kdlib.models  # noqa: F401  (registers cnn_small / rescnn in timm)
from kdlib.checkpoint import (
    Checkpoint,
    CheckpointError,
    ModelRecord,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from kdlib.models import build_model, count_parameters
from kdlib.models.pretrained import PretrainedUnavailable, pretrained_kwargs


@pytest.mark.parametrize(
    ("blocks", "expected"), [(4, 98_294), (6, 408_854), (8, 1_648_470), (10, 6_601_686)]
)
def test_rescnn_parameter_counts(blocks: int, expected: int) -> None:
    assert count_parameters(build_model("rescnn", 6, 3, blocks=blocks)) == expected


def test_rescnn_teacher_parameter_count() -> None:
    model = build_model("rescnn", 6, 3, blocks=12, head_hidden=(512, 256))
    assert count_parameters(model) == 26_534_358


def test_cnn_small_registered_in_timm() -> None:
    model = timm.create_model("cnn_small", num_classes=10, in_chans=1)
    assert count_parameters(model) == 56_554  # documented in kdlib/models/cnn_small.py
    assert "cnn_small" in timm.list_models() and "rescnn" in timm.list_models()


def test_own_models_refuse_pretrained_true() -> None:
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("cnn_small", pretrained=True)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("rescnn", pretrained=True)


@pytest.mark.parametrize(
    ("arch", "kwargs", "in_chans", "size"),
    [
        ("cnn_small", {}, 1, 28),
        ("rescnn", {"blocks": 4}, 3, 32),
        ("resnet18", {}, 1, 28),
        ("deit_tiny_distilled_patch16_224", {"img_size": 28, "patch_size": 7, "depth": 2}, 1, 28),
    ],
)
@torch.no_grad()
def test_forward_shapes(arch: str, kwargs: dict, in_chans: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 7, in_chans, **kwargs).eval()
    out = model(torch.randn(2, in_chans, size, size))
    assert isinstance(out, torch.Tensor)  # DeiT-distilled averages its two heads in eval mode
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_unknown_arch_raises_key_error() -> None:
    with pytest.raises(KeyError, match="resnet_does_not_exist"):
        build_model("resnet_does_not_exist", 10, 1)


def test_pretrained_false_kwargs() -> None:
    assert pretrained_kwargs("resnet18", False) == {"pretrained": False}


def test_pretrained_true_unreachable_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # An empty Hugging Face cache, so a locally cached copy cannot make this pass or hide the error.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    start = time.perf_counter()
    with pytest.raises(PretrainedUnavailable) as info:
        pretrained_kwargs("resnet18", True, reachable=False)
    assert time.perf_counter() - start < 0.5
    message = str(info.value)
    assert "resnet18" in message and "path" in message and "pretrained" in message


def test_pretrained_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "weights" / "nope.pth"
    with pytest.raises(PretrainedUnavailable) as info:
        build_model("resnet18", 10, 3, pretrained=str(missing))
    assert str(missing) in str(info.value) and "resnet18" in str(info.value)
    # files go through kdlib.models.adapt only, never timm's silent pretrained_cfg_overlay
    with pytest.raises(TypeError, match="load_pretrained"):
        pretrained_kwargs("resnet18", str(missing))


def _assert_same_state(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(state[key], value), key


def test_pretrained_from_file_loads_exact_weights(tmp_path: Path) -> None:
    """A timm-format file (ImageNet shape: 1000 classes, 3 channels) loads exactly."""
    torch.manual_seed(123)
    source = build_model("resnet18", 1000, 3)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(999)  # a different random init, which the file must overwrite
    loaded = build_model("resnet18", 1000, 3, pretrained=str(path))
    _assert_same_state(loaded, source.state_dict())
    fresh = build_model("resnet18", 1000, 3)
    assert not torch.equal(fresh.conv1.weight, source.conv1.weight)


def test_pretrained_file_with_task_head_loads_every_weight(tmp_path: Path) -> None:
    """A weights file shaped for the task itself (10 classes, 1 channel, e.g. an earlier
    teacher's) must load completely, head included, not silently re-initialize the head."""
    torch.manual_seed(123)
    source = build_model("resnet18", 10, 1)
    path = tmp_path / "resnet18-mnist.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(999)
    loaded = build_model("resnet18", 10, 1, pretrained=str(path))
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)  # the backbone does load
    _assert_same_state(loaded, source.state_dict())  # fails on fc.weight: head dropped by timm


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("rescnn", 4, 1, blocks=2)
    with torch.no_grad():  # make the BN running statistics non-default too
        model.train()(torch.randn(4, 1, 12, 12))
    record = ModelRecord(arch="rescnn", num_classes=4, in_chans=1, model_kwargs={"blocks": 2},
                         classes=["a", "b", "c", "d"], input_size=12, mean=[0.5], std=[0.25])
    meta = {**record.as_meta(), "epoch": 3, "val_score": 50.0}
    path = tmp_path / "sub" / "best.pt"
    save_checkpoint(path, model, meta)
    assert path.is_file()
    assert list(path.parent.iterdir()) == [path]  # no .tmp left behind

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["meta"] == meta
    assert set(raw) == {"state_dict", "meta"}

    ckpt = Checkpoint.read(path)
    assert ckpt.record == record and ckpt.meta == meta and ckpt.method_state == {}
    assert (ckpt.epoch, ckpt.val_score) == (3, 50.0)

    rebuilt, meta_back = model_from_checkpoint(path)
    assert meta_back == meta
    assert not rebuilt.training
    original = model.state_dict()
    rebuilt_state = rebuilt.state_dict()
    assert original.keys() == rebuilt_state.keys()
    for key, value in original.items():
        assert torch.equal(rebuilt_state[key], value), key
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))


def test_checkpoint_keeps_the_method_state(tmp_path: Path) -> None:
    record = ModelRecord(arch="cnn_small", num_classes=3, in_chans=1, model_kwargs={}, classes=["a", "b", "c"],
                         input_size=16, mean=[0.5], std=[0.25])
    state = {"bias": torch.tensor([0.5, -1.0]), "seed": 4, "weight_std": 0.06}
    path = tmp_path / "best.pt"
    save_checkpoint(path, build_model("cnn_small", 3, 1), {**record.as_meta(), "epoch": 1, "val_score": 0.0}, state)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"state_dict", "meta", "method_state"}
    back = Checkpoint.read(path).method_state
    assert back.keys() == state.keys() and torch.equal(back["bias"], state["bias"])
    assert (back["seed"], back["weight_std"]) == (4, 0.06)
    assert torch.equal(load_checkpoint(path)["method_state"]["bias"], state["bias"])


def test_checkpoint_overwrite_is_atomic_and_clean(tmp_path: Path) -> None:
    meta = ModelRecord(arch="cnn_small", num_classes=10, in_chans=1, model_kwargs={}, classes=list("0123456789"),
                       input_size=28, mean=[0.5], std=[0.25]).as_meta()
    path = tmp_path / "last.pt"
    torch.manual_seed(0)
    save_checkpoint(path, build_model("cnn_small", 10, 1), meta)
    torch.manual_seed(1)
    second = build_model("cnn_small", 10, 1)
    save_checkpoint(path, second, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    rebuilt, _ = model_from_checkpoint(path)
    assert torch.equal(rebuilt.fc.weight, second.fc.weight)


def test_load_checkpoint_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    assert issubclass(CheckpointError, ValueError)


def test_unreadable_checkpoint_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pt"):
        Checkpoint.read(path)
    torch.save({"state_dict": {}, "meta": {"arch": "cnn_small"}}, tmp_path / "old.pt")  # no classes, mean, ...
    with pytest.raises(CheckpointError, match="old.pt"):
        model_from_checkpoint(tmp_path / "old.pt")


# ---- model kwargs checked against the constructor (kdlib.models.accepted_kwargs) -------------
def _presets() -> list[tuple[str, str, dict]]:
    import yaml

    models = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["models"]
    return [(name, p["arch"], p.get("kwargs", {})) for name, p in models.items()]


@pytest.mark.parametrize(("preset", "arch", "kwargs"), _presets(), ids=[p[0] for p in _presets()])
def test_kwargs_check_agrees_with_the_real_constructor(preset: str, arch: str, kwargs: dict) -> None:
    """For every preset's architecture: what the check accepts builds, and a keyword it refuses is
    one the constructor refuses too (so the check is neither looser nor stricter than timm)."""
    from timm.models import _builder

    from kdlib.models import accepted_kwargs, kwargs_problems

    accepted = accepted_kwargs(arch, kwargs)
    assert accepted is not None and set(kwargs) <= accepted and "drop_rate" in accepted
    assert kwargs_problems(arch, kwargs) == []
    assert [k for k, _ in kwargs_problems(arch, {**kwargs, "blokcs": 8})] == ["kwargs.blokcs"]
    with pytest.raises(TypeError, match="blokcs"):
        timm.create_model(arch, num_classes=3, **kwargs, blokcs=8)
    # the builder the check stands in for is back in every timm module
    assert timm.models.resnet.build_model_with_cfg is _builder.build_model_with_cfg
    assert timm.models.vision_transformer.build_model_with_cfg is _builder.build_model_with_cfg


def test_own_models_take_no_catch_all_kwargs() -> None:
    with pytest.raises(TypeError, match="blokcs"):
        build_model("rescnn", 6, 3, blokcs=8)
    with pytest.raises(TypeError, match="width"):
        build_model("cnn_small", 10, 1, width=(8, 8, 8))
    # what timm.create_model adds to every entry-point call is still accepted
    assert count_parameters(timm.create_model("cnn_small", num_classes=10, in_chans=1, cache_dir="/tmp")) == 56_554


def test_kwargs_of_config_built_timm_models_are_not_guessed() -> None:
    """RegNet takes ``**kwargs`` into its config: the accepted set cannot be read from a signature,
    so the check says nothing rather than refusing valid settings."""
    from kdlib.models import accepted_kwargs, kwargs_problems

    assert accepted_kwargs("regnetx_002") is None
    assert kwargs_problems("regnetx_002", {"w0": 24}) == []


# ---- the projects' presets at their real size ---------------------------------------------------
# Published parameter counts at 1000 classes (torchvision's model docs for the ResNets, MobileNetV2 and
# EfficientNet-B0; the ConvNeXt and DeiT papers' 89M / 87M, exact figures of their released models).
PUBLISHED_PARAMETERS = {
    "convnext_b_fgvc": 88_591_464, "deit_b384_fgvc": 87_630_032, "resnet50_lskd": 25_557_032,
    "resnet18_lskd": 11_689_512, "mobilenetv2_lskd": 3_504_872, "efficientnet_b0_lskd": 5_288_548,
    "resnet34_lshfm": 21_797_672, "resnet18_lshfm": 11_689_512,
}
# too slow to run forward on 2 CPU cores at 384 px: building them is the check
BUILD_ONLY = {"convnext_b_fgvc", "deit_b384_fgvc"}


def _preset(name: str):
    from stages.params import read_params
    from kdlib.schema import parse_merged
    from kdlib.models import ModelSpec
    from kdlib.train import Recipe

    problems: list[str] = []
    spec, recipe = parse_merged((ModelSpec, Recipe), read_params()["models"][name], f"models.{name}.", problems)
    assert problems == []
    return spec, recipe


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_project_presets_build_at_their_real_size(name: str) -> None:
    from dataclasses import replace

    spec, _ = _preset(name)
    assert isinstance(spec.pretrained, str) and spec.pretrained.startswith("weights/")
    torch.manual_seed(0)
    model = replace(spec, pretrained=False).build(num_classes=1000, in_chans=3)
    assert count_parameters(model) == PUBLISHED_PARAMETERS[name]
    if name in BUILD_ONLY:
        return
    size = spec.input_size or 224
    with torch.no_grad():
        out = replace(spec, pretrained=False).build(num_classes=20, in_chans=3).eval()(torch.randn(1, 3, size, size))
    assert out.shape == (1, 20) and torch.isfinite(out).all()


def test_project_presets_recipes() -> None:
    """The recipes as the projects ran them (values checked against their scripts, not re-derived)."""
    convnext, deit = _preset("convnext_b_fgvc"), _preset("deit_b384_fgvc")
    assert (convnext[0].drop_path, deit[0].drop_path) == (0.8, 0.8)
    assert (convnext[0].input_size, deit[0].input_size) == (384, 384)
    assert convnext[0].model_kwargs == {"head_init_scale": 0.001, "drop_path_rate": 0.8}
    assert (convnext[1].optimizer, convnext[1].lr, convnext[1].weight_decay, convnext[1].epochs) == ("adamw", 5e-5, 1e-8, 60)
    # DeiT's --lr 5e-5 x batch 16 / 512, rising to its min_lr 1e-5
    assert (deit[1].lr, deit[1].min_lr, deit[1].batch_size, deit[1].epochs) == (5e-5 * 16 / 512, 1e-5, 16, 60)
    teacher = _preset("resnet50_lskd")[1]
    assert (teacher.optimizer, teacher.lr, teacher.weight_decay, teacher.schedule, teacher.step_epochs,
            teacher.step_gamma, teacher.epochs, teacher.batch_size) == ("sgd", 0.01, 1e-4, "step", 30, 0.1, 90, 256)
    for student in ("resnet18_lskd", "mobilenetv2_lskd", "efficientnet_b0_lskd"):
        r = _preset(student)[1]
        assert (r.lr, r.weight_decay, r.momentum, r.schedule, r.step_epochs, r.epochs) == (0.01, 1e-3, 0.9, "step", 80, 200)
    for name in ("resnet34_lshfm", "resnet18_lshfm"):
        spec, r = _preset(name)
        assert (spec.input_size, r.lr, r.weight_decay, r.batch_size, r.epochs, r.schedule, r.min_lr) == (
            448, 0.01, 1e-5, 16, 60, "cosine", 0.0)


# (teacher, student, dataset, overrides) as the README's reproduction commands run them
PROJECT_RUNS = [
    ("convnext_b_fgvc", "deit_b384_fgvc", "cub200_fgvc", {"distill": {"method": "deit_hard"}}),
    ("convnext_b_fgvc", "deit_b384_fgvc", "cub_dogs", {"distill": {"method": "deit_hard"}}),
    ("resnet50_lskd", "resnet18_lskd", "cub200", {"teacher_ls": 0.1}),
    ("resnet50_lskd", "mobilenetv2_lskd", "cub200", {"teacher_ls": 0.0}),
    ("resnet34_lshfm", "resnet18_lshfm", "voc2007", {"distill": {"method": "lshl2"}}),
]


@pytest.mark.parametrize(("teacher", "student", "dataset", "overrides"), PROJECT_RUNS,
                         ids=[f"{t}-{s}-{d}" for t, s, d, _ in PROJECT_RUNS])
def test_project_runs_resolve_once_their_weights_exist(tmp_path: Path, monkeypatch, teacher, student, dataset,
                                                       overrides) -> None:
    """Missing weights stop exactly the run that needs them; with the files in weights/ it resolves."""
    import copy

    from stages.params import ParamError, read_params, resolve

    values = copy.deepcopy(read_params(Path(__file__).resolve().parents[1] / "params.yaml"))
    values.update(teacher=teacher, student=student, dataset=dataset)
    for key, value in overrides.items():
        if isinstance(value, dict):
            values[key].update(value)
        else:
            values[key] = value
    monkeypatch.chdir(tmp_path)  # preset paths are relative to the working directory (the repository root)
    with pytest.raises(ParamError) as info:
        resolve(values)
    for preset in (teacher, student):
        assert f"models.{preset}.pretrained = {values['models'][preset]['pretrained']!r}: no such file" in str(info.value)
    for preset in (teacher, student):
        weights = tmp_path / values["models"][preset]["pretrained"]
        weights.parent.mkdir(exist_ok=True)
        weights.write_bytes(b"")
    run = resolve(values)
    assert (run.teacher.preset, run.student.preset, run.dataset.layout) == (teacher, student, values["datasets"][dataset]["layout"])
