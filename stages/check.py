"""check: every parameter in ``params.yaml`` validated before any other stage runs.

The first stage of the graph, tracking the whole file, so any change re-checks it (one Python
start). Every other stage names only the keys it reads, so without this one an unknown preset
(``-S student=nosuch``) would reach DVC as "Parameters 'models.nosuch' are missing", and a bad value
in an unused section would pass until a later run used it. Writes ``reports/check.json``
(``{"valid": true}``, the same bytes for every valid file, so a passing check never invalidates
``prepare``)."""
from __future__ import annotations

from kdlib.io import write_json
from stages.guard import stage_outputs
from stages.params import load_params
from stages.workspace import Workspace


def main() -> None:
    ws = Workspace()
    with stage_outputs("check", ws.reports / "check.json", ws=ws) as out:
        run = load_params()  # exits 2 listing every problem
        write_json(out(ws.reports / "check.json"), {"valid": True})
    print(f"check: params.yaml is valid (teacher {run.teacher.preset}, student {run.student.preset}, "
          f"data set {run.params.dataset}, method {run.method.name})")


if __name__ == "__main__":
    main()
