"""Bad parameters stop before any work with a message naming the key, the value and what is
allowed: model kwargs against the constructor's signature, ``pretrained`` files, augmentation
options, preset names; presets not in use are checked like the ones in use."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdlib.data.spec import DatasetSpec
from kdlib.data.transforms import TRAIN_PRESETS, _option_checks, augment_option_problems
from kdlib.schema import parse
from stages.params import load_params, resolve
from tests.test_params import error_of, mutated

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def repo_params() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def _unused(params: dict[str, Any], kind: str, name: str) -> None:
    """The case is about a preset the run does not use (the issue: "accepted, breaks the next run")."""
    in_use = (params["teacher"], params["student"]) if kind == "models" else (params["dataset"],)
    assert name not in in_use


# ---------------------------------------------------------------- model kwargs and pretrained
@pytest.mark.parametrize(("preset", "key", "value", "intended", "expected"), [
    # the case: `-S models.rescnn.kwargs.blokcs=8` trained 4 blocks
    ("rescnn", "blokcs", 8, "blocks", "models.rescnn.kwargs.blokcs = 8: not a keyword argument of rescnn; it accepts: "
                            "blocks, drop_rate, global_pool, head_hidden, stem_channels"),
    ("cnn_small", "width", [16, 32, 32], "widths", "models.cnn_small.kwargs.width = [16, 32, 32]: not a keyword argument "
                                         "of cnn_small; it accepts: drop_rate, global_pool, widths"),
    # timm's: the class the entry point builds (VisionTransformerDistilled → VisionTransformer)
    ("deit", "dpeth", 2, "depth", "models.deit.kwargs.dpeth = 2: not a keyword argument of "
                         "deit_tiny_distilled_patch16_224; it accepts: "),
    ("resnet18", "layer", [1, 1, 1, 1], "layers", "models.resnet18.kwargs.layer = [1, 1, 1, 1]: not a keyword argument "
                                        "of resnet18; it accepts: "),
], ids=["rescnn_typo", "cnn_small_typo", "deit_typo", "resnet18_typo"])
def test_unknown_model_kwarg_lists_the_accepted_ones(repo_params, preset, key, value, intended, expected) -> None:
    message = error_of(mutated(repo_params, f"models.{preset}.kwargs", {key: value}))
    assert expected in message
    listed = message.split("it accepts: ", 1)[1].splitlines()[0].split(", ")
    assert intended in listed and key not in listed
    assert "num_classes" not in listed and "in_chans" not in listed  # set from the data set, never kwargs


def test_deit_kwargs_list_its_real_arguments(repo_params) -> None:
    message = error_of(mutated(repo_params, "models.deit.kwargs.dpeth", 2))
    listed = message.split("it accepts: ", 1)[1].splitlines()[0].split(", ")
    assert {"depth", "img_size", "patch_size", "embed_dim", "num_heads", "drop_path_rate"} <= set(listed)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("models.cnn_small.kwargs", {"num_classes": 10},
     "models.cnn_small.kwargs.num_classes = 10: expected no such key: it is set from the data set's classes"),
    ("models.rescnn.kwargs.blocks", None,
     "models.rescnn.kwargs.blocks = None: expected a value (timm.create_model drops null keyword arguments"),
    ("models.cnn_small.drop_path", 0.1,
     "models.cnn_small.drop_path = 0.1: cnn_small has no stochastic depth (no drop_path_rate argument); expected 0"),
    ("models.deit.kwargs.drop_path_rate", 0.2,
     "models.deit.kwargs.drop_path_rate = 0.2: expected no drop_path_rate when drop_path is set"),
], ids=["kwarg_set_elsewhere", "kwarg_null", "drop_path_without_stochastic_depth", "drop_path_twice"])
def test_model_kwargs_that_would_be_ignored_or_clash(repo_params, key, value, expected) -> None:
    assert expected in error_of(mutated(repo_params, key, value))


def test_valid_kwargs_of_every_preset_are_accepted(repo_params) -> None:
    params = mutated(repo_params, "models.rescnn.kwargs", {"blocks": 6, "head_hidden": [64], "drop_rate": 0.1})
    resolve(mutated(params, "models.deit.kwargs.mlp_ratio", 2.0))


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_missing_pretrained_file_names_key_path_and_what_it_should_be(repo_params, tmp_path: Path, role) -> None:
    # (a preset in use: since presets name real weights files, only those of the run are checked)
    _unused(repo_params, "models", "convnext")
    missing = str(tmp_path / "convnext_atto.safetensors")
    message = error_of(mutated(mutated(repo_params, "models.convnext.pretrained", missing), role, "convnext"))
    assert f"models.convnext.pretrained = {missing!r}: no such file; expected false, true (timm's default " \
           "weights) or the path of an existing .safetensors / .pth / .bin state dict" in message
    assert f"the {role} preset 'convnext'" in message and "-S models.convnext.pretrained=" in message
    (tmp_path / "convnext_atto.safetensors").write_bytes(b"")  # exists: the file's content is read at build time
    resolve(mutated(mutated(repo_params, "models.convnext.pretrained", missing), role, "convnext"))


def test_missing_pretrained_file_of_an_unused_preset_is_accepted(repo_params, tmp_path: Path) -> None:
    """A preset naming weights this machine lacks (the projects' presets point under weights/) does
    not make params.yaml invalid while no role uses it; one message when teacher == student."""
    _unused(repo_params, "models", "convnext")
    missing = str(tmp_path / "convnext_atto.safetensors")
    resolve(mutated(repo_params, "models.convnext.pretrained", missing))
    both = mutated(mutated(mutated(repo_params, "models.convnext.pretrained", missing), "teacher", "convnext"),
                   "student", "convnext")
    assert error_of(both).count(f"models.convnext.pretrained = {missing!r}") == 1


# ---------------------------------------------------------------- presets not in use, preset names
def test_invalid_unused_presets_fail_load_params(repo_params, tmp_path: Path, capsys) -> None:
    _unused(repo_params, "models", "rescnn")
    _unused(repo_params, "datasets", "cifar100")
    params = mutated(repo_params, "models.rescnn.kwargs.blokcs", 8)
    params = mutated(params, "datasets.cifar100.eval_crop_pct", 0.0)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit) as info:
        load_params(path)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "models.rescnn.kwargs.blokcs = 8: not a keyword argument of rescnn" in err
    assert "datasets.cifar100.eval_crop_pct = 0.0: expected a number in (0, 1]" in err


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_role_naming_a_missing_model_preset_lists_the_presets(repo_params, role) -> None:
    message = error_of(mutated(repo_params, role, "nosuch"))
    assert f"{role} = 'nosuch': expected one of the models presets: {', '.join(repo_params['models'])}" in message


def test_dataset_naming_a_missing_preset_lists_the_presets(repo_params) -> None:
    message = error_of(mutated(repo_params, "dataset", "nosuch"))
    assert f"dataset = 'nosuch': expected one of: {', '.join(repo_params['datasets'])}" in message


# ---------------------------------------------------------------- augmentation options
def _augment_error(params: dict[str, Any], dataset: str, augment: str, options: dict[str, Any]) -> str:
    preset = {**params["datasets"][dataset], "augment": augment, "augment_options": options}
    problems: list[str] = []
    assert parse(DatasetSpec, preset, f"datasets.{dataset}.", problems) is None
    return "\n".join(problems)


@pytest.mark.parametrize(("dataset", "augment", "options", "expected"), [
    ("mnist", "shift", {"shift_px": -2}, "datasets.mnist.augment_options.shift_px = -2: expected an integer in [0, 27]"),
    ("cifar10", "shift", {"shift_px": 4.5}, "datasets.cifar10.augment_options.shift_px = 4.5: expected an integer"),
    ("cifar10", "shift", {"shift_px": 32}, "datasets.cifar10.augment_options.shift_px = 32: expected an integer in [0, 31]"),
    ("cifar10", "shift", {"hflip": "yes"}, "datasets.cifar10.augment_options.hflip = 'yes': expected true or false"),
    ("cifar10", "shift", {"shift": 4}, "datasets.cifar10.augment_options.shift = 4: unknown option of the 'shift' "
                                       "augmentation; it takes: shift_px, hflip"),
    ("oxford_pets", "imagenet", {"scale": [0.5, 0.2]}, "datasets.oxford_pets.augment_options.scale = [0.5, 0.2]: "
                                                       "expected two numbers [lo, hi] with 0 < lo <= hi <= 1"),
    ("oxford_pets", "imagenet", {"scale": [0.0, 1.0]}, "augment_options.scale = [0.0, 1.0]: expected two numbers"),
    ("foodx251", "deit", {"magnitude": 31}, "datasets.foodx251.augment_options.magnitude = 31: expected an integer "
                                           "in [0, 30]"),
    ("foodx251", "deit", {"erase_prob": 1.5}, "datasets.foodx251.augment_options.erase_prob = 1.5: expected a "
                                              "number in [0, 1]"),
    ("cub200", "cub_ls", {"scale": [0.2, 1.0]}, "datasets.cub200.augment_options.scale = [0.2, 1.0]: unknown option "
                                                "of the 'cub_ls' augmentation; it takes: none"),
], ids=["shift_negative", "shift_float", "shift_past_image", "hflip_not_bool", "shift_unknown_option",
        "scale_reversed", "scale_zero", "magnitude_too_big", "erase_prob_above_1", "option_of_optionless_preset"])
def test_bad_augmentation_option(repo_params, dataset, augment, options, expected) -> None:
    """Through the real DatasetSpec and, for the first case, the whole of params.yaml."""
    if dataset == "mnist":
        assert expected in error_of(mutated(repo_params, "datasets.mnist.augment_options", options))
    assert expected in _augment_error(repo_params, dataset, augment, options)


def test_every_augmentation_option_has_a_range_and_its_default_is_in_it() -> None:
    checks = _option_checks(224)
    for name in TRAIN_PRESETS.names():
        options = {p.name: p.default for p in inspect.signature(TRAIN_PRESETS.get(name)).parameters.values()
                   if p.name != "image_size"}
        assert set(options) == set(checks.get(name, {})), name
        assert augment_option_problems(name, options, 224) == [], name


def test_repository_augmentation_options_pass(repo_params) -> None:
    for name, preset in repo_params["datasets"].items():
        assert augment_option_problems(preset["augment"], preset.get("augment_options", {}),
                                       preset["image_size"]) == [], name
