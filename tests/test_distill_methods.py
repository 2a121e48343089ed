"""Every distillation method through the pipeline's own stage functions on a tiny MNIST
(prepare → teacher → teacher_cache → align → distill → evaluate), the cache's equivalence with the
online teacher (intermediate layers included), its refusals (a stale key, layers over the size limit),
the refusals of combinations that cannot work, and a new method added as one file (no edit to
``stages/``)."""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import re
import logging
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from kdlib.checkpoint import Checkpoint, model_from_checkpoint, save_checkpoint
from kdlib.data.transforms import BatchNormalizer
from kdlib.data.views import make_view_seeds
from kdlib.distill import first_view_features, load_teacher, setup_distillation, teacher_cache_key
from kdlib.features import FeatureStudent
from kdlib.losses import METHODS, distillation_methods
from kdlib.losses.lsh import LSHMethodBase
from kdlib.models import count_parameters
from kdlib.runtime import Runtime, seed_everything
from kdlib.teacher import OnlineTeacher
from kdlib.teacher_cache import CacheMismatch, TeacherCache, layer_table_bytes
from stages.align import align
from stages.evaluate import evaluate_checkpoint
from stages.params import ParamError, Run, read_params, resolve
from stages.pipeline import prepare, train_pipeline
from stages.teacher_cache import build_cache
from stages.train import train_role
from stages.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
# every registered single-label distillation method, whoever added it: no list to keep
METHODS_UNDER_TEST = tuple(distillation_methods("multiclass"))
FEATURE_METHODS = tuple(m for m in METHODS_UNDER_TEST if METHODS.get(m).needs_features)
LAYER_METHODS = tuple(m for m in METHODS_UNDER_TEST if METHODS.get(m).uses_layers)
LSH_METHODS = tuple(m for m in METHODS_UNDER_TEST if issubclass(METHODS.get(m), LSHMethodBase))


def shrink(params: dict) -> dict:
    params["datasets"]["mnist"]["root"] = str(REPO / "data" / "mnist")
    params["datasets"]["mnist"]["options"].update(train_per_class=8, val_per_class=2, test_per_class=3)
    params["data"]["num_workers"] = 0
    for preset in params["models"].values():
        preset["epochs"] = 2
        preset["warmup_epochs"] = 0
    params["align"]["epochs"] = 1
    params["distill"]["crd"]["nce_k"] = 24  # 8 images a class: 72 of other classes per image (more is refused)
    return params


@pytest.fixture(scope="module")
def base_params() -> dict:
    params = shrink(read_params(REPO / "params.yaml"))
    resolve(params)  # the shrunk run is a valid one
    return params


