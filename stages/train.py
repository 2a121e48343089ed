"""teacher / baseline / distill: one training stage, three roles.

``teacher``: the ``teacher`` preset on labels (label smoothing ``teacher_ls``); ``baseline``: the
``student`` preset on labels, same recipe and views as distill (the control); ``distill``: the
``student`` with ``distill.method`` against the teacher (from the teacher cache when there is
one), starting from the aligned ``feat_fc`` when the ``align`` stage made one. Writes
``models/<role>/{best,last}.pt`` and DVCLive logs in ``reports/<role>/``."""
from __future__ import annotations

import shutil
from pathlib import Path

from dvclive import Live

from kdlib.checkpoint import Checkpoint, ModelRecord
from kdlib.data.transforms import BatchNormalizer, build_mix
from kdlib.distill import setup_distillation
from kdlib.io import write_json
from kdlib.models import count_parameters
from kdlib.resume import ResumeStore
from kdlib.runtime import Runtime, seed_everything
from kdlib.train import FitResult, MetricsLogger, TrainData, fit, own_parameters
from stages.launch import parse_stage_args, stage_main
from stages.params import ROLES, Run
from stages.workspace import Workspace


def train_role(run: Run, role: str, ws: Workspace = Workspace(), logger: MetricsLogger | None = None,
               progress: bool = True, out_dir: Path | None = None, runtime: Runtime | None = None,
               resume: ResumeStore | None = None) -> tuple[FitResult, int]:
    """Train ``role`` into ``out_dir`` (default ``ws.models/<role>``) as process ``runtime`` (default:
    the only one), saving and resuming at ``resume``; ``distill`` reads the teacher, its cache and
    the alignment from ``ws``. Returns the fit result and the parameter count."""
    index, model_run = ws.index(), run.model(role)
    train_set = run.train_dataset(role).load(run.training_index(index, role), "train", model_run.input_size, True,
                                             *ws.pixel_cache_for(run))
    val_set = run.dataset.load(index, "val", model_run.input_size, False, *ws.pixel_cache_for(run))
    seed = run.seed_of(role)
    seed_everything(seed)
    runtime = Runtime.from_env(run.params.runtime.device) if runtime is None else runtime
    teacher = view_seeds = None
    if role == "distill":
        cache = run.params.teacher_cache
        setup = setup_distillation(
            run.objective(role), model_run.spec, model_run.preset, index.meta, train_set,
            Checkpoint.read(ws.teacher_checkpoint), seed=run.seed, num_views=run.num_views, runtime=runtime,
            cache=ws.teacher_cache if run.cache_used else None, teacher_batch_size=cache.batch_size,
            cache_key=run.teacher_cache_key(ws.teacher_checkpoint, ws.index_files, index),
            aligned=Checkpoint.read(ws.align_checkpoint) if ws.align_checkpoint.is_file() else None)
        model, objective, teacher, view_seeds, record = setup.student, setup.objective, setup.teacher, \
            setup.view_seeds, setup.record
    else:
        model, objective = model_run.spec.build(index.meta.num_classes, index.meta.channels), run.objective(role)
        record = ModelRecord.for_model(role, model_run.preset, model_run.spec, index.meta, seed, model)
    data = TrainData(train_set, val_set, BatchNormalizer(index.meta.mean, index.meta.std, model_run.recipe.channels_last),
                     view_seeds, build_mix(index.meta.num_classes, run.dataset.mixup, run.dataset.cutmix),
                     run.dataset.ap_mode, run.dataset.multilabel_convention)
    out_dir = ws.models / role if out_dir is None else out_dir
    if runtime.writes_outputs:
        shutil.rmtree(out_dir, ignore_errors=True)
    result = fit(model, objective, model_run.recipe, data, out_dir, record, seed, teacher, logger, runtime,
                 progress, resume=resume, **run.engine)
    # what training updates: the student and what the method owns (its extra parameters)
    return result, count_parameters(model) + sum(p.numel() for p in own_parameters(objective))


def main() -> None:
    args, ws = parse_stage_args(__doc__, ROLES), Workspace()
    role, reports = args.role, ws.reports / args.role

    def work(run: Run, out, runtime: Runtime, resume: ResumeStore | None) -> None:
        live = Live(str(out(reports)), dvcyaml=False, save_dvc_exp=False) if runtime.writes_outputs else None
        result, n_params = train_role(run, role, ws, logger=live, out_dir=out(ws.models / role), runtime=runtime,
                                      resume=resume)
        if live is not None:
            live.summary.update({**result.summary(), "params": n_params})
            live.end()
            write_json(out(reports / "timing.json"), result.timing())
        if runtime.is_main:
            print(result.describe(role))

    stage_main(role, args, ["train", role], (ws.models / role, reports / "plots", reports / "metrics.json",
               reports / "timing.json"), ws.root, work, manifests=(ws.models / role,))


if __name__ == "__main__":
    main()
