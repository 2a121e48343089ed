"""The training loop on tiny in-memory data: determinism, best/last checkpoints, early stopping,
teacher handling and the logger contract."""
from __future__ import annotations

import re

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image

from kdlib.checkpoint import Checkpoint, ModelRecord, load_checkpoint, model_from_checkpoint
from kdlib.data import BatchNormalizer, IndexedImageDataset, Record, build_transforms
from kdlib.losses import build_objective
from kdlib.losses.base import Method
from kdlib.losses.registry import LossOutput
from kdlib.models import build_model
from kdlib.runtime import seed_everything
from kdlib.teacher import OnlineTeacher
from kdlib.train import Recipe, Selection, TrainData, fit

RECORD = ModelRecord(arch="cnn_small", num_classes=3, in_chans=1, model_kwargs={}, input_size=16,
                     mean=[0.5], std=[0.25], classes=["a", "b", "c"])


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Record]]:
    root = tmp_path_factory.mktemp("imgs")
    gen = torch.Generator().manual_seed(0)
    records = []
    for i in range(36):
        label = i % 3
        # class-dependent brightness so the task is learnable in a few steps
        pixels = (torch.rand(16, 16, generator=gen) * 80 + 80 * label).to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(root / f"{i}.png")
        records.append(Record(f"{i}.png", label, "train" if i < 24 else "val"))
    return root, records


class ListLogger:
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = [{}]

    def log_metric(self, name: str, val: float) -> None:
        self.rows[-1][name] = val

    def next_step(self) -> None:
        self.rows.append({})


def run_fit(image_dir, out: Path, epochs: int = 2, patience: int = 0, objective=None, teacher=None,
            logger=None, amp: str = "none", mix=None, resume=None, lr: float = 0.05, model=None):
    root, records = image_dir
    augment = build_transforms("shift", 16, 16, True, {"shift_px": 2})
    train = IndexedImageDataset(root, [r for r in records if r.split == "train"], 1, augment.sample,
                                preload=True, batch_transform=augment.batch)
    val = IndexedImageDataset(root, [r for r in records if r.split == "val"], 1, None, preload=True)
    seed_everything(0)
    model = build_model("cnn_small", 3, 1) if model is None else model
    recipe = Recipe(epochs=epochs, batch_size=8, lr=lr, patience=patience, warmup_epochs=1, amp=amp)
    data = TrainData(train, val, BatchNormalizer([0.5], [0.25]), mix=mix)
    result = fit(model, objective or build_objective("ce"), recipe, data, out, RECORD, seed=0, teacher=teacher,
                 logger=logger, progress=False, resume=resume)
    return model, result


def test_same_seed_gives_identical_weights_and_metrics(image_dir, tmp_path):
    _, first = run_fit(image_dir, tmp_path / "a")
    _, second = run_fit(image_dir, tmp_path / "b")
    assert first.history == second.history
    for which in ("best.pt", "last.pt"):
        a, b = load_checkpoint(tmp_path / "a" / which), load_checkpoint(tmp_path / "b" / which)
        assert a["state_dict"].keys() == b["state_dict"].keys()
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_best_and_last_checkpoints_rebuild_the_model(image_dir, tmp_path):
    model, result = run_fit(image_dir, tmp_path, epochs=3)
    best = load_checkpoint(tmp_path / "best.pt")
    last = load_checkpoint(tmp_path / "last.pt")
    assert best["meta"]["epoch"] == result.best_epoch and last["meta"]["epoch"] == 3
    assert best["meta"]["val_score"] == pytest.approx(result.best_val_score) and result.score_name == "top1"
    rebuilt, meta = model_from_checkpoint(tmp_path / "last.pt")
    # the record fit was given is what each checkpoint stores
    assert ModelRecord.from_meta(best["meta"]) == RECORD and ModelRecord.from_meta(meta) == RECORD
    x = torch.randn(2, 1, 16, 16)
    model.eval()
    assert torch.allclose(rebuilt(x), model(x))
    assert not list(tmp_path.glob("*.tmp"))


def test_early_stopping_stops_after_patience_without_gain(image_dir, tmp_path):
    _, result = run_fit(image_dir, tmp_path, epochs=30, patience=1)
    assert result.stopped_early
    assert result.last_epoch == result.best_epoch + 1 or result.last_epoch < 30
    assert result.last_epoch < 30


