"""check: every parameter in ``params.yaml`` validated before any other stage runs.

The first stage of the graph, tracking the whole file, so any change re-checks it (one Python
start). Every other stage names only the keys it reads, so without this one an unknown preset
(``-S student=nosuch``) would reach DVC as "Parameters 'models.nosuch' are missing", and a bad value
in an unused section would pass until a later run used it. Writes ``reports/check.json``
(``{"valid": true}``, the same bytes for every valid file, so a passing check never invalidates
``prepare``). Two checks that need this machine or a model run here too, so they stop the run with
status 2 before any work like every other bad value: the run's processes (``runtime.nproc_per_node``
against the CPU cores or GPUs, SyncBatchNorm on a CPU), and what the models themselves refuse (each
built on torch's meta device and run once, no weights loaded): an input size, or an alignment with
no ``feat_fc`` to align.

It also warns, first thing, when dvc.lock names cached outputs that neither the workspace nor the
DVC cache holds (a fresh clone before ``dvc pull``): the first experiment there would otherwise
retrain upstream stages silently, or leave an experiment that ``dvc exp apply`` cannot check out."""
from __future__ import annotations

import sys

from kdlib.io import write_json
from stages.guard import missing_outputs, missing_outputs_advice, stage_outputs
from stages.launch import LaunchError, check_launch
from stages.params import load_params
from stages.workspace import Workspace


def main() -> None:
    ws = Workspace()
    with stage_outputs("check", ws.reports / "check.json", ws=ws) as out:
        run = load_params()  # exits 2 listing every problem
        problems = run.model_problems()
        try:  # process and device counts here, not when a training stage starts minutes later
            check_launch(run.params.runtime, connect=lambda host, port, timeout: True)
        except LaunchError as err:
            problems.append(str(err))
        if problems:
            print("error: invalid parameters in params.yaml:\n  " + "\n  ".join(problems), file=sys.stderr)
            raise SystemExit(2)
        if advice := missing_outputs_advice(missing_outputs(ws.root)):
            print(advice, file=sys.stderr)  # up front: the stages that lack them would retrain much later
        write_json(out(ws.reports / "check.json"), {"valid": True})
    print(f"check: params.yaml is valid (teacher {run.teacher.preset}, student {run.student.preset}, "
          f"data set {run.params.dataset}, method {run.method.name})")


if __name__ == "__main__":
    main()
