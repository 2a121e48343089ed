"""prepare: data set → ImageFolder-style files + index.csv + dataset.json + manifest.

Built in ``data/.prepared.<pid>.partial`` and renamed into place when complete
(:func:`kdlib.data.prepare.prepare_dataset`), so a failure leaves nothing for DVC to cache.
"""
from __future__ import annotations

from kdlib.data import build_manifest
from kdlib.data.index import DatasetIndex
from kdlib.data.prepare import prepare_dataset
from kdlib.io import write_json
from stages.guard import stage_outputs
from stages.params import Run, load_params
from stages.workspace import Workspace


def prepare(run: Run, ws: Workspace = Workspace()) -> DatasetIndex:
    """The run's data set, prepared into ``ws.prepared``."""
    return prepare_dataset(run.dataset, run.params.dataset, ws.prepared, run.params.data.split_seed, ws.downloads)


def main() -> None:
    ws = Workspace()
    path = ws.reports / "prepare" / "manifest.json"
    with stage_outputs("prepare", path, ws=ws) as out:  # data/prepared is staged by prepare_dataset
        run = load_params()
        manifest = build_manifest(index := prepare(run, ws))
        write_json(out(path), manifest)
    counts = ", ".join(f"{s} {v['count']}" for s, v in manifest["splits"].items())
    print(f"prepared {run.params.dataset}: {index.meta.num_classes} classes; {counts}")


if __name__ == "__main__":
    main()