def test_logger_gets_one_row_per_epoch(image_dir, tmp_path):
    logger = ListLogger()
    run_fit(image_dir, tmp_path, epochs=2, logger=logger)
    rows = [r for r in logger.rows if r]
    assert len(rows) == 2
    assert {"train/loss", "train/ce", "train/top1", "val/loss", "val/top1", "val/top5", "lr"} <= set(rows[0])


def test_kd_needs_a_teacher_and_uses_it_in_eval_mode(image_dir, tmp_path):
    with pytest.raises(ValueError, match="needs a teacher"):
        run_fit(image_dir, tmp_path / "x", objective=build_objective("kd", temperature=4.0, alpha=0.9))
    teacher_model = build_model("cnn_small", 3, 1)
    teacher_model.train()
    teacher = OnlineTeacher(teacher_model)
    before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    logger = ListLogger()
    run_fit(image_dir, tmp_path / "y", objective=build_objective("kd", temperature=4.0, alpha=0.9),
            teacher=teacher, logger=logger)
    assert not teacher_model.training
    # the teacher's weights and BN running statistics are untouched by distillation
    assert all(torch.equal(before[k], v) for k, v in teacher_model.state_dict().items())
    assert "train/kd" in logger.rows[0]


def test_bf16_autocast_trains(image_dir, tmp_path):
    _, result = run_fit(image_dir, tmp_path, epochs=1, amp="bf16")
    assert result.history[0]["train/loss"] == result.history[0]["train/loss"]  # not NaN


def test_teacher_resizes_to_its_input_size():
    model = build_model("cnn_small", 3, 1)
    seen: dict[str, torch.Size] = {}

    def record(module, args):
        seen["shape"] = args[0].shape

    model.register_forward_pre_hook(record)
    OnlineTeacher(model, input_size=32)(torch.randn(2, 1, 16, 16), torch.arange(2))
    assert seen["shape"][-2:] == (32, 32)


def test_optimizer_exempts_what_timm_models_exempt_from_weight_decay():
    from kdlib.train import build_optimizer

    model = build_model("deit_tiny_distilled_patch16_224", 3, 1, img_size=16, patch_size=8, depth=1)
    optimizer = build_optimizer(model, Recipe(epochs=1, batch_size=1, lr=1e-3, optimizer="adamw", weight_decay=0.05))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    named = dict(model.named_parameters())
    for token in ("pos_embed", "cls_token", "dist_token"):
        assert id(named[token]) not in decayed
    assert id(named["patch_embed.proj.weight"]) in decayed


def test_teacher_sees_its_own_normalization():
    model = build_model("cnn_small", 3, 3)
    seen: dict[str, torch.Tensor] = {}

    def record(module, args):
        seen["x"] = args[0]

    model.register_forward_pre_hook(record)
    student_stats = ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    teacher_stats = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    raw = torch.rand(2, 3, 8, 8)
    student_view = (raw - torch.tensor(student_stats[0]).view(1, 3, 1, 1)) / torch.tensor(student_stats[1]).view(1, 3, 1, 1)
    OnlineTeacher(model, None, student_stats, teacher_stats)(student_view, torch.arange(2))
    expected = (raw - torch.tensor(teacher_stats[0]).view(1, 3, 1, 1)) / torch.tensor(teacher_stats[1]).view(1, 3, 1, 1)
    assert torch.allclose(seen["x"], expected, atol=1e-5)
    OnlineTeacher(model, None, student_stats, student_stats)(student_view, torch.arange(2))
    assert torch.equal(seen["x"], student_view)  # same statistics: passed through untouched


def test_mixup_cutmix_training_with_a_teacher(image_dir, tmp_path):
    from kdlib.data.transforms import build_mix

    logger = ListLogger()
    _, result = run_fit(image_dir, tmp_path, epochs=2, objective=build_objective("kd", temperature=4.0, alpha=0.5),
                        teacher=OnlineTeacher(build_model("cnn_small", 3, 1)), logger=logger,
                        mix=build_mix(3, mixup_alpha=0.8, cutmix_alpha=1.0))
    assert all(0.0 <= row["train/top1"] <= 100.0 for row in logger.rows if row)
    assert result.best_epoch >= 1


