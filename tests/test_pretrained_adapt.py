"""Loading ImageNet-shaped weights into a model for a new task (kdlib.models.adapt).

Weight files are made from randomly initialized timm models (small variants, or the real
architecture shrunk to one block), saved in the formats the source projects use; every expected
value is computed here independently of the loader."""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kdlib.checkpoint import save_checkpoint
from kdlib.models import PretrainedMismatch, build_model
from kdlib.models.adapt import load_pretrained, read_state_dict

SEED_FILE, SEED_MODEL = 123, 7


def _source(arch: str, **kwargs) -> dict[str, torch.Tensor]:
    """An ImageNet-shaped (1000 classes, RGB) random state dict, cloned so nothing aliases the model."""
    torch.manual_seed(SEED_FILE)
    return {k: v.clone() for k, v in build_model(arch, 1000, 3, **kwargs).state_dict().items()}


def _fresh(arch: str, num_classes: int, in_chans: int, **kwargs) -> dict[str, torch.Tensor]:
    """The state a model gets from its own initialization (same seed as the loading build)."""
    torch.manual_seed(SEED_MODEL)
    return build_model(arch, num_classes, in_chans, **kwargs).state_dict()


def _load(arch: str, num_classes: int, in_chans: int, path: Path, **kwargs) -> torch.nn.Module:
    torch.manual_seed(SEED_MODEL)
    return build_model(arch, num_classes, in_chans, pretrained=str(path), **kwargs)


def _deit_pos_embed_finetune(pos: torch.Tensor, prefix: int, new_side: int) -> torch.Tensor:
    """DeiT main.py --finetune: prefix tokens kept in front, the patch grid resized bicubically
    (align_corners=False, no antialiasing)."""
    side = int((pos.shape[1] - prefix) ** 0.5)
    grid = pos[:, prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :prefix], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kdlib.models"]


