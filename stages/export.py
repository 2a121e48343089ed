"""export: the distilled student as deployable files in ``models/export/``: ``student_fp32.onnx``,
``student_int8.onnx`` (static QDQ, calibrated as the quantize stage's ``onnx_int8``) and
``model.json`` (sha256 and size of each file, classes, preprocessing, source checkpoint, test
scores of each file). Each ONNX file carries its classes and preprocessing in its metadata, so
``python -m kdlib.predict models/export/student_int8.onnx image.png`` needs nothing else
(:mod:`kdlib.export`, :mod:`kdlib.predict`)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from kdlib.checkpoint import Checkpoint, CheckpointError
from kdlib.data.preprocessing import Preprocessing
from kdlib.deployed import ModelInfo
from kdlib.export import ExportError, describe, export_classifier
from kdlib.quantize.measure import calibration_sample, materialize
from stages.guard import stage_outputs
from stages.params import Run, load_params
from stages.workspace import Workspace

ROLE = "distill"


def export_student(run: Run, ws: Workspace, out_dir: Path) -> dict:
    """``model.json`` of the distilled student's best checkpoint, exported into ``out_dir``."""
    index, path = ws.index(), ws.checkpoint(ROLE)
    checkpoint = Checkpoint.read(path)
    size = checkpoint.record.input_size
    test = run.dataset.load(index, "test", size, False, *ws.pixel_cache_for(run))
    train = run.dataset.load(index, "train", size, False, *ws.pixel_cache_for(run))
    info = ModelInfo(run.task, list(index.meta.classes), Preprocessing.for_evaluation(run.dataset, index.meta, size))
    return export_classifier(checkpoint, out_dir, info, materialize(test) if run.dataset.preload else test,
                             calibration_sample(train, run.seed, run.params.eval.calibration_images),
                             run.params.eval.threads, test.ignore, run.dataset.ap_mode,
                             path.relative_to(ws.root).as_posix(),
                             multilabel_convention=run.dataset.multilabel_convention)


def main() -> None:
    ws = Workspace()
    folder, start = ws.models / "export", time.perf_counter()
    with stage_outputs("export", folder, ws=ws) as out:
        run = load_params()
        try:
            card = export_student(run, ws, out(folder))
        except (CheckpointError, ExportError) as err:
            print(f"error: export: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    for line in describe(card, run.score):
        print(f"export {line}")
    print(f"export: {folder} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