def test_selection_picks_higher_score_breaks_ties_by_loss_and_counts_epochs_without_gain():
    selection = Selection(patience=2)
    assert not selection.should_stop
    assert selection.update(1, 50.0, 1.0)  # the first epoch is always the best so far
    assert (selection.best_epoch, selection.best_score, selection.best_loss) == (1, 50.0, 1.0)
    assert selection.update(2, 60.0, 2.0)  # higher score wins even with a higher loss
    assert (selection.best_epoch, selection.best_score, selection.best_loss) == (2, 60.0, 2.0)
    assert selection.epochs_without_gain == 0
    assert not selection.update(3, 60.0, 2.5)  # tie in score, higher loss: not better
    assert selection.epochs_without_gain == 1 and not selection.should_stop
    assert selection.update(4, 60.0, 1.5)  # tie in score, lower loss: the new best
    assert (selection.best_epoch, selection.best_loss, selection.epochs_without_gain) == (4, 1.5, 0)
    assert not selection.update(5, 59.0, 0.1)  # lower score: not better whatever the loss
    assert not selection.update(6, 60.0, 1.5)  # an exact tie is not a gain either
    assert selection.epochs_without_gain == 2 and selection.should_stop
    assert selection.best_epoch == 4


def test_selection_without_patience_never_stops():
    selection = Selection()  # patience 0
    selection.update(1, 10.0, 1.0)
    for epoch in range(2, 50):
        assert not selection.update(epoch, 5.0, 1.0)
    assert selection.epochs_without_gain == 48 and not selection.should_stop


def test_selection_state_dict_round_trip_continues_identically():
    first = Selection(patience=3)
    for epoch, (score, loss) in enumerate([(40.0, 1.0), (55.0, 0.9), (55.0, 1.2)], start=1):
        first.update(epoch, score, loss)
    state = first.state_dict()
    assert state == {"patience": 3, "best_score": 55.0, "best_loss": 0.9, "best_epoch": 2,
                     "epochs_without_gain": 1}
    restored = Selection()
    restored.load_state_dict(state)
    assert restored == first
    state["best_score"] = 0.0  # the state is a copy, not a view of the object
    assert first.best_score == 55.0
    for epoch, (score, loss) in enumerate([(54.0, 0.1), (55.0, 0.8), (53.0, 0.5), (52.0, 0.5), (51.0, 0.5)],
                                          start=4):
        assert first.update(epoch, score, loss) == restored.update(epoch, score, loss)
        assert first.should_stop == restored.should_stop
        assert restored == first
    assert restored.best_epoch == 5 and restored.should_stop


class Crash(Exception):
    pass


class CrashingLogger(ListLogger):
    """Raises while logging epoch ``at``: the states of the epochs before it are saved."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def next_step(self) -> None:
        if len(self.rows) == self.at:
            raise Crash
        super().next_step()


def test_a_run_that_crashed_resumes_to_the_same_bytes_and_log(image_dir, tmp_path):
    from kdlib.resume import ResumeStore

    whole = ListLogger()
    _, uninterrupted = run_fit(image_dir, tmp_path / "whole", epochs=4, logger=whole)
    store = ResumeStore(tmp_path / "state", "run key")
    with pytest.raises(Crash):
        run_fit(image_dir, tmp_path / "first", epochs=4, logger=CrashingLogger(at=3), resume=store)
    again = ListLogger()
    _, resumed = run_fit(image_dir, tmp_path / "second", epochs=4, logger=again, resume=store)
    assert resumed.resumed_from_epoch == 2 and uninterrupted.resumed_from_epoch == 0
    assert resumed.history == uninterrupted.history and again.rows == whole.rows  # replayed, none twice
    for name in ("best.pt", "last.pt"):
        assert (tmp_path / "second" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_a_models_constraints_are_applied_after_every_update(image_dir, tmp_path):
    """kdlib.models.mlp's max-norm (Hinton et al. 2012) is applied by the loop after each optimizer step,
    through the model's own `apply_constraints`: 24 images, batch 8, 2 epochs = 6 calls, each after a step."""
    model = build_model("cnn_small", 3, 1)
    seen = []
    model.apply_constraints = lambda: seen.append(model.fc.weight.detach().clone())
    run_fit(image_dir, tmp_path, model=model)
    assert len(seen) == 6
    assert not torch.equal(seen[0], seen[1])  # each call followed a real update


