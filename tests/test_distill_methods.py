"""Every distillation method through the pipeline's own stage functions on a tiny MNIST
(prepare → teacher → teacher_cache → align → distill → evaluate), the cache's equivalence with the
online teacher, its refusals, and the stages' refusals of combinations that cannot work."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from kdlib.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from kdlib.features import FeatureStudent
from kdlib.models import build_model
from kdlib.runtime import Runtime, seed_everything
from kdlib.teacher_cache import CacheMismatch, TeacherCache
from stages import distillation as D
from stages.align import align
from stages.common import Workspace
from stages.evaluate import evaluate_checkpoint
from stages.params import load_params, model_spec
from stages.prepare import prepare
from stages.teacher_cache import build_cache
from stages.train import train_pipeline, train_role

REPO = Path(__file__).resolve().parents[1]
FEATURE_METHODS = ("l2", "lsh", "lshl2", "lshl2_s")
LSH_METHODS = ("lsh", "lshl2", "lshl2_s")
METHODS = ("kd", "deit_soft", "deit_hard", *FEATURE_METHODS)


def shrink(params: dict) -> dict:
    params["datasets"]["mnist"]["root"] = str(REPO / "data" / "mnist")
    params["data"].update(train_per_class=8, val_per_class=2, test_per_class=3, num_workers=0)
    for preset in params["models"].values():
        preset["epochs"] = 2
        preset["warmup_epochs"] = 0
    params["align"]["epochs"] = 1
    return params


@pytest.fixture(scope="module")
def base_params() -> dict:
    return shrink(copy.deepcopy(load_params(REPO / "params.yaml")))


@pytest.fixture(scope="module")
def trained(base_params, tmp_path_factory: pytest.TempPathFactory):
    """A prepared tiny MNIST and a teacher trained on it once: (index, workspace)."""
    ws = Workspace(tmp_path_factory.mktemp("distill") / "base")
    index = prepare(base_params, ws.prepared)
    assert len(index.split("train")) == 80
    train_role(base_params, "teacher", index, ws, progress=False)
    assert ws.teacher_checkpoint.is_file()
    return index, ws


@pytest.fixture
def setup(trained, base_params, tmp_path):
    """A private copy of the trained workspace and of the params."""
    index, base = trained
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(base.root, ws.root)
    return index, ws, copy.deepcopy(base_params)


def with_method(params: dict, method: str) -> dict:
    params["distill"]["method"] = method
    if method.startswith("deit"):
        params["student"] = "deit"
    return params


# --------------------------------------------------------------------- every method

@pytest.mark.parametrize("method", METHODS)
def test_every_multiclass_method_distills_with_the_cache(method, setup):
    index, ws, params = setup
    with_method(params, method)
    assert params["teacher_cache"]["enabled"]
    results = train_pipeline(params, index, ws, roles=("distill",))
    result, n_params = results["distill"]
    assert result.last_epoch == 2 and n_params > 0
    assert all(row["train/loss"] == row["train/loss"] for row in result.history)  # no NaN
    cache = TeacherCache.load(ws.teacher_cache)
    assert cache.num_views == 2 and cache.num_images == 80
    assert cache.has_features == (method in FEATURE_METHODS)

    best = ws.models / "distill" / "best.pt"
    model, meta = model_from_checkpoint(best)
    assert meta["role"] == "distill" and meta["arch"] == model_spec(params, params["student"]).arch
    evaluated, _, _ = evaluate_checkpoint(params, index, best)
    assert len(evaluated.targets) == 30 and 0.0 <= evaluated.metrics["top1"] <= 100.0

    summary = json.loads((ws.align / "align.json").read_text())
    if method in FEATURE_METHODS:
        assert isinstance(model, FeatureStudent) and model.projected
        assert meta["feature_student"] == {"student_width": 64, "teacher_width": 512, "project": True}
        assert summary["aligned"] is True and summary["epochs"] == 1
        aligned, align_meta = model_from_checkpoint(ws.align / "last.pt")
        assert isinstance(aligned, FeatureStudent) and align_meta["role"] == "align"
        assert not (ws.align / "best.pt").exists()
    else:
        assert not isinstance(model, FeatureStudent) and meta["feature_student"] is None
        assert summary["aligned"] is False and "mimics no features" in summary["reason"]
        assert not (ws.align / "last.pt").exists()
    lsh_file = ws.models / "distill" / "lsh.pt"
    assert lsh_file.is_file() == (method in LSH_METHODS)
    if method in LSH_METHODS:
        lsh = torch.load(lsh_file, weights_only=True)
        assert lsh["bias"].shape == (32 * 512,) and lsh["seed"] == params["seed"]


# ------------------------------------------------------------------ cached vs online

def _distill(params: dict, index, ws: Workspace):
    build_cache(params, index, ws, progress=False)  # with enabled: false, only the marker
    align(params, index, ws)
    return train_role(params, "distill", index, ws, progress=False)[0]


@pytest.mark.parametrize("method,tol", [("kd", 1e-6), ("l2", 1e-3)])
def test_cached_and_online_distillation_give_the_same_history(method, tol, setup):
    """With K = epochs the cached views are those the online run trains on, so only floating point
    (fp16 features for l2) separates the two runs."""
    index, ws, params = setup
    with_method(params, method)
    assert params["teacher_cache"]["views"] is None
    cached = _distill(params, index, ws)
    cached_state = load_checkpoint(ws.models / "distill" / "last.pt")["state_dict"]
    online_params = copy.deepcopy(params)
    online_params["teacher_cache"]["enabled"] = False
    online = _distill(online_params, index, ws)
    assert json.loads((ws.teacher_cache / "cache.json").read_text()) == {"enabled": False}
    online_state = load_checkpoint(ws.models / "distill" / "last.pt")["state_dict"]
    assert len(cached.history) == len(online.history) == 2
    for a, b in zip(cached.history, online.history):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=tol, abs=tol), key
    for name, value in cached_state.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, online_state[name], rtol=tol * 10, atol=tol * 10)


def test_baseline_and_distill_start_from_the_same_student(setup):
    index, ws, params = setup
    with_method(params, "kd")
    # the stage builders, right after seeding: the same initial weights
    seed_everything(params["seed"])
    objective = D.build_method(params, index.meta.task, D.student_recipe(params))
    distill_init = D.build_student(params, index, objective).state_dict()
    spec = model_spec(params, params["student"])
    seed_everything(params["seed"])
    baseline_init = build_model(spec.arch, index.meta.num_classes, index.meta.channels, spec.pretrained,
                                **spec.kwargs).state_dict()
    assert all(torch.equal(distill_init[k], baseline_init[k]) for k in baseline_init)
    # the roles themselves: with lr 0 nothing is learned, so the checkpoints hold the initial weights
    # (and BN statistics of the same views in the same order)
    params["models"]["cnn_small"]["lr"] = 0.0
    train_role(params, "baseline", index, ws, progress=False)
    build_cache(params, index, ws, progress=False)
    train_role(params, "distill", index, ws, progress=False)
    base = load_checkpoint(ws.models / "baseline" / "last.pt")["state_dict"]
    dist = load_checkpoint(ws.models / "distill" / "last.pt")["state_dict"]
    assert base.keys() == dist.keys()
    for name in base:
        assert torch.equal(base[name], dist[name]), name
    assert torch.equal(base["fc.weight"], baseline_init["fc.weight"])


# ------------------------------------------------------------------ cache refusals

def test_cache_refused_after_the_teacher_changes(setup):
    index, ws, params = setup
    with_method(params, "kd")
    build_cache(params, index, ws, progress=False)
    teacher, meta = model_from_checkpoint(ws.teacher_checkpoint)
    with torch.no_grad():
        next(teacher.parameters()).add_(0.01)
    save_checkpoint(ws.teacher_checkpoint, teacher, meta)
    with pytest.raises(CacheMismatch, match="teacher sha256") as err:
        train_role(params, "distill", index, ws, progress=False)
    assert "transform" not in str(err.value) and "rebuild" in str(err.value)
    # rebuilt for the new teacher, it serves again
    build_cache(params, index, ws, progress=False)
    assert train_role(params, "distill", index, ws, progress=False)[0].last_epoch == 2


def test_cache_refused_after_the_transform_changes(setup):
    index, ws, params = setup
    with_method(params, "kd")
    build_cache(params, index, ws, progress=False)
    params["datasets"]["mnist"]["augment_options"]["shift_px"] = 3
    with pytest.raises(CacheMismatch, match="transform") as err:
        train_role(params, "distill", index, ws, progress=False)
    assert "shift_px" in str(err.value) and "teacher sha256" not in str(err.value)


def test_fewer_views_than_epochs(setup):
    index, ws, params = setup
    with_method(params, "kd")
    params["teacher_cache"]["views"] = 1
    summary = build_cache(params, index, ws, progress=False)
    assert summary["views"] == 1
    result = train_role(params, "distill", index, ws, progress=False)[0]
    assert result.last_epoch == 2
    cache = TeacherCache.load(ws.teacher_cache)
    assert cache.num_views == 1 and cache.key["views"] == "1"
    assert json.loads((ws.teacher_cache / "cache.json").read_text())["num_views"] == 1
    # a cache of 1 view does not serve a run that expects 2
    params["teacher_cache"]["views"] = None
    with pytest.raises(CacheMismatch, match="number of views"):
        train_role(params, "distill", index, ws, progress=False)


# ------------------------------------------------------------------ stage refusals

def test_deit_hard_needs_a_distillation_token(setup):
    index, ws, params = setup
    params["distill"]["method"] = "deit_hard"
    assert params["student"] == "cnn_small"
    with pytest.raises(SystemExit, match="distillation token"):
        train_role(params, "distill", index, ws, progress=False)


@pytest.mark.parametrize("method", ["lshl2_s", "kd", "deit_soft"])
def test_multilabel_refuses_multiclass_only_methods(method, base_params):
    params = with_method(copy.deepcopy(base_params), method)
    with pytest.raises(SystemExit) as err:
        D.build_method(params, "multilabel", D.student_recipe(params))
    message = str(err.value)
    assert repr(method) in message and "multilabel" in message
    fits = message.split("use one of:")[1]
    names = {name.strip() for name in fits.split(",")}
    assert names == {"sigmoid_kd", "l2", "lsh", "lshl2"}
    # the same methods are accepted on multiclass data
    D.build_method(params, "multiclass", D.student_recipe(params))


def test_mixup_with_the_cache_is_refused(setup):
    index, ws, params = setup
    params["datasets"]["mnist"]["mixup"] = 0.8
    with pytest.raises(SystemExit, match="teacher_cache.enabled"):
        build_cache(params, index, ws, progress=False)
    with pytest.raises(SystemExit, match="teacher_cache.enabled"):
        train_role(params, "distill", index, ws, progress=False)


# ------------------------------------------------------------------------- align

def test_align_with_zero_epochs_is_skipped(setup):
    index, ws, params = setup
    with_method(params, "lshl2")
    params["align"]["epochs"] = 0
    summary = align(params, index, ws)
    assert summary == {"aligned": False, "reason": "align.epochs = 0"}
    assert json.loads((ws.align / "align.json").read_text()) == summary
    assert not (ws.align / "last.pt").exists()
    assert D.read_align_checkpoint(ws) is None


def test_align_and_distill_fit_the_same_lsh_hyperplanes(setup):
    index, ws, params = setup
    with_method(params, "lshl2")
    build_cache(params, index, ws, progress=False)
    seed_everything(params["seed"])
    runtime = Runtime()
    teacher, teacher_model = D.load_teacher(index, runtime, True, ws)
    train_set, _ = D.train_sets(params, index)
    seeds = D.training_view_seeds(params, len(train_set))
    cache = TeacherCache.load(ws.teacher_cache, expected_key=D.expected_cache_key(params, index, ws))
    assert torch.equal(cache.seeds, seeds)  # the cache's views are the training views
    online = D.first_view_features(teacher, train_set, seeds, params, index, runtime)  # what align uses
    cached = D.cached_first_view_features(cache)  # what distill uses
    assert online.shape == cached.shape == (80, 512)
    torch.testing.assert_close(cached, online, rtol=2e-3, atol=2e-3)  # float16 storage
    planes = []
    for features in (online, cached):
        objective = D.build_method(params, index.meta.task, D.student_recipe(params))
        D.fit_lsh(objective, teacher_model, features, params["seed"])
        planes.append(objective.lsh)
    assert torch.equal(planes[0].weight, planes[1].weight)
    torch.testing.assert_close(planes[0].bias, planes[1].bias, rtol=1e-2, atol=1e-2)
    # bits of the teacher's features agree almost everywhere
    agree = (planes[0].bits(online) == planes[1].bits(online)).float().mean()
    assert agree > 0.99
    # and distill writes those hyperplanes' bias
    train_role(params, "distill", index, ws, progress=False)
    saved = torch.load(ws.models / "distill" / "lsh.pt", weights_only=True)
    torch.testing.assert_close(saved["bias"], planes[1].bias, rtol=0, atol=0)
    assert saved["weight_std"] == pytest.approx(float(planes[0].weight.std()))


def test_teacher_ls_smooths_the_teachers_labels_only(setup):
    """`teacher_ls` (seed 001's LS teacher) changes the teacher's objective, not the student's."""
    index, ws, params = setup
    params["models"]["resnet18"]["epochs"] = 1
    plain = train_role(params, "teacher", index, ws, progress=False)[0].history[0]["train/ce"]
    params["teacher_ls"] = 0.5
    smoothed = train_role(params, "teacher", index, ws, progress=False)[0].history[0]["train/ce"]
    # same seed, weights, data and batches (the run is deterministic): only the objective differs
    assert smoothed != pytest.approx(plain, abs=1e-6)
    baseline = train_role(params, "baseline", index, ws, progress=False)[0].history[0]["train/ce"]
    params["teacher_ls"] = None
    assert baseline == train_role(params, "baseline", index, ws, progress=False)[0].history[0]["train/ce"]
