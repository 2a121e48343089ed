"""align: a method's first stage. Feature alignment, LSHFM's (Wang et al., TPAMI 2021) stage 1, for
feature-mimicking methods: only the student's ``feat_fc`` trains, with ``align.beta × (the method's feature
terms)`` — no classification loss, backbone and its BatchNorm statistics frozen. FitNets' hint stage
(Romero et al., ICLR 2015; ``distill.fitnet.hint_stage: true``): the student up to its guided layer and the
regressor train on ``align.beta × hint`` alone. Either hands ``models/align/last.pt`` to ``distill``. When
there is nothing to align (a method with no first stage, equal widths without a forced projection,
``align.epochs: 0``) it writes only ``models/align/align.json`` saying why, in one Python start."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from kdlib.checkpoint import Checkpoint
from kdlib.data.transforms import BatchNormalizer
from kdlib.distill import is_projected, setup_distillation
from kdlib.io import write_json
from kdlib.resume import ResumeStore
from kdlib.runtime import Runtime, seed_everything
from kdlib.train import TrainData, fit
from stages.launch import parse_stage_args, stage_main
from stages.params import Run
from stages.workspace import Workspace


def align(run: Run, ws: Workspace = Workspace(), out_dir: Path | None = None, runtime: Runtime | None = None,
          resume: ResumeStore | None = None) -> dict[str, Any]:
    """Align ``feat_fc`` into ``out_dir`` (default ``ws.align``); returns the summary written to
    ``align.json``."""
    settings, method, out_dir = run.params.align, run.method.name, ws.align if out_dir is None else out_dir
    runtime = Runtime.from_env(run.params.runtime.device) if runtime is None else runtime
    if runtime.writes_outputs:
        shutil.rmtree(out_dir, ignore_errors=True)
    reason = run.align_skip_reason
    if reason is None:
        index, student = ws.index(), run.student
        train_set = run.train_dataset("distill").load(run.training_index(index, "distill"), "train",
                                                      student.input_size, True, *ws.pixel_cache_for(run))
        val_set = run.dataset.load(index, "val", student.input_size, False, *ws.pixel_cache_for(run))
        seed_everything(run.seed)  # the same student initialization as distill's
        recipe = settings.recipe(student.recipe)
        setup = setup_distillation(
            run.objective("distill", **run.method.cls.alignment_knobs(settings.beta, run.method.knobs)), student.spec,
            student.preset, index.meta, train_set, Checkpoint.read(ws.teacher_checkpoint), seed=run.seed,
            num_views=run.num_views, runtime=runtime, teacher_batch_size=run.params.teacher_cache.batch_size,
            role="align")
        hint_stage = not setup.objective.needs_features  # FitNets' stage 1: the student up to its hint trains
        if not hint_stage and not is_projected(setup.student):
            reason = f"student and teacher features have the same width and {method}.force_feat_fc is false"
    if reason is not None:
        summary = {"aligned": False, "reason": reason}
        if runtime.writes_outputs:
            write_json(out_dir / "align.json", summary)
        return summary
    if not hint_stage:
        setup.student.freeze_backbone()
    data = TrainData(train_set, val_set, BatchNormalizer(index.meta.mean, index.meta.std, recipe.channels_last))
    result = fit(setup.student, setup.objective, recipe, data, out_dir, setup.record, run.seed, setup.teacher,
                 runtime=runtime, progress=False, select_best=False, resume=resume, **run.engine)
    final = {k.removeprefix("train/"): round(v, 6) for k, v in result.history[-1].items() if k.startswith("train/")}
    summary = {"aligned": True, "epochs": result.last_epoch, "final": final, "history": result.history,
               "train_seconds": result.train_seconds}
    if runtime.writes_outputs:
        write_json(out_dir / "align.json", {k: v for k, v in summary.items() if k != "train_seconds"})
    return summary


def main() -> None:
    args, ws = parse_stage_args(__doc__), Workspace()
    metrics, timing = ws.reports / "align" / "metrics.json", ws.reports / "align" / "timing.json"

    def work(run: Run, out, runtime: Runtime, resume: ResumeStore | None) -> None:
        summary = align(run, ws, out(ws.align), runtime, resume)
        if runtime.writes_outputs:
            write_json(out(metrics), {k: summary[k] for k in ("aligned", "final") if k in summary})
            # wall-clock time varies run to run: kept apart from the cached, reproducible outputs
            write_json(out(timing), {"train_seconds": round(summary.get("train_seconds", 0.0), 2)})
        if runtime.is_main:
            print(f"align: {summary['epochs']} epochs of feat_fc alignment; final {summary['final']}"
                  if summary["aligned"] else f"align: skipped ({summary['reason']})")

    stage_main("align", args, ["align"], (ws.align, metrics, timing), ws.root, work, manifests=(ws.align,),
               prepare=lambda run: run.single_process() if run.align_skip_reason else run)


if __name__ == "__main__":
    main()