# ---------------------------------------------------------------- DeiT: heads, stem, position embeddings
def test_deit_distilled_224_to_384_one_channel_200_classes(tmp_path: Path, caplog) -> None:
    """DeiT's --finetune case: both heads dropped, pos_embed 14x14 -> 24x24 with the class and
    distillation tokens kept, and (a grey data set) the patch embedding summed over RGB."""
    arch = "deit_tiny_distilled_patch16_224"
    source = _source(arch, depth=1)
    path = tmp_path / "deit.pth"
    # DeiT's training checkpoint layout (best_checkpoint.pth), its arguments pickled as a Namespace
    torch.save({"model": source, "epoch": 299, "args": argparse.Namespace(lr=5e-4, model=arch)}, path)
    caplog.set_level(logging.INFO, logger="kdlib.models")
    model = _load(arch, 200, 1, path, depth=1, img_size=384)
    state, fresh = model.state_dict(), _fresh(arch, 200, 1, depth=1, img_size=384)

    heads = {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    special = heads | {"pos_embed", "patch_embed.proj.weight"}
    for key in source.keys() - special:
        assert torch.equal(state[key], source[key]), key
    for key in heads:  # the model's own fresh head, not a slice of the file's
        assert state[key].shape[0] == 200
        assert torch.equal(state[key], fresh[key]), key
    assert not torch.equal(state["head.weight"], source["head.weight"][:200])
    assert torch.equal(state["patch_embed.proj.weight"], source["patch_embed.proj.weight"].sum(dim=1, keepdim=True))

    expected = _deit_pos_embed_finetune(source["pos_embed"], prefix=2, new_side=24)
    assert state["pos_embed"].shape == (1, 2 + 24 * 24, 192)
    torch.testing.assert_close(state["pos_embed"], expected, rtol=0, atol=1e-6)
    assert torch.equal(state["pos_embed"][:, :2], source["pos_embed"][:, :2])
    # timm's own loader antialiases (PIL's cubic kernel when upsampling): a different result
    side = 14
    grid = source["pos_embed"][:, 2:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    antialiased = F.interpolate(grid, size=(24, 24), mode="bicubic", align_corners=False, antialias=True)
    assert not torch.allclose(state["pos_embed"][:, 2:], antialiased.permute(0, 2, 3, 1).flatten(1, 2), atol=1e-3)

    text = "\n".join(_messages(caplog))
    assert "dropped head.weight, head.bias, head_dist.weight, head_dist.bias (1000 -> 200 classes; re-initialized)" in text
    assert "resized pos_embed (1, 198, 192) -> (1, 578, 192) (14x14 -> 24x24 patches" in text
    assert "adapted patch_embed.proj.weight 3 -> 1 channels (summed over RGB)" in text
    with torch.no_grad():  # and the adapted model runs at its new size
        assert model.eval()(torch.randn(1, 1, 384, 384)).shape == (1, 200)


def test_deit_base_shapes_give_the_documented_log_lines(tmp_path: Path, caplog) -> None:
    """DeiT-B (embedding 768) at 224 into the 384 px distilled DeiT-B, shrunk to one block."""
    path = tmp_path / "deit_base_distilled_patch16_224.safetensors"
    save_file(_source("deit_base_distilled_patch16_224", depth=1), str(path))
    caplog.set_level(logging.INFO, logger="kdlib.models")
    report = load_pretrained(build_model("deit_base_distilled_patch16_384", 200, 1, depth=1), path)
    assert report.dropped == ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")
    assert (report.file_classes, report.model_classes) == (1000, 200)
    assert [(r.key, r.file_shape, r.model_shape, r.prefix_tokens) for r in report.resized] == [
        ("pos_embed", (1, 198, 768), (1, 578, 768), 2)]
    assert [(a.key, a.file_channels, a.model_channels) for a in report.adapted] == [("patch_embed.proj.weight", 3, 1)]
    assert report.missing == () and report.unexpected == ()
    messages = _messages(caplog)
    assert ("pretrained weights: dropped head.weight, head.bias, head_dist.weight, head_dist.bias (1000 -> 200 "
            "classes; re-initialized)") in messages
    assert any(m.startswith("pretrained weights: resized pos_embed (1, 198, 768) -> (1, 578, 768)") for m in messages)
    assert any(m.startswith("pretrained weights: adapted patch_embed.proj.weight 3 -> 1 channels") for m in messages)
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "kdlib.models")


# ---------------------------------------------------------------- CNNs: classifier and stem names per family
@pytest.mark.parametrize(("arch", "classifier", "stem", "suffix"), [
    ("resnet18", "fc", "conv1", ".bin"),
    ("mobilenetv2_100", "classifier", "conv_stem", ".safetensors"),
    ("efficientnet_b0", "classifier", "conv_stem", ".pth"),
    ("convnext_atto", "head.fc", "stem.0", ".safetensors"),
])
def test_cnn_head_dropped_and_stem_summed(tmp_path: Path, arch, classifier, stem, suffix) -> None:
    source = _source(arch)
    path = tmp_path / f"{arch}{suffix}"
    save_file(source, str(path)) if suffix == ".safetensors" else torch.save(source, path)
    model = _load(arch, 10, 1, path)
    state, fresh = model.state_dict(), _fresh(arch, 10, 1)
    heads = {f"{classifier}.weight", f"{classifier}.bias"}
    for key in source.keys() - heads - {f"{stem}.weight"}:
        assert torch.equal(state[key], source[key]), key
    for key in heads:
        assert state[key].shape[0] == 10 and torch.equal(state[key], fresh[key]), key
    rgb = source[f"{stem}.weight"]
    assert torch.equal(state[f"{stem}.weight"], rgb[:, 0:1] + rgb[:, 1:2] + rgb[:, 2:3])


def test_three_channel_file_into_a_three_channel_task_keeps_the_stem(tmp_path: Path) -> None:
    source = _source("resnet18")
    path = tmp_path / "r18.pth"
    torch.save(source, path)
    report = load_pretrained(_load("resnet18", 37, 3, path), path, logger=None)
    assert report.adapted == () and report.dropped == ("fc.weight", "fc.bias")
    assert len(report.loaded) == len(source) - 2


# ---------------------------------------------------------------- file formats
def test_ls_kd_checkpoint_with_ddp_prefix(tmp_path: Path, caplog) -> None:
    """The LS–KD study's teacher files: {"state_dict": {"module.…"}, "best_acc1", "optimizer", …}."""
    source = _source("resnet50")
    path = tmp_path / "teacher=resnet50-0.1-best.pth.tar"
    torch.save({"epoch": 90, "arch": "resnet50", "state_dict": {f"module.{k}": v for k, v in source.items()},
                "best_acc1": 76.2, "optimizer": {"state": {}, "param_groups": []}}, path)
    state, prefix = read_state_dict(path)
    assert prefix == "module." and state.keys() == source.keys()
    caplog.set_level(logging.INFO, logger="kdlib.models")
    model = _load("resnet50", 200, 3, path)
    for key in source.keys() - {"fc.weight", "fc.bias"}:
        assert torch.equal(model.state_dict()[key], source[key]), key
    assert "stripped the 'module.' prefix" in _messages(caplog)[0]


def test_our_checkpoint_loads_completely(tmp_path: Path) -> None:
    """A kdlib checkpoint of the same task ({"state_dict", "meta"}) loads every tensor, head included."""
    torch.manual_seed(SEED_FILE)
    trained = build_model("mobilenetv2_100", 20, 3)
    path = tmp_path / "best.pt"
    save_checkpoint(path, trained, {"arch": "mobilenetv2_100"})
    report = load_pretrained(loaded := _load("mobilenetv2_100", 20, 3, path), path, logger=None)
    assert report.dropped == () and report.missing == () and report.adapted == ()
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def _to_facebook_convnext(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's ConvNeXt keys written back in facebookresearch/ConvNeXt's layout (its released
    checkpoints, and the DeiT+ConvNeXt FGVC project's teacher): Linear pointwise convs, `norm.` / `head.`."""
    out = {}
    for key, value in state.items():
        fb = re.sub(r"^stem\.", "downsample_layers.0.", key)
        fb = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", fb)
        fb = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", fb)
        fb = fb.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        fb = fb.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        if "pwconv" in fb and fb.endswith("weight") and value.ndim == 4:  # 1x1 conv -> Linear
            value = value.flatten(1)
        out[fb] = value
    return {"model": out}


def test_facebook_convnext_checkpoint_is_converted_by_timms_filter(tmp_path: Path, caplog) -> None:
    source = _source("convnext_atto")
    path = tmp_path / "convnext_atto_fb.pth"
    torch.save(_to_facebook_convnext(source), path)
    assert "downsample_layers.0.0.weight" in torch.load(path, weights_only=True)["model"]
    caplog.set_level(logging.INFO, logger="kdlib.models")
    model = _load("convnext_atto", 200, 3, path, head_init_scale=0.001)
    state, fresh = model.state_dict(), _fresh("convnext_atto", 200, 3, head_init_scale=0.001)
    for key in source.keys() - {"head.fc.weight", "head.fc.bias"}:
        assert torch.equal(state[key], source[key]), key
    assert torch.equal(state["head.fc.weight"], fresh["head.fc.weight"])  # ConvNeXt's scaled init kept
    assert "converted to timm's layout by timm.models.convnext.checkpoint_filter_fn" in _messages(caplog)[0]


# ---------------------------------------------------------------- what cannot be adapted, and partial files
def test_wrong_shape_names_the_key_and_both_shapes(tmp_path: Path) -> None:
    source = _source("resnet18")
    source["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(source, str(path))
    with pytest.raises(PretrainedMismatch) as info:
        build_model("resnet18", 10, 3, pretrained=str(path))
    message = str(info.value)
    assert "layer1.0.conv1.weight: file (32, 64, 3, 3) vs model (64, 64, 3, 3)" in message and "bad.safetensors" in message
    assert "fc.weight" not in message  # the class-count change is not a problem


def test_a_classifier_of_another_width_is_an_error_not_a_drop(tmp_path: Path) -> None:
    source = _source("resnet18")
    source["fc.weight"] = torch.zeros(1000, 256)
    path = tmp_path / "bad_head.pth"
    torch.save(source, path)
    with pytest.raises(PretrainedMismatch, match=re.escape("fc.weight: file (1000, 256) vs model (10, 512)")):
        build_model("resnet18", 10, 3, pretrained=str(path))


def test_a_file_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mobilenet.safetensors"
    save_file(_source("mobilenetv2_100"), str(path))
    with pytest.raises(PretrainedMismatch) as info:  # their `bn1` names coincide, with other shapes
        build_model("resnet18", 10, 3, pretrained=str(path))
    assert "bn1.weight: file (32,) vs model (64,)" in str(info.value)
    assert "is it the weights of another architecture?" in str(info.value)
    path = tmp_path / "no_common_key.pth"
    torch.save({k: v for k, v in _source("mobilenetv2_100").items() if not k.startswith("bn1.")}, path)
    with pytest.raises(PretrainedMismatch, match="none of the file's .* tensors belong to ResNet"):
        build_model("resnet18", 10, 3, pretrained=str(path))


def test_missing_and_unexpected_keys_are_reported(tmp_path: Path, caplog) -> None:
    source = _source("resnet18")
    removed = source.pop("layer4.1.bn2.running_mean")
    source["aux_head.weight"] = torch.ones(3)
    path = tmp_path / "partial.pth"
    torch.save(source, path)
    caplog.set_level(logging.INFO, logger="kdlib.models")
    model = _load("resnet18", 1000, 3, path)
    assert torch.equal(model.state_dict()["layer4.1.bn2.running_mean"], torch.zeros_like(removed))  # BN's init
    warnings = [r.getMessage() for r in caplog.records if r.name == "kdlib.models" and r.levelno == logging.WARNING]
    assert warnings == ["pretrained weights: not in the file, left at initialization: layer4.1.bn2.running_mean",
                        "pretrained weights: in the file but not in the model, ignored: aux_head.weight"]


class Arbitrary:
    """Any class: unpickling it would need code, which weights_only refuses."""


def test_unreadable_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(PretrainedMismatch, match="broken.pth"):
        build_model("resnet18", 10, 3, pretrained=str(path))
    torch.save({"epoch": 3, "args": {"lr": 0.1}}, tmp_path / "no_weights.pth")
    with pytest.raises(PretrainedMismatch, match="no_weights.pth.*top-level keys are epoch, args"):
        build_model("resnet18", 10, 3, pretrained=str(tmp_path / "no_weights.pth"))

    # a pickled object needing code to load: refused (weights_only), with the file named
    torch.save({"state_dict": _source("resnet18"), "extra": Arbitrary()}, tmp_path / "pickled.pth")
    with pytest.raises(PretrainedMismatch, match="pickled.pth.*cannot be read"):
        build_model("resnet18", 10, 3, pretrained=str(tmp_path / "pickled.pth"))