@pytest.fixture(scope="module")
def trained(base_params, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """A prepared tiny MNIST and a teacher trained on it once."""
    ws = Workspace(tmp_path_factory.mktemp("distill") / "base")
    run = resolve(base_params)
    index = prepare(run, ws)
    assert len(index.split("train")) == 80
    assert [r.path for r in ws.index().records] == [r.path for r in index.records]
    train_role(run, "teacher", ws, progress=False)
    assert ws.teacher_checkpoint.is_file()
    return ws


@pytest.fixture
def setup(trained, base_params, tmp_path):
    """A private copy of the trained workspace (and its prepared index), and of the params."""
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(trained.root, ws.root)
    return ws.index(), ws, copy.deepcopy(base_params)


def with_method(params: dict, method: str) -> dict:
    params["distill"]["method"] = method
    if METHODS.get(method).uses_distillation_token:
        params["student"] = "deit"
    return params


def view0_features(cache: TeacherCache) -> torch.Tensor:
    """The cached teacher features of view 0 of every training image, ``(N, D)``."""
    positions = torch.arange(cache.num_images)
    return cache.features(positions, torch.zeros_like(positions))


# --------------------------------------------------------------------- every method

@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
def test_every_multiclass_method_distills_with_the_cache(method, setup):
    index, ws, params = setup
    run = resolve(with_method(params, method))
    assert run.params.teacher_cache.enabled
    results = train_pipeline(run, ws, roles=("distill",))
    result, n_params = results["distill"]
    assert result.last_epoch == 2 and n_params > 0
    assert all(row["train/loss"] == row["train/loss"] for row in result.history)  # no NaN
    # the parameters it trained: the student's and those the method owns (its "extra params"), counted
    # apart from the stage through the same setup
    seed_everything(run.seed)
    train_set = run.dataset.load(index, "train", run.student.input_size, True)
    again = setup_distillation(run.objective("distill"), run.student.spec, run.student.preset, index.meta, train_set,
                               Checkpoint.read(ws.teacher_checkpoint), seed=run.seed, num_views=run.num_views,
                               runtime=Runtime())
    own = sum(p.numel() for p in again.objective.trainable_parameters())
    assert n_params == count_parameters(again.student) + own
    assert (own > 0) == any(p.requires_grad for p in again.objective.parameters())
    # the cache holds what the method reads: a layer method's teacher layers too (they fit the default limit)
    assert run.cache_used and run.cache_skip_reason(index) is None
    cache = TeacherCache.load(ws.teacher_cache, expected_key=run.teacher_cache_key(ws.teacher_checkpoint,
                                                                                   ws.index_files, index))
    assert cache.num_views == 2 and cache.num_images == 80
    assert cache.has_features == (method in FEATURE_METHODS)
    paths, shapes = run.teacher_layers  # planned on meta models, as built by the real ones
    assert bool(paths) == (method in LAYER_METHODS)
    assert cache.layer_paths == paths and cache.layer_shapes == shapes
    described = json.loads((ws.teacher_cache / "cache.json").read_text())
    assert [(layer["path"], tuple(layer["shape"]), layer["dtype"]) for layer in described["layers"]] == \
        [(path, shape, "float16") for path, shape in zip(paths, shapes)]
    assert described["layer_bytes"] == layer_table_bytes(shapes, 80, 2) == sum(t.nbytes for t in cache.layer_tables)
    if paths:
        assert json.loads(cache.key["layers"]) == list(paths)

    best = Checkpoint.read(ws.checkpoint("distill"))
    model, meta = best.model(), best.meta
    assert meta["role"] == "distill" and meta["arch"] == run.student.spec.arch
    assert best.record.role == "distill" and best.record.arch == run.student.spec.arch
    evaluated = evaluate_checkpoint(run, index, best)
    assert len(evaluated.targets) == 30 and 0.0 <= evaluated.metrics["top1"] <= 100.0

    summary = json.loads((ws.align / "align.json").read_text())
    if method in FEATURE_METHODS:
        assert isinstance(model, FeatureStudent) and model.projected
        assert meta["feature_student"] == {"student_width": 64, "teacher_width": 512, "project": True}
        assert summary["aligned"] is True and summary["epochs"] == 1
        aligned = Checkpoint.read(ws.align_checkpoint)
        assert isinstance(aligned.model(), FeatureStudent) and aligned.meta["role"] == "align"
        assert not (ws.align / "best.pt").exists()
    else:
        assert not isinstance(model, FeatureStudent) and meta["feature_student"] is None
        assert summary["aligned"] is False and ("trains in one stage" if method in LAYER_METHODS else
                                                "mimics no features") in summary["reason"]
        assert not ws.align_checkpoint.exists()
    # the LSH methods' fitted state lives in every checkpoint (no separate lsh.pt any more)
    assert not (ws.models / "distill" / "lsh.pt").exists()
    for which in ("best", "last"):
        state = Checkpoint.read(ws.checkpoint("distill", which)).method_state
        if method in LSH_METHODS:
            assert set(state) == {"bias", "seed", "weight_std"}
            assert state["bias"].shape == (32 * 512,) and state["seed"] == run.seed
            assert state["weight_std"] > 0
        elif own:  # the parameters the method trained, by name, beside the student
            trained = dict(again.objective.named_parameters())
            assert set(state) == {"trained_parameters"} and set(state["trained_parameters"]) == set(trained)
            assert all(t.shape == trained[k].shape for k, t in state["trained_parameters"].items())
        else:
            assert state == {}


# ------------------------------------------------------------------ transfer sets (Hinton et al. 2015 §3)

def test_a_transfer_set_without_a_class_and_its_bias_correction(setup, tmp_path):
    """The student distilled without 3s: the cache and the training batches hold no 3, evaluate counts
    its errors on the 3s before and after the shift chosen on validation, and the shift touches no
    weight (the plain top-1 is the uncorrected one)."""
    from stages.evaluate import evaluate_role

    index, ws, params = setup
    params["distill"]["transfer"].update(exclude_classes=["3"], bias_shift="val")
    run = resolve(params)
    _distill(run, ws)
    cache = TeacherCache.load(ws.teacher_cache)
    assert cache.num_images == 72  # 8 training images of each class but 3
    assert json.loads(cache.key["transform"])["transfer_classes"] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    bias = Checkpoint.read(ws.checkpoint("distill")).model().get_classifier().bias.clone()
    row = evaluate_role(run, ws, "distill", tmp_path / "confusion.json", tmp_path / "matrix.json")
    assert row["transfer_absent_classes"] == ["3"]
    for which in ("best", "last"):
        found = row[which]["transfer"]
        assert found["images"] == 30 and found["absent_images"] == 3  # test_per_class: 3
        assert found["bias_shift_from"] == "val" and -20.0 <= found["bias_shift"] <= 20.0
        assert round(100.0 * (1 - found["errors"] / found["images"]), 4) == row[which]["top1"]  # uncorrected
        assert 0 <= found["corrected_absent_errors"] <= 3
    assert torch.equal(Checkpoint.read(ws.checkpoint("distill")).model().get_classifier().bias, bias)
    params["distill"]["transfer"].update(bias_shift=3.5)
    fixed = evaluate_role(resolve(params), ws, "distill", tmp_path / "confusion.json", tmp_path / "matrix.json")
    assert fixed["best"]["transfer"]["bias_shift"] == 3.5 and fixed["best"]["transfer"]["bias_shift_from"] == "fixed"


# ------------------------------------------------------------------ cached vs online

def _distill(run: Run, ws: Workspace):
    build_cache(run, ws, progress=False)  # with enabled: false, only the marker
    align(run, ws)
    return train_role(run, "distill", ws, progress=False)[0]


def _online_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the online teacher's forward passes from now on (one entry per call)."""
    calls: list[int] = []
    forward = OnlineTeacher.__call__

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(OnlineTeacher, "__call__", counted)
    return calls


@pytest.mark.parametrize("method,tol", [("kd", 1e-6), ("l2", 1e-3), ("at", 1e-3), ("fitnet", 3e-3)])
def test_cached_and_online_distillation_give_the_same_history(method, tol, setup, monkeypatch):
    """With K = epochs the cached views are those the online run trains on, so only floating point
    (fp16 features for l2, fp16 teacher layers for at and fitnet) separates the two runs; the cached run
    never calls the teacher. Measured here (CPU): the largest relative history difference 7e-7 (l2),
    7e-6 (at), 1e-4 (fitnet); the largest weight difference 3e-7, 4e-3 and 1e-2 (fitnet's hint has
    weight 100: the float16 rounding of the teacher's layer2 moves every step by up to 2^-11 relative)."""
    index, ws, params = setup
    with_method(params, method)
    assert params["teacher_cache"]["views"] is None
    run = resolve(params)
    build_cache(run, ws, progress=False)
    align(run, ws)
    calls = _online_calls(monkeypatch)
    cached = train_role(run, "distill", ws, progress=False)[0]
    assert calls == []  # every teacher output came from the cache
    monkeypatch.undo()
    cached_state = Checkpoint.read(ws.checkpoint("distill", "last")).state_dict
    online_params = copy.deepcopy(params)
    online_params["teacher_cache"]["enabled"] = False
    online = _distill(resolve(online_params), ws)
    assert json.loads((ws.teacher_cache / "cache.json").read_text()) == {"enabled": False}
    online_state = Checkpoint.read(ws.checkpoint("distill", "last")).state_dict
    assert len(cached.history) == len(online.history) == 2
    for a, b in zip(cached.history, online.history):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=tol, abs=tol), key
    for name, value in cached_state.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, online_state[name], rtol=tol * 10, atol=tol * 10)


