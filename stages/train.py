"""teacher / baseline / distill: one training stage, three roles.

``teacher``: the ``teacher`` preset on labels (label smoothing ``teacher_ls``); ``baseline``: the
``student`` preset on labels, same recipe and views as distill (the control); ``distill``: the
``student`` with ``distill.method`` against the teacher (from the teacher cache when there is
one), starting from the aligned ``feat_fc`` when the ``align`` stage made one. Writes
``models/<role>/{best,last}.pt`` and DVCLive logs in ``reports/<role>/``."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from dvclive import Live

from kdlib.checkpoint import Checkpoint, ModelRecord
from kdlib.data.transforms import BatchNormalizer, build_mix
from kdlib.distill import setup_distillation, teacher_cache_key
from kdlib.io import write_json
from kdlib.models import count_parameters
from kdlib.runtime import Runtime, seed_everything
from kdlib.train import FitResult, MetricsLogger, TrainData, fit
from stages.guard import stage_outputs
from stages.params import ROLES, Run, load_params
from stages.workspace import Workspace


def train_role(run: Run, role: str, ws: Workspace = Workspace(), logger: MetricsLogger | None = None,
               progress: bool = True, out_dir: Path | None = None) -> tuple[FitResult, int]:
    """Train ``role`` into ``out_dir`` (default ``ws.models/<role>``); ``distill`` reads the teacher,
    its cache and the alignment from ``ws``. Returns the fit result and the parameter count."""
    index, model_run = ws.index(), run.model(role)
    train_set = run.dataset.load(index, "train", model_run.input_size, True)
    val_set = run.dataset.load(index, "val", model_run.input_size, False)
    seed_everything(run.seed)
    runtime = Runtime.from_env("auto")  # CUDA when present (set CUDA_VISIBLE_DEVICES= to force CPU)
    teacher = view_seeds = None
    if role == "distill":
        cache = run.params.teacher_cache
        setup = setup_distillation(
            run.objective(role), model_run.spec, model_run.preset, index.meta, train_set,
            Checkpoint.read(ws.teacher_checkpoint), seed=run.seed, num_views=run.num_views, runtime=runtime,
            cache=ws.teacher_cache if cache.enabled else None, teacher_batch_size=cache.batch_size,
            cache_key=teacher_cache_key(ws.teacher_checkpoint, ws.index_files, run.dataset, model_run.input_size,
                                        run.num_views, run.seed),
            aligned=Checkpoint.read(ws.align_checkpoint) if ws.align_checkpoint.is_file() else None)
        model, objective, teacher, view_seeds, record = setup.student, setup.objective, setup.teacher, \
            setup.view_seeds, setup.record
    else:
        model, objective = model_run.spec.build(index.meta.num_classes, index.meta.channels), run.objective(role)
        record = ModelRecord.for_model(role, model_run.preset, model_run.spec, index.meta, run.seed, model)
    data = TrainData(train_set, val_set, BatchNormalizer(index.meta.mean, index.meta.std, model_run.recipe.channels_last),
                     view_seeds, build_mix(index.meta.num_classes, run.dataset.mixup, run.dataset.cutmix),
                     run.dataset.ap_mode)
    out_dir = ws.models / role if out_dir is None else out_dir
    shutil.rmtree(out_dir, ignore_errors=True)
    result = fit(model, objective, model_run.recipe, data, out_dir, record, run.seed, teacher, logger,
                 runtime, progress)
    return result, count_parameters(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=ROLES)
    role, ws = parser.parse_args().role, Workspace()
    reports = ws.reports / role
    with stage_outputs(role, ws.models / role, reports / "plots", reports / "metrics.json", reports / "timing.json",
                       ws=ws, manifests=(ws.models / role,)) as out:
        run = load_params()
        with Live(str(out(reports)), dvcyaml=False, save_dvc_exp=False) as live:
            result, n_params = train_role(run, role, ws, logger=live, out_dir=out(ws.models / role))
            live.summary.update({**result.summary(), "params": n_params})
        write_json(out(reports / "timing.json"), result.timing())
    print(f"{role}: best val {result.score_name} {result.best_val_score:.2f} (epoch {result.best_epoch}), "
          f"last {result.last_val_score:.2f}; {result.train_seconds:.1f} s")


if __name__ == "__main__":
    main()
