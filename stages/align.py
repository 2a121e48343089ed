"""align: feature alignment, seed 004's stage 1, for feature-mimicking methods.

Trains only the student's ``feat_fc`` projection with ``align.beta × (the method's feature
terms)`` against the teacher — no classification loss, backbone and its BatchNorm statistics
frozen — and hands ``models/align/last.pt`` to ``distill``. For a method without features, with
equal feature widths and no forced projection, or with ``align.epochs: 0``, it writes only
``models/align/align.json`` saying why: the stage stays in the graph, tracked like any other,
but costs one Python start, and nothing at all while its parameters are unchanged.
"""
from __future__ import annotations

import shutil
from typing import Any

from kdlib.data.index import DatasetIndex
from kdlib.runtime import Runtime, seed_everything
from kdlib.train import fit
from stages import distillation as D
from stages.common import Workspace, normalizer_for, prepared_index, write_json
from stages.params import load_params


def align(params: dict[str, Any], index: DatasetIndex, ws: Workspace = Workspace()) -> dict[str, Any]:
    """Align ``feat_fc`` into ``ws.align``; returns the summary written to ``align.json``."""
    method, epochs = D.method_name(params), params["align"]["epochs"]
    shutil.rmtree(ws.align, ignore_errors=True)
    reason = None
    if not getattr(D.method_class(params), "needs_features", False):
        reason = f"distill.method = {method!r} mimics no features: nothing to align"
    elif epochs == 0:
        reason = "align.epochs = 0"
    else:
        seed_everything(params["seed"])  # the same student initialization as distill's
        runtime = Runtime.from_env("auto")
        recipe = D.align_recipe(params)
        objective = D.build_method(params, index.meta.task, recipe, gamma=0.0, beta=params["align"]["beta"])
        model = D.build_student(params, index, objective)
        teacher, teacher_model = D.load_teacher(index, runtime, True, ws)
        model = D.with_feat_fc(params, index, objective, model, teacher_model, ws)
        if not model.projected:
            reason = f"student and teacher features have the same width and {method}.force_feat_fc is false"
    if reason is not None:
        summary = {"aligned": False, "reason": reason}
        write_json(ws.align / "align.json", summary)
        return summary
    model.freeze_backbone()
    train_set, val_set = D.train_sets(params, index)
    if getattr(objective, "needs_lsh", False):
        seeds = D.training_view_seeds(params, len(train_set))
        D.fit_lsh(objective, teacher_model, D.first_view_features(teacher, train_set, seeds, params, index, runtime),
                  params["seed"])
    result = fit(model, train_set, val_set, objective, recipe, normalizer_for(index, recipe.channels_last),
                 ws.align, D.checkpoint_meta(params, index, "align", model), params["seed"], teacher=teacher,
                 runtime=runtime, progress=False, select_best=False)
    final = {k.removeprefix("train/"): round(v, 6) for k, v in result.history[-1].items() if k.startswith("train/")}
    summary = {"aligned": True, "epochs": result.last_epoch, "final": final, "history": result.history,
               "train_seconds": result.train_seconds}
    write_json(ws.align / "align.json", {k: v for k, v in summary.items() if k != "train_seconds"})
    return summary


def main() -> None:
    params = load_params()
    ws = Workspace()
    summary = align(params, prepared_index(), ws)
    # wall-clock time varies run to run: kept apart from the cached, reproducible outputs
    write_json(ws.reports / "align" / "metrics.json", {k: summary[k] for k in ("aligned", "final") if k in summary})
    write_json(ws.reports / "align" / "timing.json", {"train_seconds": round(summary.get("train_seconds", 0.0), 2)})
    if summary["aligned"]:
        print(f"align: {summary['epochs']} epochs of feat_fc alignment; final {summary['final']}")
    else:
        print(f"align: skipped ({summary['reason']})")


if __name__ == "__main__":
    main()