def test_layers_over_the_size_limit_run_the_teacher_online_and_say_why(setup, caplog):
    """The size is known before any teacher pass (the layer plan × the images × the views); over
    ``teacher_cache.max_layer_mib`` the stage leaves a marker with the numbers and distill runs online."""
    index, ws, params = setup
    with_method(params, "at")
    params["teacher_cache"]["max_layer_mib"] = 0.001
    run = resolve(params)
    reason = run.cache_skip_reason(index)
    # AT reads resnet18's layer3 (256×2×2) and layer4 (512×1×1) at 28 px: 80 × 2 × 1536 × 2 bytes
    assert reason == ("distill.method = 'at': the teacher's layers layer3, layer4 would take 0.469 MiB in the cache "
                      "(80 images × 2 views × 1536 values (256×2×2 + 512×1×1) × 2 bytes, float16), over "
                      "teacher_cache.max_layer_mib = 0.001: distill runs the teacher online (raise the limit, or set "
                      "teacher_cache.views lower, to cache them)")
    assert build_cache(run, ws, progress=False) == {"enabled": False, "build_seconds": 0.0, "reason": reason}
    key = run.teacher_cache_key(ws.teacher_checkpoint, ws.index_files, index)
    assert json.loads((ws.teacher_cache / "cache.json").read_text()) == {"enabled": False, "reason": reason,
                                                                        "key": key}
    assert sorted(p.name for p in ws.teacher_cache.iterdir()) == ["cache.json"]
    with caplog.at_level(logging.WARNING, logger="kdlib.distill"):
        assert train_role(run, "distill", ws, progress=False)[0].last_epoch == 2
    assert f"distill: no teacher-output cache for this run ({reason})" in caplog.text
    # the marker serves its own run only: another view count is refused as its cache would be
    params["teacher_cache"]["views"] = 1
    with pytest.raises(CacheMismatch, match="number of views 2 but distillation uses 1"):
        train_role(resolve(params), "distill", ws, progress=False)
    # under the limit the same layers are cached (0.469 MiB)
    params["teacher_cache"].update(views=None, max_layer_mib=0.5)
    assert resolve(params).cache_skip_reason(index) is None


