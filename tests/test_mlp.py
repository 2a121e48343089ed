"""The ``mlp`` architecture (kdlib/models/mlp.py): sizes, max-norm, dropout, the timm interface,
the kwargs check, and the hook the training loop calls after every step."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from kdlib.models import build_model, count_parameters, kwargs_problems
from kdlib.models.mlp import MLP


def _by_hand(widths: list[int]) -> int:
    """Σ (n_in·n_out + n_out) over consecutive widths."""
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def test_parameter_counts_by_hand() -> None:
    teacher = build_model("mlp", 10, 1, hidden=[1200, 1200])
    assert count_parameters(teacher) == 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10 == 2_395_210
    assert count_parameters(build_model("mlp", 10, 1)) == 2_395_210  # the default is Hinton's teacher
    student = build_model("mlp", 10, 1, hidden=[800, 800])
    assert count_parameters(student) == 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10 == 1_276_810
    assert count_parameters(build_model("mlp", 10, 1, hidden=[30, 30])) == _by_hand([784, 30, 30, 10]) == 24_790
    # channels and image size set the input width: 3×32×32 = 3,072 inputs
    assert count_parameters(build_model("mlp", 4, 3, hidden=[16], img_size=32)) == _by_hand([3072, 16, 4])


def test_build_model_path_and_timm_registry() -> None:
    model = build_model("mlp", 10, 1, hidden=[800, 800])
    assert isinstance(model, MLP) and "mlp" in timm.list_models()
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [800, 800, 10]
    out = model.eval()(torch.rand(5, 1, 28, 28))
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("mlp", pretrained=True)
    with pytest.raises(ValueError, match=r"1×28×28 inputs.*img_size"):
        model(torch.rand(2, 1, 32, 32))


def test_kwargs_check_names_unknown_keys() -> None:
    assert kwargs_problems("mlp", {"hidden": [800, 800], "input_dropout": 0.2, "hidden_dropout": 0.5,
                                   "max_norm": 3.0}) == []
    problems = kwargs_problems("mlp", {"hidden": [800, 800], "hiden_dropout": 0.5, "maxnorm": 3.0})
    assert [key for key, _ in problems] == ["kwargs.hiden_dropout", "kwargs.maxnorm"]
    assert all("not a keyword argument of mlp" in text and "hidden_dropout" in text and "max_norm" in text
               for _, text in problems)
    # null would silently fall back to the default (timm drops None kwargs): refused with its key
    assert [key for key, _ in kwargs_problems("mlp", {"max_norm": None})] == ["kwargs.max_norm"]
    with pytest.raises(TypeError, match="hiden_dropout"):
        build_model("mlp", 10, 1, hiden_dropout=0.5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"hidden": []}, "hidden = \\[\\]: expected a non-empty list"),
    ({"hidden": [800, 0]}, "expected a non-empty list of positive integer widths"),
    ({"input_dropout": 1.0}, "input_dropout = 1.0: expected a dropout probability in \\[0, 1\\)"),
    ({"hidden_dropout": -0.1}, "hidden_dropout = -0.1"),
    ({"max_norm": 0}, "max_norm = 0: expected null, a positive number, or a list of 2"),
    ({"max_norm": [3.0]}, "a list of 2 positive numbers"),
    ({"img_size": 0}, "img_size = 0"),
])
def test_bad_values_name_key_value_and_expectation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model("mlp", 10, 1, **kwargs)


def _hidden_linears(model: MLP) -> list[nn.Linear]:
    return [m for m in model.hidden if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("max_norm", [1.5, [2.0, 1.0]])
def test_max_norm_holds_after_a_huge_sgd_step(max_norm: float | list[float]) -> None:
    """One real SGD step at lr 100 throws the active units' rows far past the bound; apply_constraints
    brings each back to exactly c·w/‖w‖, leaves the rows inside untouched bit for bit, and never
    touches the output layer (the paper constrains hidden units only)."""
    torch.manual_seed(0)
    model = build_model("mlp", 10, 1, hidden=[64, 48], max_norm=max_norm)
    bounds = max_norm if isinstance(max_norm, list) else [max_norm, max_norm]
    first, second = _hidden_linears(model)
    with torch.no_grad():  # units 0..15 of each hidden layer feed nothing: their rows get no gradient
        second.weight[:, :16] = 0
        model.fc.weight[:, :16] = 0
    optimizer = torch.optim.SGD(model.parameters(), lr=100.0)
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    stepped = [layer.weight.detach().clone() for layer in _hidden_linears(model)]
    fc_before = model.fc.weight.detach().clone()
    model.apply_constraints()
    for layer, before, c in zip(_hidden_linears(model), stepped, bounds):
        norms_before = before.norm(dim=1)
        outside = norms_before > c
        assert outside.sum() >= 8 and (~outside).sum() >= 16  # the test sees both kinds of rows
        after = layer.weight.detach()
        assert (after.norm(dim=1) <= c + 1e-6).all()
        assert torch.equal(after[~outside], before[~outside])  # bit for bit
        expected = before[outside] * (c / norms_before[outside])[:, None]
        assert torch.allclose(after[outside], expected, rtol=1e-6, atol=0)
        assert torch.allclose(after[outside].norm(dim=1), torch.full((int(outside.sum()),), c), rtol=1e-6)
    assert torch.equal(model.fc.weight, fc_before) and (fc_before.norm(dim=1) > max(bounds)).any()


def test_no_max_norm_leaves_weights_alone() -> None:
    model = build_model("mlp", 10, 1, hidden=[32])
    with torch.no_grad():
        model.hidden[0].weight.mul_(100.0)
    before = model.hidden[0].weight.detach().clone()
    model.apply_constraints()
    assert torch.equal(model.hidden[0].weight, before)


def test_dropout_only_in_training_mode() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", 10, 1, hidden=[200, 200], input_dropout=0.2, hidden_dropout=0.5)
    x = torch.rand(8, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))
    # input dropout alone also makes training forwards differ
    lone = build_model("mlp", 10, 1, hidden=[50], input_dropout=0.2).train()
    with torch.no_grad():
        assert not torch.allclose(lone(x), lone(x))
    dropouts = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts == [0.2, 0.5, 0.5]  # input, after hidden 1, after hidden 2 (the classifier's input)


def test_drop_rate_is_the_classifier_input_dropout() -> None:
    model = build_model("mlp", 10, 1, hidden=[20, 20], hidden_dropout=0.5, drop_rate=0.1)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.0, 0.5, 0.1]


def test_pre_logits_are_the_last_hidden_activations() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", 10, 1, hidden=[40, 30], input_dropout=0.2, hidden_dropout=0.5).eval()
    x = torch.rand(6, 1, 28, 28)
    first, second = _hidden_linears(model)
    with torch.no_grad():
        by_hand = torch.relu(second(torch.relu(first(x.flatten(1)))))
        features = model.forward_features(x)
        pre = model.forward_head(features, pre_logits=True)
        assert pre.shape == (6, 30) and model.head_hidden_size == model.num_features == 30
        assert torch.allclose(pre, by_hand) and torch.allclose(features, by_hand)
        assert torch.allclose(model.forward_head(features), model.fc(by_hand))
        assert torch.allclose(model(x), model.fc(by_hand))
    model.reset_classifier(0)  # what feature distillation does: forward returns the pre-logits
    with torch.no_grad():
        assert torch.allclose(model(x), by_hand)
    model.reset_classifier(4)
    assert model.get_classifier().out_features == 4 and model.num_classes == 4


def test_training_loop_applies_the_constraint(tmp_path) -> None:
    """kdlib.train.fit calls apply_constraints after every optimizer step: trained at a huge lr, the
    saved hidden rows are within the bound while the unconstrained output layer is not."""
    from PIL import Image

    from kdlib.checkpoint import ModelRecord, load_checkpoint
    from kdlib.data import BatchNormalizer, IndexedImageDataset, Record
    from kdlib.losses import build_objective
    from kdlib.runtime import seed_everything
    from kdlib.train import Recipe, TrainData, fit

    gen = torch.Generator().manual_seed(0)
    records = []
    for i in range(24):
        pixels = (torch.rand(8, 8, generator=gen) * 80 + 80 * (i % 3)).to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(tmp_path / f"{i}.png")
        records.append(Record(f"{i}.png", i % 3, "train" if i < 18 else "val"))
    train = IndexedImageDataset(tmp_path, records[:18], 1, preload=True)
    val = IndexedImageDataset(tmp_path, records[18:], 1, preload=True)
    seed_everything(0)
    c = 0.5
    kwargs = {"hidden": [16, 16], "img_size": 8, "max_norm": c}
    model = build_model("mlp", 3, 1, **kwargs)
    record = ModelRecord(arch="mlp", num_classes=3, in_chans=1, model_kwargs=kwargs, input_size=8,
                         mean=[0.5], std=[0.25], classes=["a", "b", "c"])
    recipe = Recipe(epochs=2, batch_size=6, lr=50.0, momentum=0.0, weight_decay=0.0, schedule="constant")
    fit(model, build_objective("ce"), recipe, TrainData(train, val, BatchNormalizer([0.5], [0.25])),
        tmp_path / "out", record, seed=0, progress=False)
    state = load_checkpoint(tmp_path / "out" / "last.pt")["state_dict"]
    hidden = [state[k] for k in sorted(state) if k.startswith("hidden.") and k.endswith(".weight")]
    assert len(hidden) == 2 and all((w.norm(dim=1) <= c + 1e-6).all() for w in hidden)
    assert math.isfinite(float(state["fc.weight"].norm())) and (state["fc.weight"].norm(dim=1) > c).any()


def test_hinton_presets() -> None:
    """params.yaml's Hinton et al. 2015 §3 presets: the paper's sizes, the teacher's 2012 regularization
    (its max-norm sqrt(15) on the squared length, times the keep probability for torch's inverted
    dropout), an unregularized student on plain images, and all of MNIST with a 2-px jitter."""
    from kdlib.schema import parse_merged
    from kdlib.models import ModelSpec
    from kdlib.train import Recipe
    from stages.params import read_params

    params = read_params()

    def preset(name: str) -> tuple[ModelSpec, Recipe]:
        problems: list[str] = []
        spec, recipe = parse_merged((ModelSpec, Recipe), params["models"][name], f"models.{name}.", problems)
        assert problems == []
        return spec, recipe

    teacher, teacher_recipe = preset("hinton_teacher")
    assert count_parameters(teacher.build(10, 1)) == 2_395_210
    assert teacher.kwargs["input_dropout"] == 0.2 and teacher.kwargs["hidden_dropout"] == 0.5
    assert teacher.kwargs["max_norm"] == pytest.approx([0.8 * math.sqrt(15), 0.5 * math.sqrt(15)], abs=1e-3)
    assert teacher_recipe.augmentation is None and teacher_recipe.batch_size == 100
    for name, size in (("hinton_student", 1_276_810), ("hinton_student30", 24_790)):
        spec, recipe = preset(name)
        model = spec.build(10, 1)
        assert count_parameters(model) == size and set(spec.kwargs) == {"hidden"}
        assert all(m.p == 0 for m in model.modules() if isinstance(m, nn.Dropout))
        assert recipe.weight_decay == 0 and recipe.label_smoothing == 0 and recipe.augmentation == ("none", {})
    data = params["datasets"]["mnist_full"]
    assert data["options"] == {"train_per_class": None, "val_per_class": 500, "test_per_class": None}
    assert (data["augment"], data["augment_options"]) == ("shift", {"shift_px": 2})
