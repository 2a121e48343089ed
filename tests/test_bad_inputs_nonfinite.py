"""Non-finite values never become a result: a NaN/inf parameter is refused by the schema before any
work, and a training run whose loss, gradient norm or validation loss turns NaN/inf stops naming the
epoch, the step and the term, leaving nothing for DVC to cache (through DVC: tests/test_bad_inputs_dvc.py)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kdlib.train as train_module
from kdlib.losses import build_objective
from kdlib.losses.registry import LossOutput
from kdlib.models import build_model
from kdlib.schema import SEED_MAX, non_finite
from kdlib.train import NonFiniteError
from stages.params import read_params, resolve
from tests.test_params import error_of, mutated
from tests.test_train import image_dir, run_fit  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    return read_params(REPO / "params.yaml")


# ---------------------------------------------------------------- parameters (the schema, one place)
@pytest.mark.parametrize(("key", "value", "shown"), [
    ("datasets.mnist.std", [math.nan], "datasets.mnist.std[0] = nan"),  # the case 1: passed `s <= 0`
    ("datasets.mnist.std", [math.inf], "datasets.mnist.std[0] = inf"),
    ("datasets.mnist.mean", [math.nan], "datasets.mnist.mean[0] = nan"),
    ("models.cnn_small.lr", math.inf, "models.cnn_small.lr = inf"),
    ("models.cnn_small.weight_decay", -math.inf, "models.cnn_small.weight_decay = -inf"),
    ("distill.kd.temperature", math.nan, "distill.kd.temperature = nan"),  # a method knob (parsed by its class)
    ("align.lr", math.nan, "align.lr = nan"),
    ("teacher_ls", math.nan, "teacher_ls = nan"),
], ids=["std_nan", "std_inf", "mean_nan", "lr_inf", "wd_minus_inf", "temperature_nan", "align_lr_nan",
        "teacher_ls_nan"])
def test_non_finite_parameters_are_refused_naming_the_key(base, key, value, shown) -> None:
    message = error_of(mutated(base, key, value))
    assert f"{shown}: expected a finite number" in message


def test_nan_written_in_params_yaml_is_refused_by_the_check_stage(tmp_path: Path) -> None:
    """The issue's case as a user meets it: `std: [.nan]` (a `- .nan` item) in params.yaml, then the stage that reads it."""
    text = (REPO / "params.yaml").read_text()
    params = tmp_path / "params.yaml"
    params.write_text(text.replace("std:\n    - 0.3081", "std:\n    - .nan", 1))
    assert params.read_text() != text, "params.yaml's MNIST std line changed: update this test"
    from stages.params import load_params

    with pytest.raises(SystemExit) as info:
        load_params(params)
    assert info.value.code == 2


def test_non_finite_walks_nested_values() -> None:
    assert non_finite({"a": [1.0, {"b": math.nan}], "c": 2}, "x") == [
        "x.a[1].b = nan: expected a finite number (NaN and infinities are never valid parameters)"]
    assert non_finite([1, 2.5, "nan"], "y") == []  # a string is the type check's business


@pytest.mark.parametrize("key", ["seed", "teacher_seed", "data.split_seed"])
def test_seeds_beyond_what_numpy_takes_are_refused(base, key) -> None:
    resolve(mutated(base, key, SEED_MAX))
    message = error_of(mutated(base, key, 2**64))
    assert f"{key} = {2**64}: expected an integer in [0, {SEED_MAX}]" in message


# ---------------------------------------------------------------- training that diverges
class NanAtCall(nn.Module):
    """Cross-entropy, except that call ``bad`` (counting from 1) returns a NaN ``ce`` term."""

    needs_teacher = needs_features = uses_distillation_token = False

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.ce, self.bad, self.calls = build_objective("ce"), bad, 0

    def forward(self, student, targets, teacher=None) -> LossOutput:
        self.calls += 1
        out = self.ce(student, targets, teacher)
        if self.calls == self.bad:
            nan = out.total * math.nan
            return LossOutput(nan, {"ce": nan})
        return out

    def fitted_state(self) -> dict:
        return {}


class InfiniteGradient(nn.Module):
    """A finite loss (0) whose gradient is not: d/dx sqrt(x) at x = 0 is inf, times 0 → NaN."""

    needs_teacher = needs_features = uses_distillation_token = False

    def forward(self, student, targets, teacher=None) -> LossOutput:
        total = torch.sqrt(student.logits * 0.0).sum()
        return LossOutput(total, {"sqrt": total.detach()})

    def fitted_state(self) -> dict:
        return {}


def _fit(image_dir, out: Path, objective, lr: float = 0.05, model: nn.Module | None = None):
    return run_fit(image_dir, out, objective=objective, lr=lr, model=model)[1]


def test_a_nan_loss_names_epoch_step_and_term(image_dir, tmp_path: Path) -> None:  # noqa: F811
    # 24 training images, batch 8: 3 steps an epoch, so call 5 is epoch 2, step 2
    with pytest.raises(NonFiniteError, match=r"training diverged at epoch 2, step 2 of 3: loss = nan, ce = nan"):
        _fit(image_dir, tmp_path / "out", NanAtCall(5))
    assert not (tmp_path / "out" / "last.pt").exists()


def test_the_check_waits_at_most_a_window_of_steps(image_dir, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    """With a window of 1 the error comes from the step itself, before the next step runs."""
    monkeypatch.setattr(train_module, "FINITE_CHECK_EVERY", 1)
    objective = NanAtCall(2)
    with pytest.raises(NonFiniteError, match=r"epoch 1, step 2 of 3"):
        _fit(image_dir, tmp_path / "out", objective)
    assert objective.calls == 2


def test_a_huge_lr_diverges_and_stops(image_dir, tmp_path: Path) -> None:  # noqa: F811
    """The issue's case 2 (`models.cnn_small.lr: 1.0e+30`) in the library: it used to end with loss nan, top-1
    of chance, and checkpoints of NaN tensors."""
    with pytest.raises(NonFiniteError, match=r"training diverged at epoch 1, step \d of 3: .*(loss|grad_norm) = (nan|inf)"):
        _fit(image_dir, tmp_path / "out", build_objective("ce"), lr=1e30)


def test_a_non_finite_gradient_norm_with_a_finite_loss_stops(image_dir, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(NonFiniteError, match=r"epoch 1, step 1 of 3: grad_norm = nan \(every term of that step: "
                                             r"loss = 0, sqrt = 0, grad_norm = nan\)"):
        _fit(image_dir, tmp_path / "out", InfiniteGradient())


def test_a_non_finite_validation_loss_stops(image_dir, tmp_path: Path) -> None:  # noqa: F811
    model = build_model("cnn_small", 3, 1)
    # finite in training, NaN logits in evaluation mode (what validation runs)
    model.register_forward_hook(lambda module, args, output: output if module.training else output * math.nan)
    with pytest.raises(NonFiniteError, match=r"validation after epoch 1: loss = nan"):
        _fit(image_dir, tmp_path / "out", build_objective("ce"), model=model)


def test_finite_training_is_unchanged_by_the_checks(image_dir, tmp_path: Path) -> None:  # noqa: F811
    """The checks only read: two runs with different check windows give the same weights."""
    first = _fit(image_dir, tmp_path / "a", build_objective("ce"))
    train_module.FINITE_CHECK_EVERY, saved = 1, train_module.FINITE_CHECK_EVERY
    try:
        second = _fit(image_dir, tmp_path / "b", build_objective("ce"))
    finally:
        train_module.FINITE_CHECK_EVERY = saved
    assert first.history == second.history
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