def test_a_cache_of_other_teacher_layers_serves_no_layers_the_teacher_runs_online(setup, caplog):
    """DVC reruns teacher_cache when the method changes, not when only its layer knobs do: a sweep over
    layers finds the previous layers' cache. It is not used (the teacher runs online, the same outputs),
    and the log says so and how to rebuild; rebuilt, it serves again. Any other difference still refuses."""
    import logging

    index, ws, params = setup
    with_method(params, "at")
    build_cache(resolve(params), ws, progress=False)
    params["distill"]["at"].update(student_layers=[2], teacher_layers=[4])
    run = resolve(params)
    assert run.teacher_layers[0] == ("layer4",)
    with caplog.at_level(logging.WARNING, logger="kdlib.distill"):
        assert train_role(run, "distill", ws, progress=False)[0].last_epoch == 2
    assert re.search(r'holds the teacher layers \["layer3","layer4"\], and this run reads \["layer4"\]: the teacher '
                     r"runs online \(to cache these layers: dvc repro -f -s teacher_cache\)", caplog.text), caplog.text
    params["teacher_cache"]["views"] = 1  # another difference besides the layers: refused, naming both
    with pytest.raises(CacheMismatch, match="number of views 2 but distillation uses 1"):
        train_role(resolve(params), "distill", ws, progress=False)
    params["teacher_cache"]["views"] = None
    # rebuilt for the new layers, it serves again
    build_cache(run, ws, progress=False)
    assert TeacherCache.load(ws.teacher_cache).layer_paths == ("layer4",)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdlib.distill"):
        assert train_role(run, "distill", ws, progress=False)[0].last_epoch == 2
    assert "runs online" not in caplog.text


def test_baseline_and_distill_start_from_the_same_student(setup):
    index, ws, params = setup
    run = resolve(with_method(params, "kd"))
    student = run.student
    # the builders the roles use, right after seeding: the same initial weights
    seed_everything(run.seed)
    train_set = run.dataset.load(index, "train", student.input_size, True)
    distill_init = setup_distillation(
        run.objective("distill"), student.spec, student.preset, index.meta, train_set,
        Checkpoint.read(ws.teacher_checkpoint), seed=run.seed, num_views=run.num_views, runtime=Runtime(),
    ).student.state_dict()
    seed_everything(run.seed)
    baseline_init = student.spec.build(index.meta.num_classes, index.meta.channels).state_dict()
    assert distill_init.keys() == baseline_init.keys()
    assert all(torch.equal(distill_init[k], baseline_init[k]) for k in baseline_init)
    # the roles themselves: with lr 0 nothing is learned, so the checkpoints hold the initial weights
    # (and BN statistics of the same views in the same order). params.yaml refuses lr 0, so the
    # resolved run's recipe is edited directly.
    frozen = dataclasses.replace(run, student=dataclasses.replace(
        student, recipe=dataclasses.replace(student.recipe, lr=0.0)))
    assert frozen.student.recipe.lr == 0.0 and frozen.model("baseline").recipe.lr == 0.0
    train_role(frozen, "baseline", ws, progress=False)
    build_cache(frozen, ws, progress=False)
    train_role(frozen, "distill", ws, progress=False)
    base = Checkpoint.read(ws.checkpoint("baseline", "last")).state_dict
    dist = Checkpoint.read(ws.checkpoint("distill", "last")).state_dict
    assert base.keys() == dist.keys()
    for name in base:
        assert torch.equal(base[name], dist[name]), name
    assert torch.equal(base["fc.weight"], baseline_init["fc.weight"])


# ------------------------------------------------------------------ cache refusals

def test_cache_refused_after_the_teacher_changes(setup):
    index, ws, params = setup
    run = resolve(with_method(params, "kd"))
    build_cache(run, ws, progress=False)
    teacher, meta = model_from_checkpoint(ws.teacher_checkpoint)
    with torch.no_grad():
        next(teacher.parameters()).add_(0.01)
    save_checkpoint(ws.teacher_checkpoint, teacher, meta)
    with pytest.raises(CacheMismatch, match="teacher sha256") as err:
        train_role(run, "distill", ws, progress=False)
    assert "transform" not in str(err.value) and "rebuild" in str(err.value)
    # rebuilt for the new teacher, it serves again
    build_cache(run, ws, progress=False)
    assert train_role(run, "distill", ws, progress=False)[0].last_epoch == 2


def test_cache_refused_after_the_transform_changes(setup):
    index, ws, params = setup
    build_cache(resolve(with_method(params, "kd")), ws, progress=False)
    params["datasets"]["mnist"]["augment_options"]["shift_px"] = 3
    with pytest.raises(CacheMismatch, match="transform") as err:
        train_role(resolve(params), "distill", ws, progress=False)
    assert "shift_px" in str(err.value) and "teacher sha256" not in str(err.value)


