"""evaluate ROLE: test-set metrics of the best and last checkpoint of one trained model.

The test split is read here and nowhere earlier, so it never picks a checkpoint. Writes
``reports/evaluate/<role>.json`` (metrics), ``confusion/<role>.json`` (pairs for DVC's confusion
template) and ``matrix/<role>.json``. A student's row also holds its fidelity to the teacher on the
test split: top-1 agreement and mean KL(teacher ‖ student) (Stanton et al., NeurIPS 2021). A
student distilled without some classes (``distill.transfer``) also gets its errors on them, before and
after the bias correction (:mod:`kdlib.transfer`). ``dvc.yaml`` runs it once per role (``foreach``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlib.checkpoint import Checkpoint
from kdlib.data.index import DatasetIndex
from kdlib.io import write_json
from kdlib.metrics import EvalResult, confusion_outputs, evaluate_dataset, fidelity, multilabel_fidelity
from kdlib.models import count_parameters
from kdlib.runtime import Runtime, seed_everything
from kdlib.transfer import transfer_errors, transfer_index
from stages.guard import stage_outputs
from stages.params import ROLES, Run, load_params
from stages.workspace import Workspace


def evaluate_checkpoint(run: Run, index: DatasetIndex, checkpoint: Checkpoint, model: nn.Module | None = None,
                        ws: Workspace = Workspace(), split: str = "test") -> EvalResult:
    """``split``'s result of one checkpoint (``model``: the one it holds, when already built), at
    its own input size and statistics."""
    test_set = run.dataset.load(index, split, checkpoint.record.input_size, False, *ws.pixel_cache_for(run))
    return evaluate_dataset(model or checkpoint.model(), test_set, checkpoint.record.mean, checkpoint.record.std,
                            run.params.eval.batch_size, Runtime.from_env(run.params.runtime.device).device,
                            run.dataset.ap_mode, run.dataset.multilabel_convention)


def evaluate_role(run: Run, ws: Workspace, role: str, confusion_json: Path, matrix_json: Path) -> dict[str, Any]:
    """The metrics row of ``role``'s best and last checkpoints, each student's with its fidelity to
    the teacher (``teacher_agreement`` %, ``teacher_kl`` nats); writes the best one's confusion
    pairs and matrix."""
    index, row = ws.index(), {}
    teacher = None if role == "teacher" else evaluate_checkpoint(run, index, Checkpoint.read(ws.teacher_checkpoint),
                                                                 ws=ws)
    absent = transfer_index(index, run.params.transfer)[1] if role == "distill" else []
    if absent:
        row["transfer_absent_classes"] = [index.meta.classes[c] for c in absent]
    for which in ("best", "last"):
        checkpoint = Checkpoint.read(ws.checkpoint(role, which))
        model = checkpoint.model()
        result = evaluate_checkpoint(run, index, checkpoint, model, ws)
        row[which] = {**{k: round(v, 4) for k, v in result.metrics.items()}, "loss": round(result.loss, 6),
                      "epoch": checkpoint.epoch}
        if teacher is not None:
            if not torch.equal(teacher.targets, result.targets):
                raise RuntimeError("the teacher and the student were evaluated on test images in different orders")
            agree = (multilabel_fidelity if run.task == "multilabel" else fidelity)(teacher.logits, result.logits)
            row[which].update(teacher_agreement=round(agree["agreement"], 4), teacher_kl=round(agree["kl"], 6))
        if absent:
            row[which]["transfer"] = transfer_errors(result.logits, result.targets, absent, run.params.transfer.bias_shift,
                                                      lambda: evaluate_checkpoint(run, index, checkpoint, model, ws, "val"))
        if which == "best":
            row.update(preset=checkpoint.record.preset, arch=checkpoint.record.arch, params=count_parameters(model),
                       checkpoint_bytes=checkpoint.path.stat().st_size)
            pairs, matrix = confusion_outputs(result, checkpoint.record.classes, run.task == "multilabel")
            write_json(confusion_json, pairs)
            write_json(matrix_json, {"classes": index.meta.classes, "matrix": matrix})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=ROLES)
    role, ws = parser.parse_args().role, Workspace()
    reports = ws.reports / "evaluate"
    outputs = reports / f"{role}.json", reports / "confusion" / f"{role}.json", reports / "matrix" / f"{role}.json"
    with stage_outputs(f"evaluate-{role}", *outputs, ws=ws) as out:
        run = load_params()
        seed_everything(run.seed_of(role))
        row = evaluate_role(run, ws, role, *(out(path) for path in outputs[1:]))
        write_json(out(outputs[0]), row)
    print(f"{role:9s} best {run.score} {row['best'][run.score]:.2f}  last {run.score} {row['last'][run.score]:.2f}")


if __name__ == "__main__":
    main()