class HeadedCE(Method):
    """CE plus a term through a head the method owns (as FitNet's regressor or CRD's embeddings): the
    head is trained only if the loop gives its parameters to the optimizer. Not registered."""

    needs_teacher = False
    needs_features = False
    uses_distillation_token = False
    tasks = ("multiclass",)

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 3)

    def forward(self, student, targets, teacher=None) -> LossOutput:
        ce = torch.nn.functional.cross_entropy(student.logits, targets)
        mimic = torch.nn.functional.mse_loss(self.head(student.logits), torch.nn.functional.one_hot(targets, 3).float())
        return LossOutput(ce + mimic, {"ce": ce.detach(), "mimic": mimic.detach()})


def test_a_methods_own_parameters_are_trained_and_resumed(image_dir, tmp_path):
    """A method's head gets gradients and steps with the student's optimizer (it stayed unchanged
    before), its parameters count as its own, and a crashed run resumes to the same head and bytes."""
    from kdlib.resume import ResumeStore
    from kdlib.train import build_optimizer, own_parameters

    torch.manual_seed(1)
    method = HeadedCE()
    start = copy.deepcopy(method.state_dict())
    assert [p.shape for p in own_parameters(method)] == [torch.Size([3, 3]), torch.Size([3])]
    assert own_parameters(build_objective("kd", temperature=4.0, alpha=0.9)) == []
    run_fit(image_dir, tmp_path / "whole", epochs=4, objective=method)
    assert not torch.equal(method.head.weight, start["head.weight"])
    assert not torch.equal(method.head.bias, start["head.bias"])
    # decayed as the student's weights are, the bias not
    groups = build_optimizer(build_model("cnn_small", 3, 1), Recipe(epochs=1, batch_size=8, lr=0.1, weight_decay=0.1),
                             extra=own_parameters(method))
    assert any(p is method.head.weight for p in groups.param_groups[0]["params"])
    assert any(p is method.head.bias for p in groups.param_groups[1]["params"])

    store = ResumeStore(tmp_path / "state", "run key")
    crashed = HeadedCE()
    crashed.load_state_dict(start)
    with pytest.raises(Crash):
        run_fit(image_dir, tmp_path / "first", epochs=4, objective=crashed, logger=CrashingLogger(at=3), resume=store)
    resumed = HeadedCE()
    resumed.load_state_dict(start)
    run_fit(image_dir, tmp_path / "second", epochs=4, objective=resumed, resume=store)
    for name, value in method.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    for name in ("best.pt", "last.pt"):
        assert (tmp_path / "second" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_a_method_that_uses_progress_gets_the_epoch_and_step(image_dir, tmp_path):
    """DKD's warm-up, min(epoch / W, 1), reaches the loss through the loop's Progress: with W = 4 the
    logged ramp is 1/4 in epoch 1 and 2/4 in epoch 2 (every step of an epoch has the same)."""
    teacher = OnlineTeacher(build_model("cnn_small", 3, 1))
    _, result = run_fit(image_dir, tmp_path, objective=build_objective("dkd", warmup=4), teacher=teacher)
    assert [row["train/warmup"] for row in result.history] == [pytest.approx(0.25), pytest.approx(0.5)]
    assert all(row["train/tckd"] > 0 and row["train/nckd"] > 0 for row in result.history)


def fitnet_run(image_dir, out: Path, epochs: int = 4, logger=None, resume=None):
    """FitNet from a cnn_small teacher (seed 3) into a cnn_small student (seed 0): its layers planned and its
    regressor built as kdlib.distill does, then trained by fit."""
    from kdlib.distill import plan_layers
    from kdlib.losses.base import SetupContext

    torch.manual_seed(3)
    teacher = OnlineTeacher(build_model("cnn_small", 3, 1))
    seed_everything(0)
    student = build_model("cnn_small", 3, 1)
    method = build_objective("fitnet", student_layers=[1], teacher_layers=[2])
    plan = plan_layers(method, student, teacher.model, (1, 16), (1, 16))
    teacher.tap(plan.teacher)
    method.setup(SetupContext(0, teacher.model, lambda: torch.zeros(0), plan))
    start = copy.deepcopy(method.state_dict())
    run_fit(image_dir, out, epochs=epochs, objective=method, teacher=teacher, logger=logger, resume=resume,
            model=student)
    return student, method, start


def test_a_feature_map_method_trains_its_regressor_through_hooks_and_resumes(image_dir, tmp_path):
    """FitNet's hint: the student's stage 1 (8x8) regressed onto the teacher's stage 2 (4x4) by a strided
    convolution the method owns. The hooks feed the loss (the hint term is logged and falls), the
    regressor and its BatchNorm statistics train, the hooks come off after fit, and a run crashed at
    epoch 3 resumes to the same regressor and the same checkpoint bytes."""
    from kdlib.resume import ResumeStore

    student, method, start = fitnet_run(image_dir, tmp_path / "whole", logger=(log := ListLogger()))
    hints = [row["train/hint"] for row in log.rows if "train/hint" in row]
    assert len(hints) == 4 and hints[-1] < hints[0]
    assert tuple(method.regressors[0].conv.weight.shape) == (64, 64, 3, 3)  # 8x8 → 4x4: stride-2 3x3
    assert not torch.equal(method.regressors[0].conv.weight, start["regressors.0.conv.weight"])
    assert not torch.equal(method.regressors[0].bn.running_mean, start["regressors.0.bn.running_mean"])
    assert all(not m._forward_hooks for m in student.modules())  # evaluation and export see the bare model

    store = ResumeStore(tmp_path / "state", "run key")
    with pytest.raises(Crash):
        fitnet_run(image_dir, tmp_path / "first", logger=CrashingLogger(at=3), resume=store)
    _, resumed, _ = fitnet_run(image_dir, tmp_path / "second", resume=store)
    for name, value in method.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    for name in ("best.pt", "last.pt"):
        assert (tmp_path / "second" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


class PositionRecorder(Method):
    """CE that records the training-set positions it is given (as CRD's memory bank reads them)."""

    needs_teacher = needs_features = uses_distillation_token = uses_progress = uses_layers = False
    uses_positions = True
    tasks, soft_targets = ("multiclass",), "mixed"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def forward(self, student, targets, teacher=None, positions=None):
        self.seen.append(positions.clone())
        self.labels.append(targets.clone())
        ce = torch.nn.functional.cross_entropy(student.logits, targets)
        return LossOutput(ce, {"ce": ce.detach()})


def test_a_method_that_uses_positions_gets_each_images_index(image_dir, tmp_path):
    """Every epoch hands the method each training image's index exactly once, in the loader's shuffled
    order, beside the batch that holds that image (its label matches the dataset's label at that index)."""
    method = PositionRecorder()
    _, result = run_fit(image_dir, tmp_path, epochs=2, objective=method)
    root, records = image_dir
    train = [r for r in records if r.split == "train"]
    seen = torch.cat(method.seen)
    assert len(seen) == 2 * len(train)
    first, second = seen[:len(train)], seen[len(train):]
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(len(train)))
    assert first.tolist() != second.tolist()  # reshuffled each epoch
    assert torch.cat(method.labels).tolist() == [train[i].label for i in seen.tolist()]


def _trainer(image_dir, out: Path, epochs: int = 3, progress: bool = False):
    from kdlib.train import Trainer

    root, records = image_dir
    train = IndexedImageDataset(root, [r for r in records if r.split == "train"], 1, None, preload=True)
    val = IndexedImageDataset(root, [r for r in records if r.split == "val"], 1, None, preload=True)
    seed_everything(0)
    recipe = Recipe(epochs=epochs, batch_size=8, lr=0.05, warmup_epochs=1)
    return Trainer(build_model("cnn_small", 3, 1), build_objective("ce"), recipe,
                   TrainData(train, val, BatchNormalizer([0.5], [0.25])), out, RECORD, seed=0, progress=progress)


def _same_state(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same_state(x, y)
    else:
        assert a == b


def test_a_trainer_state_saved_after_an_epoch_loads_into_a_new_trainer_whole(image_dir, tmp_path, caplog):
    """The Trainer's state is explicit: what ``state_dict`` gives after epoch 2 (weights, optimizer moments,
    lr schedule, selection, history, counters) comes back whole from a resume store into a fresh Trainer,
    which then continues at epoch 3 and logs it in one line; a step outside ``run`` is refused."""
    from kdlib.resume import ResumeStore

    first = _trainer(image_dir, tmp_path / "a", epochs=2)
    store = ResumeStore(tmp_path / "state", "key")
    first.run(store)
    assert first.epoch == 2 and len(first.history) == 2 and first.selection.best_epoch in (1, 2)
    second = _trainer(image_dir, tmp_path / "b", epochs=3, progress=True)
    assert second.resume(store) and second.epoch == 2 and second.resumed_from == 2
    _same_state(first.state_dict(), second.state_dict())
    with pytest.raises(RuntimeError, match="inside Trainer.run"):
        second.train_epoch(3)
    with caplog.at_level("INFO", logger="kdlib.train"):
        result = second.run()
    lines = [r.getMessage() for r in caplog.records if " epoch " in r.getMessage()]
    assert len(lines) == 1 and re.fullmatch(
        r"train epoch 3/3  loss \d+\.\d{4} \(ce \d+\.\d{4}\)  train top1 \d+\.\d\d  val top1 \d+\.\d\d "
        r"\(best \d+\.\d\d @ [123]\)  lr \S+  \d+ img/s  \d+\.\d s  ETA 0:00:00", lines[0]), lines
    assert result.last_epoch == 3 and result.resumed_from_epoch == 2 and len(result.history) == 3
    assert result.history[:2] == first.history


class FastHeadCE(HeadedCE):
    """HeadedCE whose head trains at 10 x the student's lr and without weight decay (a paper's own rate)."""

    def optimizer_options(self):
        return {"lr_scale": 10.0, "weight_decay": 0.0}


def test_a_methods_own_parameters_can_train_at_their_own_lr_and_weight_decay(image_dir, tmp_path):
    """``Method.optimizer_options``: the method's parameters get groups of their own, at lr × lr_scale and
    their own weight decay, and the schedule (warm-up, cosine) moves every group by the same factor."""
    from kdlib.train import Trainer, build_optimizer

    method = FastHeadCE()
    optimizer = build_optimizer(build_model("cnn_small", 3, 1), Recipe(epochs=1, batch_size=8, lr=0.1,
                                weight_decay=0.1), extra=method.trainable_parameters(),
                                extra_options=method.optimizer_options())
    student_groups, own_groups = optimizer.param_groups[:2], optimizer.param_groups[2:]
    assert [g["lr"] for g in student_groups] == [0.1, 0.1] and [g["weight_decay"] for g in student_groups] == [0.1, 0.0]
    assert [g["lr"] for g in own_groups] == [pytest.approx(1.0)] * 2 and [g["weight_decay"] for g in own_groups] == [0, 0]
    assert {id(p) for g in own_groups for p in g["params"]} == {id(p) for p in method.trainable_parameters()}
    start = copy.deepcopy(method.state_dict())
    root, records = image_dir
    train = IndexedImageDataset(root, [r for r in records if r.split == "train"], 1, None, preload=True)
    val = IndexedImageDataset(root, [r for r in records if r.split == "val"], 1, None, preload=True)
    seed_everything(0)
    trainer = Trainer(build_model("cnn_small", 3, 1), method, Recipe(epochs=2, batch_size=8, lr=0.05, warmup_epochs=1),
                      TrainData(train, val, BatchNormalizer([0.5], [0.25])), tmp_path, RECORD, seed=0, progress=False)
    trainer.run()
    saved = Checkpoint.read(tmp_path / "last.pt").method_state["trained_parameters"]  # beside the student
    assert set(saved) == {"head.weight", "head.bias"} and torch.equal(saved["head.weight"], method.head.weight)
    lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    assert lrs[2] == pytest.approx(10 * lrs[0]) and lrs[3] == pytest.approx(10 * lrs[1])
    assert not torch.equal(method.head.weight, start["head.weight"])