def test_fewer_views_than_epochs(setup):
    index, ws, params = setup
    with_method(params, "kd")
    params["teacher_cache"]["views"] = 1
    run = resolve(params)
    assert run.num_views == 1
    summary = build_cache(run, ws, progress=False)
    assert summary["views"] == 1
    result = train_role(run, "distill", ws, progress=False)[0]
    assert result.last_epoch == 2
    cache = TeacherCache.load(ws.teacher_cache)
    assert cache.num_views == 1 and cache.key["views"] == "1"
    assert json.loads((ws.teacher_cache / "cache.json").read_text())["num_views"] == 1
    # a cache of 1 view does not serve a run that expects 2
    params["teacher_cache"]["views"] = None
    with pytest.raises(CacheMismatch, match="number of views"):
        train_role(resolve(params), "distill", ws, progress=False)


# ------------------------------------------------------------------ refusals of the run

def test_deit_hard_needs_a_distillation_token(setup):
    index, ws, params = setup
    params["distill"]["method"] = "deit_hard"
    assert params["student"] == "cnn_small"
    run = resolve(params)  # a property of the student model, known once it is built
    with pytest.raises(ValueError, match="distillation token"):
        train_role(run, "distill", ws, progress=False)
    assert not ws.checkpoint("distill").exists()


@pytest.mark.parametrize("method", ["lshl2_s", "kd", "deit_soft"])
def test_multilabel_refuses_multiclass_only_methods(method, base_params):
    params = with_method(copy.deepcopy(base_params), method)
    params["dataset"] = "voc2007"
    with pytest.raises(ParamError) as err:
        resolve(params)
    refusals = [p for p in err.value.problems if "use one of:" in p]
    assert len(refusals) == 1, err.value.problems
    message = refusals[0]
    assert repr(method) in message and "multilabel" in message
    assert f"distill.method = {method!r} does not fit a multilabel data set" in message
    names = {name.strip() for name in message.split("use one of:")[1].split(",")}
    assert names == {"sigmoid_kd", "l2", "lsh", "lshl2"}
    # the same methods are accepted on multiclass data
    params["dataset"] = "mnist"
    run = resolve(params)
    assert run.task == "multiclass" and run.objective("distill").fits("multiclass")


def test_mixup_with_the_cache_is_refused(base_params):
    params = copy.deepcopy(base_params)
    params["datasets"]["mnist"]["mixup"] = 0.8
    assert params["teacher_cache"]["enabled"]
    with pytest.raises(ParamError, match="teacher_cache.enabled"):
        resolve(params)
    # with the teacher running online the mixed batches are fine
    params["teacher_cache"]["enabled"] = False
    assert resolve(params).dataset.mixes


# ------------------------------------------------------------------------- align

def test_align_with_zero_epochs_is_skipped(setup):
    index, ws, params = setup
    with_method(params, "lshl2")
    params["align"]["epochs"] = 0
    summary = align(resolve(params), ws)
    assert summary == {"aligned": False, "reason": "align.epochs = 0"}
    assert json.loads((ws.align / "align.json").read_text()) == summary
    assert not (ws.align / "last.pt").exists()
    assert not ws.align_checkpoint.is_file()  # distill then starts from the plain student


