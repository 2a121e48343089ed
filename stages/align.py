"""align: feature alignment, LSHFM's (Wang et al., TPAMI 2021) stage 1, for feature-mimicking methods.

Trains only the student's ``feat_fc`` projection with ``align.beta × (the method's feature
terms)`` against the teacher — no classification loss, backbone and its BatchNorm statistics
frozen — and hands ``models/align/last.pt`` to ``distill``. For a method without features, with
equal feature widths and no forced projection, or with ``align.epochs: 0``, it writes only
``models/align/align.json`` saying why: the stage stays in the graph, tracked like any other,
but costs one Python start, and nothing at all while its parameters are unchanged.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from kdlib.checkpoint import Checkpoint
from kdlib.data.transforms import BatchNormalizer
from kdlib.distill import is_projected, setup_distillation
from kdlib.io import write_json
from kdlib.runtime import Runtime, seed_everything
from kdlib.train import TrainData, fit
from stages.guard import stage_outputs
from stages.params import Run, load_params
from stages.workspace import Workspace


def align(run: Run, ws: Workspace = Workspace(), out_dir: Path | None = None) -> dict[str, Any]:
    """Align ``feat_fc`` into ``out_dir`` (default ``ws.align``); returns the summary written to
    ``align.json``."""
    settings, method, out_dir = run.params.align, run.method.name, ws.align if out_dir is None else out_dir
    shutil.rmtree(out_dir, ignore_errors=True)
    reason = None
    if not run.method.cls.needs_features:
        reason = f"distill.method = {method!r} mimics no features: nothing to align"
    elif settings.epochs == 0:
        reason = "align.epochs = 0"
    else:
        index, student = ws.index(), run.student
        train_set = run.dataset.load(index, "train", student.input_size, True)
        val_set = run.dataset.load(index, "val", student.input_size, False)
        seed_everything(run.seed)  # the same student initialization as distill's
        runtime, recipe = Runtime.from_env("auto"), settings.recipe(student.recipe)
        setup = setup_distillation(
            run.objective("distill", **run.method.cls.alignment_knobs(settings.beta)), student.spec, student.preset, index.meta,
            train_set, Checkpoint.read(ws.teacher_checkpoint), seed=run.seed, num_views=run.num_views,
            runtime=runtime, teacher_batch_size=run.params.teacher_cache.batch_size, role="align")
        if not is_projected(setup.student):
            reason = f"student and teacher features have the same width and {method}.force_feat_fc is false"
    if reason is not None:
        summary = {"aligned": False, "reason": reason}
        write_json(out_dir / "align.json", summary)
        return summary
    setup.student.freeze_backbone()
    data = TrainData(train_set, val_set, BatchNormalizer(index.meta.mean, index.meta.std, recipe.channels_last))
    result = fit(setup.student, setup.objective, recipe, data, out_dir, setup.record, run.seed, setup.teacher,
                 runtime=runtime, progress=False, select_best=False)
    final = {k.removeprefix("train/"): round(v, 6) for k, v in result.history[-1].items() if k.startswith("train/")}
    summary = {"aligned": True, "epochs": result.last_epoch, "final": final, "history": result.history,
               "train_seconds": result.train_seconds}
    write_json(out_dir / "align.json", {k: v for k, v in summary.items() if k != "train_seconds"})
    return summary


def main() -> None:
    ws = Workspace()
    metrics, timing = ws.reports / "align" / "metrics.json", ws.reports / "align" / "timing.json"
    with stage_outputs("align", ws.align, metrics, timing, ws=ws, manifests=(ws.align,)) as out:
        run = load_params()
        summary = align(run, ws, out(ws.align))
        write_json(out(metrics), {k: summary[k] for k in ("aligned", "final") if k in summary})
        # wall-clock time varies run to run: kept apart from the cached, reproducible outputs
        write_json(out(timing), {"train_seconds": round(summary.get("train_seconds", 0.0), 2)})
    if summary["aligned"]:
        print(f"align: {summary['epochs']} epochs of feat_fc alignment; final {summary['final']}")
    else:
        print(f"align: skipped ({summary['reason']})")


if __name__ == "__main__":
    main()
