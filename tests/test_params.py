"""params.yaml validation and resolution into a frozen Run (stages/params.py), and the lr
schedule / optimizer groups of kdlib.train."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kdlib.losses import METHODS, distillation_methods
from kdlib.quantize import EvalSettings
from kdlib.schema import keys
from kdlib.train import Recipe, build_optimizer, lr_factor
from stages.params import ParamError, Run, load_params, read_params, resolve, validate

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def repo_params() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def mutated(params: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(params)
    *parents, last = dotted.split(".")
    node = out
    for key in parents:
        node = node[key]
    node[last] = value
    return out


def error_of(params: dict[str, Any]) -> str:
    with pytest.raises(ParamError) as info:
        validate(params)
    return str(info.value)


def test_repository_params_validate(repo_params) -> None:
    validate(repo_params)
    assert read_params(REPO_ROOT / "params.yaml") == repo_params  # the raw mapping
    run = load_params(REPO_ROOT / "params.yaml")
    assert isinstance(run, Run) and run == resolve(repo_params)
    assert run.params.seed == repo_params["seed"] and run.seed == repo_params["seed"]
    assert run.params.dataset == repo_params["dataset"]
    assert (run.params.teacher, run.params.student) == (repo_params["teacher"], repo_params["student"])
    assert run.teacher.preset == repo_params["teacher"] and run.student.preset == repo_params["student"]
    assert run.params.data.split_seed == repo_params["data"]["split_seed"]
    assert {k: v for k, v in run.params.distill.items() if k != "transfer"} == \
        {k: v for k, v in repo_params["distill"].items() if k != "transfer"}
    assert dataclasses.asdict(run.params.transfer) == repo_params["distill"]["transfer"]  # parsed into its class
    assert run.method.name == repo_params["distill"]["method"]
    assert dict(run.method.knobs) == repo_params["distill"][run.method.name]
    assert run.params.eval.precisions == repo_params["eval"]["precisions"]
    assert set(run.params.models) == set(repo_params["models"])
    assert set(run.params.datasets) == set(repo_params["datasets"])
    assert run.dataset == run.params.datasets[repo_params["dataset"]]


def test_every_model_preset_can_be_the_student(repo_params) -> None:
    for name in repo_params["models"]:
        params = mutated(repo_params, "student", name)
        if isinstance(repo_params["models"][name].get("pretrained"), str):  # the projects' weights/ files,
            params = mutated(params, f"models.{name}.pretrained", False)  # absent here (checked in test_models)
        validate(params)


def test_unknown_top_level_key(repo_params) -> None:
    message = error_of(mutated(repo_params, "sed", 1))
    assert "sed: unknown key" in message
    assert "seed" in message and "models" in message  # what is allowed


def test_unknown_method_knob(repo_params) -> None:
    message = error_of(mutated(repo_params, "distill.kd.temprature", 4.0))
    assert "distill.kd" in message and "temprature" in message


def test_unknown_method_section(repo_params) -> None:
    message = error_of(mutated(repo_params, "distill.fitnets", {}))
    assert "distill.fitnets: unknown key" in message and "lshl2" in message and "deit_hard" in message


@pytest.mark.parametrize("method", ["ce", "bce", "nope"])
def test_method_must_be_a_registered_teacher_method(repo_params, method) -> None:
    message = error_of(mutated(repo_params, "distill.method", method))
    assert f"distill.method = {method!r}" in message and "kd" in message and "lshl2" in message


def test_chosen_method_needs_its_section(repo_params) -> None:
    params = copy.deepcopy(repo_params)
    del params["distill"]["deit_hard"]
    params["distill"]["method"] = "deit_hard"
    assert "distill.deit_hard: missing" in error_of(params)


def test_missing_required_key(repo_params) -> None:
    params = copy.deepcopy(repo_params)
    del params["align"]["lr"]
    assert "align.lr: missing" in error_of(params)


@pytest.mark.parametrize("value", [0, -1, 0.0, float("nan"), float("inf")])
def test_temperature_must_be_positive_and_finite(repo_params, value) -> None:
    """A nan/inf temperature would pass a `<= 0` check and make every loss nan."""
    message = error_of(mutated(repo_params, "distill.kd.temperature", value))
    assert "distill.kd" in message and "temperature" in message


@pytest.mark.parametrize("value", [1.5, -0.1])
def test_alpha_in_unit_interval(repo_params, value) -> None:
    message = error_of(mutated(repo_params, "distill.kd.alpha", value))
    assert "distill.kd" in message and "alpha" in message and str(value) in message


def test_alpha_bounds_are_allowed(repo_params) -> None:
    validate(mutated(repo_params, "distill.kd.alpha", 0))
    validate(mutated(repo_params, "distill.kd.alpha", 1.0))


@pytest.mark.parametrize(("knob", "value"), [("bias", "mode"), ("num_hyperplanes", 0), ("sigma", -1.0),
                                             ("beta", -1.0)])
def test_lsh_knobs_are_checked(repo_params, knob, value) -> None:
    message = error_of(mutated(repo_params, f"distill.lshl2.{knob}", value))
    assert "distill.lshl2" in message and knob in message


@pytest.mark.parametrize(("key", "value"), [("teacher_ls", 1.0), ("teacher_ls", "0.1"), ("teacher_cache.views", 0),
                                            ("teacher_cache.enabled", "yes"), ("teacher_cache.max_layer_mib", 0),
                                            ("teacher_cache.max_layer_mib", "1G"), ("align.epochs", -1)])
def test_distillation_sections_are_checked(repo_params, key, value) -> None:
    assert f"{key} = {value!r}" in error_of(mutated(repo_params, key, value))


def test_the_layer_cache_limit_is_stated_and_a_number(repo_params) -> None:
    params = copy.deepcopy(repo_params)
    del params["teacher_cache"]["max_layer_mib"]
    assert "teacher_cache.max_layer_mib: missing" in error_of(params)
    assert resolve(mutated(repo_params, "teacher_cache.max_layer_mib", 0.5)).params.teacher_cache.max_layer_mib == 0.5


def test_every_method_with_its_defaults_validates(repo_params) -> None:
    """Each method's section validates on a data set of a task it fits (a method that fits
    neither the default mnist nor voc2007 would be a params.yaml mistake)."""
    multiclass, multilabel = distillation_methods("multiclass"), distillation_methods("multilabel")
    for method in repo_params["distill"]:
        if method in ("method", "transfer"):
            continue
        assert method in multiclass or method in multilabel, method
        params = mutated(repo_params, "distill.method", method)
        if method in multiclass:
            validate(params)
        if method in multilabel:
            validate(mutated(params, "dataset", "voc2007"))


def test_string_where_number_expected(repo_params) -> None:
    message = error_of(mutated(repo_params, "models.cnn_small.lr", "fast"))
    assert "models.cnn_small.lr = 'fast'" in message and "a number in (0, inf]" in message


@pytest.mark.parametrize("value", [-0.1, 0])
def test_lr_must_be_positive(repo_params, value) -> None:
    message = error_of(mutated(repo_params, "models.cnn_small.lr", value))
    assert f"models.cnn_small.lr = {value!r}" in message and "(0, inf]" in message


def test_unknown_student_lists_presets(repo_params) -> None:
    message = error_of(mutated(repo_params, "student", "nonexistent"))
    assert "student = 'nonexistent'" in message
    for name in repo_params["models"]:
        assert name in message


def test_unknown_teacher_and_dataset(repo_params) -> None:
    assert "teacher = 'bert'" in error_of(mutated(repo_params, "teacher", "bert"))
    message = error_of(mutated(repo_params, "dataset", "cifar"))
    assert "dataset = 'cifar'" in message and "mnist" in message


def test_unknown_architecture(repo_params) -> None:
    message = error_of(mutated(repo_params, "models.cnn_small.arch", "not_a_model"))
    assert "models.cnn_small.arch = 'not_a_model'" in message and "timm" in message


def test_unknown_layout(repo_params) -> None:
    message = error_of(mutated(repo_params, "datasets.mnist.layout", "voc"))
    assert "datasets.mnist.layout = 'voc'" in message
    assert "mnist" in message and "imagefolder" in message


def test_unknown_augment_preset(repo_params) -> None:
    message = error_of(mutated(repo_params, "datasets.mnist.augment", "mixup"))
    assert "datasets.mnist.augment = 'mixup'" in message and "shift" in message and "none" in message


def test_mean_length_must_match_channels(repo_params) -> None:
    message = error_of(mutated(repo_params, "datasets.mnist.mean", [0.5, 0.5, 0.5]))
    assert "datasets.mnist" in message and "mean and std" in message and "1 values" in message
    message = error_of(mutated(repo_params, "datasets.mnist.channels", 3))
    assert "3 values" in message


def test_std_must_be_positive(repo_params) -> None:
    message = error_of(mutated(repo_params, "datasets.mnist.std", [0.0]))
    assert "datasets.mnist.std" in message and "positive" in message


def test_batch_size_zero(repo_params) -> None:
    message = error_of(mutated(repo_params, "models.cnn_small.batch_size", 0))
    assert "models.cnn_small.batch_size = 0" in message and "an integer in [1, inf]" in message


def test_bool_where_int_expected(repo_params) -> None:
    message = error_of(mutated(repo_params, "models.cnn_small.epochs", True))
    assert "models.cnn_small.epochs = True" in message and "an integer" in message


def test_float_where_int_expected(repo_params) -> None:
    message = error_of(mutated(repo_params, "eval.batch_size", 256.0))
    assert "eval.batch_size = 256.0" in message and "an integer" in message


def test_bool_channels_rejected(repo_params) -> None:
    """`channels: true` must not pass as 1 (True == 1 in Python)."""
    message = error_of(mutated(repo_params, "datasets.mnist.channels", True))
    assert "datasets.mnist.channels" in message


def test_bad_choice_lists_allowed(repo_params) -> None:
    message = error_of(mutated(repo_params, "models.cnn_small.optimizer", "adam"))
    assert "models.cnn_small.optimizer = 'adam'" in message and "sgd" in message and "adamw" in message


def test_all_errors_are_reported_together(repo_params) -> None:
    params = mutated(mutated(repo_params, "distill.kd.alpha", 2.0), "seed", -1)
    message = error_of(params)
    assert "distill.kd" in message and "seed = -1" in message


def test_params_not_a_mapping() -> None:
    assert "expected a mapping" in error_of(None)  # type: ignore[arg-type]


def test_load_params_missing_file_exits_2(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SystemExit) as info:
        load_params(missing)
    assert info.value.code == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_load_params_invalid_file_exits_2(tmp_path: Path, capsys, repo_params) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(mutated(repo_params, "align.lr", -1)))
    with pytest.raises(SystemExit) as info:
        load_params(path)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "align.lr = -1" in err


def test_load_params_bad_yaml_exits_2(tmp_path: Path, capsys) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("seed: [unclosed\n")
    with pytest.raises(SystemExit) as info:
        load_params(path)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


# ---- kdlib.train: lr schedule and optimizer groups ------------------------------------------
def test_warmup_is_linear() -> None:
    recipe = Recipe(epochs=10, batch_size=8, lr=0.1, schedule="cosine", warmup_epochs=2)
    factors = [lr_factor(s, 5, recipe) for s in range(10)]
    assert factors == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_factor(10, 5, recipe) == pytest.approx(1.0)  # cosine starts at the peak


def test_cosine_decays_to_min_lr() -> None:
    recipe = Recipe(epochs=10, batch_size=8, lr=0.1, schedule="cosine", warmup_epochs=1, min_lr=0.001)
    spe = 20
    values = [lr_factor(s, spe, recipe) for s in range(spe, 10 * spe)]
    assert values[0] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone after warmup
    assert values[-1] == pytest.approx(0.01, abs=1e-3)  # min_lr / lr, near the end
    assert lr_factor(10 * spe, spe, recipe) == pytest.approx(0.01)
    midpoint = spe * (1 + 9 / 2)
    assert lr_factor(int(midpoint), spe, recipe) == pytest.approx(0.01 + 0.99 * 0.5, abs=1e-9)


def test_cosine_without_min_lr_ends_at_zero() -> None:
    recipe = Recipe(epochs=4, batch_size=8, lr=0.5, schedule="cosine")
    assert lr_factor(0, 10, recipe) == pytest.approx(1.0)
    assert lr_factor(40, 10, recipe) == pytest.approx(0.0, abs=1e-12)


def test_step_schedule_multiplies_by_gamma() -> None:
    recipe = Recipe(epochs=9, batch_size=8, lr=0.1, schedule="step", step_epochs=3, step_gamma=0.5)
    spe = 4
    for epoch in range(9):
        for step in range(epoch * spe, (epoch + 1) * spe):
            assert lr_factor(step, spe, recipe) == pytest.approx(0.5 ** (epoch // 3))


def test_constant_schedule_and_unknown() -> None:
    assert lr_factor(123, 10, Recipe(epochs=3, batch_size=1, lr=0.1, schedule="constant")) == 1.0
    with pytest.raises(ValueError, match="onecycle"):
        lr_factor(0, 10, Recipe(epochs=3, batch_size=1, lr=0.1, schedule="onecycle"))


def test_build_optimizer_no_decay_for_1d_params() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    recipe = Recipe(epochs=1, batch_size=1, lr=0.1, optimizer="sgd", momentum=0.8, nesterov=True,
                    weight_decay=1e-3)
    opt = build_optimizer(model, recipe)
    assert isinstance(opt, torch.optim.SGD)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    params = dict(model.named_parameters())
    assert {id(p) for p in decay["params"]} == {id(params["0.weight"]), id(params["3.weight"])}
    assert {id(p) for p in no_decay["params"]} == {
        id(params[n]) for n in ("0.bias", "1.weight", "1.bias", "3.bias")
    }
    assert all(g["lr"] == 0.1 and g["momentum"] == 0.8 and g["nesterov"] for g in opt.param_groups)


def test_build_optimizer_adamw_and_frozen_params() -> None:
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    opt = build_optimizer(model, Recipe(epochs=1, batch_size=1, lr=1e-3, optimizer="adamw", weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 0]
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="rmsprop"):
        build_optimizer(model, Recipe(epochs=1, batch_size=1, lr=1e-3, optimizer="rmsprop"))


def test_test_per_class_null_or_positive_int(repo_params) -> None:
    validate(mutated(repo_params, "datasets.mnist.options.test_per_class", None))
    validate(mutated(repo_params, "datasets.mnist.options.test_per_class", 5))
    message = error_of(mutated(repo_params, "datasets.mnist.options.test_per_class", 0))
    assert "datasets.mnist.options.test_per_class = 0" in message and "an integer in [1, inf]" in message


@pytest.mark.parametrize(("dotted", "value", "expected"), [
    ("datasets.mnist.options.train_per_class", "many", "datasets.mnist.options.train_per_class = 'many'"),
    ("datasets.mnist.options.trian_per_class", 5, "trian_per_class = 5: unknown option of the mnist layout"),
    ("datasets.mnist.options.seed", 3, "seed = 3: unknown option"),  # the split seed is data.split_seed
    ("datasets.cub_dogs.options.dog_root", "/x", "dog_root = '/x': unknown option of the cub_dogs layout; it takes: dogs_root"),
])
def test_layout_options_are_checked_against_the_layout(repo_params, dotted, value, expected) -> None:
    assert expected in error_of(mutated(repo_params, dotted, value))


def test_settings_do_not_share_the_callers_mappings(repo_params) -> None:
    from stages.params import resolve

    params = copy.deepcopy(repo_params)
    run = resolve(params)
    params["distill"]["kd"]["alpha"] = 7.0
    params["datasets"]["mnist"]["mean"][0] = 9.0
    assert run.params.distill["kd"]["alpha"] == repo_params["distill"]["kd"]["alpha"]
    assert run.dataset.mean == repo_params["datasets"]["mnist"]["mean"]


@pytest.mark.parametrize("key", ["train_per_class", "val_per_class", "test_per_class"])
def test_mnist_subset_keys_moved_out_of_data(repo_params, key) -> None:
    assert key in repo_params["datasets"]["mnist"]["options"]
    message = error_of(mutated(repo_params, f"data.{key}", 100))
    assert f"data.{key}: unknown key" in message and "split_seed" in message and "num_workers" in message


def test_every_model_preset_builds_and_runs_at_its_input_size(repo_root):
    """Each preset in params.yaml builds through timm and classifies a batch at its input size."""
    import torch
    import yaml

    from kdlib.models import ModelSpec

    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    dataset = params["datasets"][params["dataset"]]
    models = resolve(params).params.models
    assert set(models) == set(params["models"])
    from dataclasses import replace

    for name in params["models"]:
        spec = models[name][0]
        assert isinstance(spec, ModelSpec) and spec.arch == params["models"][name]["arch"]
        model = replace(spec, pretrained=False).build(10, dataset["channels"]).eval()  # weights/ files absent here
        size = spec.input_size or dataset["image_size"]
        if sum(p.numel() for p in model.parameters()) > 50_000_000:
            continue  # ConvNeXt-B / DeiT-B at 384 px: too slow on 2 CPU cores (built in test_models)
        with torch.no_grad():
            logits = model(torch.randn(2, dataset["channels"], size, size))
        assert logits.shape == (2, 10), name


def test_eval_roles_is_an_unknown_key(repo_params) -> None:
    """`eval.roles` is gone (evaluate and quantize run once per role, as DVC foreach stages)."""
    message = error_of(mutated(repo_params, "eval.roles", ["teacher", "distill"]))
    assert "eval.roles: unknown key" in message
    allowed = message.split("eval.roles: unknown key; allowed here: ", 1)[1].splitlines()[0].split(", ")
    assert allowed == keys(EvalSettings) and "roles" not in allowed
    assert set(allowed) == set(repo_params["eval"])  # params.yaml sets every eval key, and only those


def test_unknown_precision_lists_the_known_ones(repo_params) -> None:
    message = error_of(mutated(repo_params, "eval.precisions", ["fp32", "int4"]))
    assert "'int4'" in message and "onnx_int8" in message and "int8_static" in message


# ---- resolve(): every preset checked, derived facts, cross-section refusals, a frozen Run ------
@pytest.mark.parametrize(("key", "value", "expected"), [
    ("models.mobilenetv2.lr", -1, "models.mobilenetv2.lr = -1: expected a number in (0, inf]"),
    ("models.convnext.epochs", 0, "models.convnext.epochs = 0: expected an integer in [1, inf]"),
    ("models.rescnn.arch", "not_a_model", "models.rescnn.arch = 'not_a_model'"),
    ("datasets.cifar10.image_size", 4, "datasets.cifar10.image_size = 4: expected an integer in [8, inf]"),
    ("datasets.voc2007.ap_mode", "sklearn", "datasets.voc2007.ap_mode = 'sklearn'"),
])
def test_bad_value_in_a_preset_not_in_use_is_reported(repo_params, key, value, expected) -> None:
    preset = key.split(".")[1]
    assert preset not in (repo_params["teacher"], repo_params["student"], repo_params["dataset"])
    assert expected in error_of(mutated(repo_params, key, value))


def test_bad_distill_section_not_in_use_is_reported(repo_params) -> None:
    assert repo_params["distill"]["method"] != "lshl2"
    message = error_of(mutated(repo_params, "distill.lshl2.beta", -1.0))
    assert "distill.lshl2" in message and "beta" in message


def voc_run(params: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """``-S dataset=voc2007 -S distill.method=sigmoid_kd`` plus ``changes`` (dotted keys, ``__`` for ``.``)."""
    out = mutated(mutated(params, "dataset", "voc2007"), "distill.method", "sigmoid_kd")
    for key, value in changes.items():
        out = mutated(out, key.replace("__", "."), value)
    return out


def test_resolve_gives_the_derived_facts(repo_params) -> None:
    mnist = resolve(repo_params)
    assert (mnist.task, mnist.score) == ("multiclass", "top1")
    voc = resolve(voc_run(repo_params))
    assert (voc.task, voc.score) == ("multilabel", "mAP")
    assert voc.dataset == voc.params.datasets["voc2007"] and voc.dataset.layout == "voc2007"
    assert voc.method.name == "sigmoid_kd" and dict(voc.method.knobs) == repo_params["distill"]["sigmoid_kd"]
    assert voc.method.cls.fits("multilabel")
    # input sizes: the preset's, else the data set's image size
    assert voc.student.input_size == repo_params["datasets"]["voc2007"]["image_size"]
    deit = resolve(mutated(repo_params, "student", "deit"))
    assert deit.student.input_size == repo_params["models"]["deit"]["input_size"]
    assert deit.model("baseline") is deit.student and deit.model("distill") is deit.student
    assert deit.model("teacher") is deit.teacher
    # the run's loader settings go into both recipes
    run = resolve(mutated(mutated(repo_params, "eval.batch_size", 64), "data.num_workers", 3))
    for model in (run.teacher, run.student):
        assert (model.recipe.eval_batch_size, model.recipe.num_workers) == (64, 3)
    # the objectives follow the task: BCE on multi-label data, CE_ε (teacher_ls for the teacher) else
    assert isinstance(voc.objective("distill"), METHODS.get("sigmoid_kd"))
    assert isinstance(voc.objective("baseline"), METHODS.get("bce"))
    assert isinstance(voc.objective("teacher"), METHODS.get("bce"))
    assert isinstance(mnist.objective("distill"), METHODS.get("kd"))
    smoothed = resolve(mutated(mutated(repo_params, "teacher_ls", 0.1), "models.cnn_small.label_smoothing", 0.2))
    assert isinstance(smoothed.objective("teacher"), METHODS.get("ce"))
    assert smoothed.objective("teacher").label_smoothing == 0.1
    assert smoothed.objective("baseline").label_smoothing == 0.2


def test_num_views_is_the_cache_views_or_the_student_epochs(repo_params) -> None:
    params = mutated(mutated(repo_params, "student", "deit"), "models.deit.epochs", 7)
    assert repo_params["models"][repo_params["teacher"]]["epochs"] != 7  # the student's, not the teacher's
    assert resolve(mutated(params, "teacher_cache.views", None)).num_views == 7
    assert resolve(mutated(params, "teacher_cache.views", 3)).num_views == 3
    assert resolve(mutated(params, "teacher_cache.views", 12)).num_views == 12
    # without the cache every epoch draws a fresh view
    no_cache = mutated(mutated(params, "teacher_cache.views", 3), "teacher_cache.enabled", False)
    assert resolve(no_cache).num_views == 7
    assert resolve(voc_run(repo_params, teacher_cache__views=2)).num_views == 2


def test_method_that_does_not_fit_the_task_is_a_param_error(repo_params) -> None:
    message = error_of(mutated(repo_params, "dataset", "voc2007"))  # distill.method stays kd
    assert "distill.method = 'kd'" in message and "multilabel" in message
    listed = message.split("use one of: ", 1)[1].splitlines()[0].split(", ")
    assert "sigmoid_kd" in listed and listed == distillation_methods("multilabel")
    assert "kd" not in listed and "lshl2_s" not in listed and "deit_soft" not in listed
    # and the other way round
    message = error_of(mutated(repo_params, "distill.method", "sigmoid_kd"))
    assert "distill.method = 'sigmoid_kd'" in message and "multiclass" in message
    assert "kd" in message.split("use one of: ", 1)[1].splitlines()[0].split(", ")


@pytest.mark.parametrize("key", ["mixup", "cutmix"])
def test_mixing_with_the_teacher_cache_is_a_param_error(repo_params, key) -> None:
    params = mutated(repo_params, f"datasets.mnist.{key}", 0.8)
    assert repo_params["teacher_cache"]["enabled"] is True
    message = error_of(params)
    assert "teacher_cache.enabled" in message and "datasets.mnist" in message
    resolve(mutated(params, "teacher_cache.enabled", False))  # without the cache it is fine
    # a mixing preset that is not in use does not matter
    resolve(mutated(repo_params, f"datasets.stanford_dogs.{key}", 0.8))


def test_run_is_frozen(repo_params) -> None:
    run = resolve(repo_params)
    for target, name, value in [(run, "params", None), (run, "dataset", None), (run, "method", None),
                                (run, "teacher", None), (run, "student", None), (run, "seed", 1),
                                (run.params, "seed", 1), (run.params, "student", "deit"),
                                (run.params.teacher_cache, "enabled", False), (run.student, "input_size", 32),
                                (run.student, "recipe", None), (run.student.recipe, "lr", 1.0),
                                (run.student.spec, "arch", "resnet18"), (run.dataset, "image_size", 32),
                                (run.method, "name", "lshl2")]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(target, name, value)
    assert run == resolve(repo_params)  # nothing changed


def test_a_preset_may_train_on_its_own_augmentation(repo_params) -> None:
    """Hinton et al. 2015 jitter the teacher's images and train the student on plain ones: the student
    preset's `augment: none` changes its training views (and the teacher cache's key), not the teacher's."""
    from kdlib.distill import teacher_cache_key

    run = resolve(mutated(repo_params, "models.cnn_small.augment", "none"))
    assert run.student.preset == "cnn_small" and run.teacher.preset == "resnet18"
    assert (run.train_dataset("baseline").augment, run.train_dataset("baseline").augment_options) == ("none", {})
    assert run.train_dataset("distill") == run.train_dataset("baseline")
    assert run.train_dataset("teacher") == run.dataset and run.dataset.augment == "shift"
    plain, jittered = run.train_dataset("distill"), run.dataset
    assert plain.view_key(28) != jittered.view_key(28)
    default = resolve(repo_params)
    assert default.train_dataset("distill") is default.dataset  # null: the data set's, unchanged
    options = resolve(mutated(repo_params, "models.cnn_small.augment", {"shift": {"shift_px": 1}}))
    assert options.train_dataset("baseline").augment_options == {"shift_px": 1}
    key = lambda spec: teacher_cache_key(REPO_ROOT / "params.yaml", [REPO_ROOT / "dvc.yaml"], spec, 28, 2, 0)  # noqa: E731
    assert key(plain) != key(jittered)