def test_align_and_distill_fit_the_same_lsh_hyperplanes(setup):
    index, ws, params = setup
    run = resolve(with_method(params, "lshl2"))
    student = run.student
    build_cache(run, ws, progress=False)
    runtime = Runtime()
    train_set = run.dataset.load(index, "train", student.input_size, True)
    seeds = make_view_seeds(run.seed, len(train_set), run.num_views)
    key = teacher_cache_key(ws.teacher_checkpoint, ws.index_files, run.dataset, student.input_size,
                            run.num_views, run.seed)
    cache = TeacherCache.load(ws.teacher_cache, expected_key=key)
    assert torch.equal(cache.seeds, seeds)  # the cache's views are the training views
    teacher = load_teacher(Checkpoint.read(ws.teacher_checkpoint), index.meta, runtime, True)
    online = first_view_features(teacher, train_set, seeds, BatchNormalizer(index.meta.mean, index.meta.std),
                                 runtime, run.params.teacher_cache.batch_size)  # what align uses
    cached = view0_features(cache)  # what distill uses
    assert online.shape == cached.shape == (80, 512)
    torch.testing.assert_close(cached, online, rtol=2e-3, atol=2e-3)  # float16 storage

    # the setups themselves: align's (online teacher, gamma 0) and distill's (the cache)
    common = dict(seed=run.seed, num_views=run.num_views, runtime=runtime,
                  teacher_batch_size=run.params.teacher_cache.batch_size)
    teacher_ckpt = Checkpoint.read(ws.teacher_checkpoint)
    seed_everything(run.seed)
    align_setup = setup_distillation(run.objective("distill", gamma=0.0, beta=run.params.align.beta), student.spec,
                                     student.preset, index.meta, train_set, teacher_ckpt, role="align", **common)
    seed_everything(run.seed)
    distill_setup = setup_distillation(run.objective("distill"), student.spec, student.preset, index.meta,
                                       train_set, teacher_ckpt, cache=ws.teacher_cache, cache_key=key, **common)
    assert torch.equal(align_setup.view_seeds, distill_setup.view_seeds)
    planes = [align_setup.objective.lsh, distill_setup.objective.lsh]
    assert torch.equal(planes[0].weight, planes[1].weight)
    torch.testing.assert_close(planes[0].bias, planes[1].bias, rtol=1e-2, atol=1e-2)
    # bits of the teacher's features agree almost everywhere
    agree = (planes[0].bits(online) == planes[1].bits(online)).float().mean()
    assert agree > 0.99
    # and align and distill store those hyperplanes' state in their checkpoints
    assert align(run, ws)["aligned"] is True
    aligned = Checkpoint.read(ws.align_checkpoint).method_state
    torch.testing.assert_close(aligned["bias"], planes[0].bias, rtol=0, atol=0)
    train_role(run, "distill", ws, progress=False)
    for which in ("best", "last"):
        saved = Checkpoint.read(ws.checkpoint("distill", which)).method_state
        torch.testing.assert_close(saved["bias"], planes[1].bias, rtol=0, atol=0)
        assert saved["weight_std"] == pytest.approx(float(planes[0].weight.std()))
        assert saved["seed"] == run.seed


def test_fitnet_in_two_stages_trains_its_hint_in_align_then_distills_from_it(setup):
    """FitNets (Romero et al. 2015) as the paper trains it: ``hint_stage`` makes ``align`` its stage 1 (the
    student up to the guided layer and the regressor, on the hint alone: the layers after it and the
    classifier keep their initial weights), and ``distill`` starts from those weights with CE + KD
    (``feat_weight`` 0, ``kd_weight`` 1). Without ``hint_stage`` align has nothing to do."""
    index, ws, params = setup
    with_method(params, "fitnet")
    assert align(resolve(params), ws) == {"aligned": False, "reason": "distill.method = 'fitnet' trains in one "
                                          "stage: nothing to align (distill.fitnet.hint_stage is false)"}
    params["distill"]["fitnet"].update(hint_stage=True, feat_weight=0.0, kd_weight=1.0, student_layers=[1],
                                       teacher_layers=[2])
    run = resolve(params)
    seed_everything(run.seed)
    student = run.student.spec.build(index.meta.num_classes, index.meta.channels)
    initial = {name: param.detach().clone() for name, param in student.named_parameters()}
    summary = align(run, ws)
    assert summary["aligned"] is True and summary["epochs"] == 1 and set(summary["final"]) == {"loss", "hint"}
    aligned = Checkpoint.read(ws.align_checkpoint).state_dict
    changed = {k.split(".")[1] if k.startswith("features.") else k.split(".")[0]
               for k in initial if not torch.equal(initial[k], aligned[k])}
    # cnn_small's guided layer here is stage 1 (features.6): the weights of its convolutions and BatchNorms
    # (features.0-5) trained; stage 2's (features.8, .9) and the classifier's got no gradient
    assert changed == {"0", "1", "4", "5"}, changed
    build_cache(run, ws, progress=False)  # distill reads the teacher's layer2 from the cache, as in the pipeline
    result, _ = train_role(run, "distill", ws, progress=False)
    assert set(result.history[0]) >= {"train/ce", "train/hint", "train/kd"} and result.last_epoch == 2


def test_teacher_ls_smooths_the_teachers_labels_only(setup):
    """`teacher_ls` (the LS–KD study's LS teacher) changes the teacher's objective, not the student's."""
    index, ws, params = setup
    params["models"]["resnet18"]["epochs"] = 1
    plain = train_role(resolve(params), "teacher", ws, progress=False)[0].history[0]["train/ce"]
    params["teacher_ls"] = 0.5
    smoothed_run = resolve(params)
    smoothed = train_role(smoothed_run, "teacher", ws, progress=False)[0].history[0]["train/ce"]
    # same seed, weights, data and batches (the run is deterministic): only the objective differs
    assert smoothed != pytest.approx(plain, abs=1e-6)
    baseline = train_role(smoothed_run, "baseline", ws, progress=False)[0].history[0]["train/ce"]
    params["teacher_ls"] = None
    assert baseline == train_role(resolve(params), "baseline", ws, progress=False)[0].history[0]["train/ce"]


# ------------------------------------------------------------- a new method is one file

