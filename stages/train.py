"""teacher / baseline / distill: one training stage, three roles.

* ``teacher``: the ``teacher`` preset on labels (cross-entropy with its label smoothing);
* ``baseline``: the ``student`` preset on labels, same recipe as distill (the control);
* ``distill``: the ``student`` preset with the ``kd`` objective against the trained teacher.

Writes ``models/<role>/{best,last}.pt`` and DVCLive logs in ``reports/<role>/``.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from dvclive import Live

from kdlib.checkpoint import model_from_checkpoint
from kdlib.data.transforms import build_mix
from kdlib.data.index import DatasetIndex
from kdlib.losses import METHODS, build_objective
from kdlib.models import build_model, count_parameters
from kdlib.runtime import Runtime, seed_everything
from kdlib.teacher import OnlineTeacher
from kdlib.train import FitResult, MetricsLogger, fit, recipe_from_dict
from stages.common import (MODELS_DIR, REPORTS_DIR, ROLES, load_split, normalizer_for, prepared_index,
                           write_json)
from stages.params import load_params, model_spec


def train_role(
    params: dict[str, Any], role: str, index: DatasetIndex, out_dir: Path, teacher_checkpoint: Path | None,
    logger: MetricsLogger | None = None, progress: bool = True,
) -> tuple[FitResult, int]:
    """Train ``role`` as the params say; returns the fit result and the parameter count."""
    spec = model_spec(params, params["teacher" if role == "teacher" else "student"])
    recipe = recipe_from_dict({**params["models"][spec.name], "eval_batch_size": params["eval"]["batch_size"],
                               "num_workers": params["data"]["num_workers"]})
    dataset_preset = params["datasets"][params["dataset"]]
    train_set = load_split(index, "train", dataset_preset, spec.input_size, True)
    val_set = load_split(index, "val", dataset_preset, spec.input_size, False)

    seed_everything(params["seed"])
    runtime = Runtime.from_env("auto")  # CUDA when present (set CUDA_VISIBLE_DEVICES= to force CPU)
    meta = index.meta
    model = build_model(spec.arch, meta.num_classes, meta.channels, spec.pretrained, **spec.kwargs)
    teacher, multilabel = None, meta.task == "multilabel"
    if role == "distill":
        teacher_model, teacher_meta = model_from_checkpoint(teacher_checkpoint)
        teacher = OnlineTeacher(teacher_model.to(runtime.device), teacher_meta.get("input_size"),
                                (meta.mean, meta.std), (teacher_meta["mean"], teacher_meta["std"]))
        kd = params["kd"]
        if getattr(METHODS.get(kd["method"]), "multilabel", False) != multilabel:
            raise SystemExit(f"error: kd.method = {kd['method']!r} does not fit {meta.name!r}, a "
                             f"{meta.task} data set (use e.g. {'sigmoid_kd' if multilabel else 'kd'})")
        smoothing = {} if multilabel else {"label_smoothing": recipe.label_smoothing}
        objective = build_objective(kd["method"], temperature=kd["temperature"], alpha=kd["alpha"], **smoothing)
    else:
        objective = build_objective("bce") if multilabel else build_objective(
            "ce", label_smoothing=recipe.label_smoothing)
    checkpoint_meta = {
        "role": role, "preset": spec.name, "arch": spec.arch, "model_kwargs": spec.kwargs,
        "num_classes": meta.num_classes, "in_chans": meta.channels, "classes": meta.classes,
        "input_size": spec.input_size or meta.image_size, "mean": meta.mean, "std": meta.std,
        "dataset": meta.name, "seed": params["seed"],
    }
    shutil.rmtree(out_dir, ignore_errors=True)
    result = fit(model, train_set, val_set, objective, recipe, normalizer_for(index, recipe.channels_last),
                 out_dir, checkpoint_meta, params["seed"], teacher=teacher, logger=logger,
                 runtime=runtime, progress=progress, ap_mode=dataset_preset.get("ap_mode", "voc"),
                 mix=build_mix(meta.num_classes, dataset_preset.get("mixup", 0.0), dataset_preset.get("cutmix", 0.0)))
    return result, count_parameters(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=ROLES)
    role = parser.parse_args().role
    params = load_params()
    with Live(str(REPORTS_DIR / role), dvcyaml=False, save_dvc_exp=False) as live:
        result, n_params = train_role(params, role, prepared_index(), MODELS_DIR / role,
                                      MODELS_DIR / "teacher" / "best.pt", logger=live)
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