@pytest.mark.parametrize(("value", "expected"), [
    ("nosuch", "models.cnn_small.augment = 'nosuch': expected null (the data set's augmentation) or one of: "),
    ({"shift": {"shift_px": 40}}, "models.cnn_small.augment.shift.shift_px = 40: expected an integer in [0, 27] "
                                  "(the 'mnist' data set's images are 28 px)"),
    ({"shift": {"bad": 1}}, "models.cnn_small: augment.shift.bad: unknown option of the 'shift' augmentation"),
    ({"shift": {}, "none": {}}, "models.cnn_small.augment = {'shift': {}, 'none': {}}: expected one "),
    (3, "models.cnn_small.augment = 3: expected null, an augmentation preset name, or {preset: {options}}"),
])
def test_a_bad_preset_augmentation_names_the_key(repo_params, value, expected) -> None:
    assert expected in error_of(mutated(repo_params, "models.cnn_small.augment", value))


def test_every_model_preset_states_its_augmentation(repo_params) -> None:
    """dvc.yaml's teacher_cache stage names `models.${student}.augment`: DVC needs the key in every preset."""
    params = copy.deepcopy(repo_params)
    del params["models"]["rescnn"]["augment"]
    assert "models.rescnn.augment: missing" in error_of(params)


def test_a_method_that_refuses_soft_targets_is_refused_with_mixup_or_cutmix(repo_params) -> None:
    """DKD splits each row at its label: with MixUp or CutMix on it is refused before any work, both
    keys named; the methods that take soft targets are not."""
    dkd = mutated(mutated(repo_params, "distill.method", "dkd"), "teacher_cache.enabled", False)
    validate(dkd)
    message = error_of(mutated(mutated(dkd, "datasets.mnist.mixup", 0.8), "datasets.mnist.cutmix", 1.0))
    assert "distill.method = 'dkd' needs integer labels" in message
    assert "datasets.mnist.mixup = 0.8 and cutmix = 1.0 give soft targets" in message
    validate(mutated(mutated(repo_params, "datasets.mnist.mixup", 0.8), "teacher_cache.enabled", False))  # kd's CE