TOY_CENTER = textwrap.dedent('''
    """toy_center: CE + weight * mean (f_s - c)^2, c the teacher's mean pooled feature over view 0
    of every training image, fitted once in setup (a stand-in for any method with fitted state)."""
    from __future__ import annotations

    from typing import Any

    from torch import Tensor

    from kdlib.losses._common import check_nonnegative, check_smoothing, require_features
    from kdlib.losses.base import Method, SetupContext
    from kdlib.losses.ce import ce_loss
    from kdlib.losses.registry import MULTICLASS, LossOutput, StudentOutput, TeacherOutput, register_method


    @register_method("toy_center")
    class ToyCenter(Method):
        needs_teacher = True
        needs_features = True
        uses_distillation_token = False
        tasks = (MULTICLASS,)

        def __init__(self, weight: float = 1.0, label_smoothing: float = 0.0):
            super().__init__()
            self.weight = check_nonnegative("weight", weight)
            self.label_smoothing = check_smoothing(label_smoothing)
            self.register_buffer("center", None)

        def setup(self, context: SetupContext) -> None:
            self.center = context.first_view_features().float().mean(dim=0)

        def fitted_state(self) -> dict[str, Any]:
            return {} if self.center is None else {"center": self.center.detach().cpu()}

        def forward(self, student: StudentOutput, targets: Tensor, teacher: TeacherOutput | None = None
                    ) -> LossOutput:
            f_s, _ = require_features("toy_center", student, teacher)
            if self.center is None:
                raise RuntimeError("toy_center: setup() fits the center before the first forward")
            ce = ce_loss(student.logits, targets, self.label_smoothing)
            pull = (f_s - self.center.to(f_s.device)).pow(2).mean()
            return LossOutput(ce + self.weight * pull, {"ce": ce.detach(), "center": pull.detach()})
''')


