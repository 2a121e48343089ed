"""teacher / baseline / distill: one training stage, three roles.

* ``teacher``: the ``teacher`` preset on labels (cross-entropy, label smoothing ``teacher_ls``);
* ``baseline``: the ``student`` preset on labels, same recipe and views as distill (the control);
* ``distill``: the ``student`` preset with ``distill.method`` against the trained teacher, whose
  outputs come from the teacher cache when there is one, starting from the aligned ``feat_fc``
  when the ``align`` stage made one.

Writes ``models/<role>/{best,last}.pt`` and DVCLive logs in ``reports/<role>/``.
"""
from __future__ import annotations

import argparse
import shutil
from typing import Any

import torch
from dvclive import Live

from kdlib.checkpoint import load_checkpoint
from kdlib.data.index import DatasetIndex
from kdlib.data.transforms import build_mix
from kdlib.losses import build_objective
from kdlib.models import build_model, count_parameters
from kdlib.runtime import Runtime, seed_everything
from kdlib.teacher_cache import CachedTeacher, TeacherCache
from kdlib.train import FitResult, MetricsLogger, fit, recipe_from_dict
from stages import distillation as D
from stages.common import REPORTS_DIR, ROLES, Workspace, load_split, normalizer_for, prepared_index, write_json
from stages.params import load_params, model_spec


def distill_setup(params: dict[str, Any], index: DatasetIndex, train_set: Any, runtime: Runtime, ws: Workspace
                  ) -> tuple[torch.nn.Module, torch.nn.Module, Any, torch.Tensor | None]:
    """The distillation objective, student, teacher (cached or online) and the views to train on."""
    objective = D.build_method(params, index.meta.task, D.student_recipe(params))
    features = getattr(objective, "needs_features", False)
    model = D.build_student(params, index, objective)
    online, teacher_model = D.load_teacher(index, runtime, features, ws)
    model = D.with_feat_fc(params, index, objective, model, teacher_model, ws)
    if params["teacher_cache"]["enabled"]:
        cache = TeacherCache.load(ws.teacher_cache, expected_key=D.expected_cache_key(params, index, ws))
        teacher, view_seeds = CachedTeacher(cache, runtime.device, features), cache.seeds
    else:
        teacher, view_seeds = online, D.training_view_seeds(params, len(train_set))
    if getattr(objective, "needs_lsh", False):
        view0 = (D.cached_first_view_features(cache) if params["teacher_cache"]["enabled"]
                 else D.first_view_features(online, train_set, view_seeds, params, index, runtime))
        D.fit_lsh(objective, teacher_model, view0, params["seed"])
        out_dir = ws.models / "distill"
        out_dir.mkdir(parents=True, exist_ok=True)
        # the fitted bias, a DVC output; the weights are rebuilt from (seed, N, sigma)
        torch.save({"bias": objective.lsh.bias.cpu(), "seed": params["seed"],
                    "weight_std": float(objective.lsh.weight.std())}, out_dir / "lsh.pt")
    aligned = D.read_align_checkpoint(ws)
    if aligned is not None:
        model.load_state_dict(load_checkpoint(aligned)["state_dict"])
    return objective, model, teacher, view_seeds


def train_role(
    params: dict[str, Any], role: str, index: DatasetIndex, ws: Workspace = Workspace(),
    logger: MetricsLogger | None = None, progress: bool = True,
) -> tuple[FitResult, int]:
    """Train ``role`` as the params say into ``ws.models/<role>``; returns the fit result and the
    parameter count. ``distill`` reads the teacher, the teacher cache and the alignment from ``ws``."""
    out_dir = ws.models / role
    spec = model_spec(params, params["teacher" if role == "teacher" else "student"])
    recipe = recipe_from_dict({**params["models"][spec.name], "eval_batch_size": params["eval"]["batch_size"],
                               "num_workers": params["data"]["num_workers"]})
    dataset_preset = params["datasets"][params["dataset"]]
    train_set = load_split(index, "train", dataset_preset, spec.input_size, True)
    val_set = load_split(index, "val", dataset_preset, spec.input_size, False)
    seed_everything(params["seed"])
    runtime = Runtime.from_env("auto")  # CUDA when present (set CUDA_VISIBLE_DEVICES= to force CPU)
    meta = index.meta
    shutil.rmtree(out_dir, ignore_errors=True)
    teacher = view_seeds = None
    if role == "distill":
        D.refuse_mixing_with_cache(params)
        objective, model, teacher, view_seeds = distill_setup(params, index, train_set, runtime, ws)
    else:
        model = build_model(spec.arch, meta.num_classes, meta.channels, spec.pretrained, **spec.kwargs)
        smoothing = params["teacher_ls"] if role == "teacher" and params["teacher_ls"] is not None \
            else recipe.label_smoothing
        objective = build_objective("bce") if meta.task == "multilabel" else build_objective(
            "ce", label_smoothing=smoothing)
    result = fit(model, train_set, val_set, objective, recipe, normalizer_for(index, recipe.channels_last),
                 out_dir, D.checkpoint_meta(params, index, role, model), params["seed"], teacher=teacher, logger=logger,
                 runtime=runtime, progress=progress, ap_mode=dataset_preset.get("ap_mode", "voc"),
                 mix=build_mix(meta.num_classes, dataset_preset.get("mixup", 0.0), dataset_preset.get("cutmix", 0.0)),
                 view_seeds=view_seeds)
    return result, count_parameters(model)


def train_pipeline(params: dict[str, Any], index: DatasetIndex, ws: Workspace = Workspace(),
                   roles: tuple[str, ...] = ROLES, progress: bool = False) -> dict[str, tuple[FitResult, int]]:
    """The training stages in ``dvc.yaml``'s order, in one process (tests, benchmarks):
    ``distill`` is preceded by ``teacher_cache`` and ``align``, as in the pipeline."""
    from stages.align import align
    from stages.teacher_cache import build_cache

    results = {}
    for role in roles:
        if role == "distill":
            build_cache(params, index, ws, progress)
            align(params, index, ws)
        results[role] = train_role(params, role, index, ws, progress=progress)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=ROLES)
    role = parser.parse_args().role
    params = load_params()
    with Live(str(REPORTS_DIR / role), dvcyaml=False, save_dvc_exp=False) as live:
        result, n_params = train_role(params, role, prepared_index(), logger=live)
        live.summary.update({
            "best_epoch": result.best_epoch, f"best_val_{result.score_name}": result.best_val_score,
            "last_epoch": result.last_epoch, f"last_val_{result.score_name}": result.last_val_score,
            "stopped_early": result.stopped_early, "params": n_params,
        })
    # Wall-clock figures vary run to run; they live apart from the reproducible metrics.
    write_json(REPORTS_DIR / role / "timing.json", {
        "train_seconds": round(result.train_seconds, 2),
        "train_images_per_second": round(result.images_per_second, 1),
        "epoch_seconds": [round(s, 3) for s in result.epoch_seconds],
    })
    print(f"{role}: best val {result.score_name} {result.best_val_score:.2f} (epoch {result.best_epoch}), "
          f"last {result.last_val_score:.2f}; {result.train_seconds:.1f} s")


if __name__ == "__main__":
    main()