def test_params_yaml_is_in_the_style_dvc_writes_back(tmp_path: Path) -> None:
    """`dvc exp run -S` rewrites params.yaml through DVC's own writer (Hydra overrides, ruamel): the committed
    file is already in that style (block lists, empty nulls), so an experiment's params.yaml differs from main's
    in exactly the lines it sets, and `git diff` shows only them."""
    from dvc.utils.hydra import apply_overrides

    original = (REPO_ROOT / "params.yaml").read_text()
    copy_path = tmp_path / "params.yaml"
    copy_path.write_text(original)
    apply_overrides(str(copy_path), ["seed=0"])  # the value it has: nothing changes
    assert copy_path.read_text() == original
    apply_overrides(str(copy_path), ["distill.kd.temperature=2", "eval.precisions=[fp32,int8]", "seed=3"])
    diff = list(difflib.unified_diff(original.splitlines(), copy_path.read_text().splitlines(), lineterm="", n=0))
    removed = [line[1:].split("#")[0].strip() for line in diff if line.startswith("-") and not line.startswith("---")]
    added = [line[1:].split("#")[0].strip() for line in diff if line.startswith("+") and not line.startswith("+++")]
    assert removed == ["seed: 0", "temperature: 4.0", "- bf16", "- fp16", "- int8_dynamic", "- int8_static", "- fp8",
                       "- onnx_fp32", "- onnx_int8"], diff
    assert added == ["seed: 3", "temperature: 2", "- int8"], diff
    assert read_params(copy_path)["distill"]["kd"]["temperature"] == 2