@pytest.fixture
def toy_center(tmp_path):
    """``toy_center.py``, a method file outside kdlib, imported so that it registers; unregistered after."""
    path = tmp_path / "toy_center.py"
    path.write_text(TOY_CENTER)
    assert "toy_center" not in METHODS
    spec = importlib.util.spec_from_file_location("toy_center", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        assert METHODS.get("toy_center") is module.ToyCenter
        yield module
    finally:
        METHODS._items.pop("toy_center", None)


def test_a_new_method_is_one_file(toy_center, setup):
    index, ws, params = setup
    assert "toy_center" in distillation_methods("multiclass")
    assert "toy_center" not in distillation_methods("multilabel")
    assert toy_center.ToyCenter.knobs() == {"weight": 1.0}
    params["distill"]["method"] = "toy_center"
    params["distill"]["toy_center"] = {"weight": 0.5}
    params["align"]["epochs"] = 0  # toy_center has no gamma/beta knobs for the align stage (next test)
    # stages/ knows nothing of toy_center: its section is checked by the method's own constructor
    run = resolve(params)
    assert run.method.name == "toy_center" and dict(run.method.knobs) == {"weight": 0.5}
    assert run.method.cls is toy_center.ToyCenter and run.objective("distill").weight == 0.5
    for bad, message in (({"wieght": 0.5}, "distill.toy_center.wieght: unknown knob; toy_center takes: weight"),
                         ({"weight": -1.0}, "weight must be a finite number >= 0")):
        wrong = copy.deepcopy(params)
        wrong["distill"]["toy_center"] = bad
        with pytest.raises(ParamError, match=message):
            resolve(wrong)

    run = resolve(params)
    result, n_params = train_pipeline(run, ws, roles=("distill",))["distill"]
    assert result.last_epoch == 2 and n_params > 0
    for row in result.history:
        assert {"train/ce", "train/center", "train/loss"} <= set(row)
        assert row["train/center"] == row["train/center"] and row["train/center"] >= 0  # no NaN

    # the fitted center is the mean of the teacher's view-0 features, stored in every checkpoint
    cache = TeacherCache.load(ws.teacher_cache)
    assert cache.has_features
    expected = view0_features(cache).float().mean(dim=0)
    for which in ("best", "last"):
        checkpoint = Checkpoint.read(ws.checkpoint("distill", which))
        assert set(checkpoint.method_state) == {"center"}
        center = checkpoint.method_state["center"]
        assert center.shape == (512,)
        torch.testing.assert_close(center, expected, rtol=0, atol=0)
        model = checkpoint.model()
        assert isinstance(model, FeatureStudent) and model.projected
    # ... and, float16 cache storage aside, that of the teacher run online on the same views
    runtime = Runtime()
    teacher = load_teacher(Checkpoint.read(ws.teacher_checkpoint), index.meta, runtime, True)
    train_set = run.dataset.load(index, "train", run.student.input_size, True)
    online = first_view_features(teacher, train_set, cache.seeds, BatchNormalizer(index.meta.mean, index.meta.std),
                                 runtime, run.params.teacher_cache.batch_size)
    torch.testing.assert_close(center, online.mean(dim=0), rtol=2e-3, atol=2e-3)
    evaluated = evaluate_checkpoint(run, index, checkpoint)
    assert len(evaluated.targets) == 30 and 0.0 <= evaluated.metrics["top1"] <= 100.0


def test_a_new_feature_method_is_aligned_or_refused_up_front(toy_center, setup, monkeypatch):
    """A feature method without gamma/beta knobs cannot be turned into feature terms only: resolve()
    refuses it while align.epochs > 0, naming the way out; one that declares its alignment_knobs()
    in its own file is aligned by the unchanged align stage."""
    index, ws, params = setup
    params["distill"]["method"] = "toy_center"
    params["distill"]["toy_center"] = {"weight": 0.5}
    assert params["align"]["epochs"] == 1
    with pytest.raises(ParamError, match=r"'toy_center' mimics features but cannot be aligned.*align.epochs=0"):
        resolve(params)
    monkeypatch.setattr(toy_center.ToyCenter, "alignment_knobs", classmethod(lambda cls, beta, knobs={}: {"weight": beta}))
    summary = align(resolve(params), ws)
    assert summary["aligned"] is True and summary["epochs"] == 1
    assert Checkpoint.read(ws.align_checkpoint).method_state.keys() == {"center"}


TOY_CHANNELS = textwrap.dedent('''
    """toy_channels: CE + w_feat * sum over layer pairs of MSE(mean_hw(a(F_s)), mean_hw(F_t)), a a trained 1x1
    convolution to the teacher's width (a stand-in for any feature-map method with an adapter).

    .. math::

        L = w_{ce} CE + w_{feat} \\sum_l \\lVert \\bar a(F^s_l) - \\bar F^t_l \\rVert^2
    """
    from __future__ import annotations

    from torch import Tensor, nn

    from kdlib.losses._layers import LayerMethod, spatial_maps
    from kdlib.losses.registry import MULTICLASS, register_method
    from kdlib.taps import LayerPlan


    @register_method("toy_channels")
    class ToyChannels(LayerMethod):
        """CE + per-channel means of adapted student maps against the teacher's."""

        needs_teacher = True
        needs_features = False
        uses_distillation_token = False
        uses_layers = True
        uses_progress = False
        uses_positions = False
        tasks = (MULTICLASS,)
        soft_targets = "mixed"
        method_name, feat_term = "toy_channels", "channels"

        def layer_problem(self, plan: LayerPlan) -> str | None:
            return spatial_maps("toy_channels", plan)

        def build_adapters(self, plan: LayerPlan) -> None:
            self.adapters = nn.ModuleList(nn.Conv2d(s[0], t[0], 1) for s, t in zip(plan.student_shapes,
                                                                                   plan.teacher_shapes))

        def pair_loss(self, index: int, f_s: Tensor, f_t: Tensor) -> Tensor:
            return (self.adapters[index](f_s).mean((2, 3)) - f_t.mean((2, 3))).pow(2).mean()
''')


def test_a_new_feature_map_method_is_one_file(tmp_path, setup):
    """A feature-map method written outside kdlib — one file, no edit to kdlib/ or stages/ — reads hooked
    layers of both nets, owns an adapter that trains with the student (counted in its parameters) and runs
    through the pipeline's stages; its layers are knobs, checked before any work."""
    path = tmp_path / "toy_channels.py"
    path.write_text(TOY_CHANNELS)
    spec = importlib.util.spec_from_file_location("toy_channels", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        index, ws, params = setup
        params["distill"]["method"] = "toy_channels"
        params["distill"]["toy_channels"] = {"feat_weight": 2.0, "student_layers": [1, 2], "teacher_layers": [3, 4]}
        run = resolve(params)
        result, n_params = train_pipeline(run, ws, roles=("distill",))["distill"]
        student = Checkpoint.read(ws.checkpoint("distill")).model()
        adapters = (64 * 256 + 256) + (64 * 512 + 512)  # cnn_small's 64 channels to layer3's 256, layer4's 512
        assert n_params == count_parameters(student) + adapters
        assert all({"train/ce", "train/channels"} <= set(row) for row in result.history)
        bad = copy.deepcopy(params)
        bad["distill"]["toy_channels"]["teacher_layers"] = ["layer9"]
        with pytest.raises((ParamError, ValueError), match="has no module 'layer9'"):
            train_pipeline(resolve(bad), ws, roles=("distill",))
    finally:
        METHODS._items.pop("toy_channels", None)


def test_the_new_method_is_gone_after_its_test():
    assert "toy_center" not in METHODS and "toy_center" not in distillation_methods()
    assert "toy_channels" not in METHODS
