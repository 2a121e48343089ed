"""quantize ROLE: one trained model in every precision of ``eval.precisions`` — test accuracy and
its change from fp32, batch-1 latency (median/p95), throughput, peak memory, size on disk, MACs.
A precision losing more than ``ACCURACY_LOSS_MARGIN_PT`` against fp32, and a latency timed on a busy
machine, are flagged in the rows and printed with a ``⚠`` (:mod:`kdlib.quantize.measure`).

Each precision runs in a fresh process (:func:`kdlib.quantize.measure.run_isolated`), so the peak
RSS is that evaluation's own; calibration uses a sample of the training split seeded by the model's seed
(``teacher_seed`` for the teacher, so a sweep over student seeds measures one teacher once). Writes
``reports/quantize/<role>.json``; ``dvc.yaml`` runs it once per role (``foreach``) and the
``report`` stage gathers the rows into ``reports/quantization.{json,csv}`` and the figures.
"""
from __future__ import annotations

import argparse

import torch

from kdlib.checkpoint import Checkpoint
from kdlib.io import write_json
from kdlib.quantize.measure import add_deltas, calibration_sample, materialize, measure_precisions
from stages.guard import stage_outputs
from stages.params import ROLES, Run, load_params
from stages.workspace import Workspace


def quantize_role(run: Run, ws: Workspace, role: str) -> list[dict]:
    """Every precision's row for ``role``'s best checkpoint, with its deltas from fp32."""
    settings, index, path = run.params.eval, ws.index(), ws.checkpoint(role)
    size = Checkpoint.read(path).record.input_size
    test = run.dataset.load(index, "test", size, False, *ws.pixel_cache_for(run))
    train = run.dataset.load(index, "train", size, False, *ws.pixel_cache_for(run))
    test_set = materialize(test) if run.dataset.preload else test  # decoded once, shared by every job

    def show(row: dict) -> None:
        shown = (f"{row[run.score]:.2f}  b1 {row['latency_b1_median_ms']:.3f} ms" if row["status"] == "ok"
                 else f"{row['status']}: {row.get('reason')}")
        if row.get("latency_b1_noisy"):
            shown += (f"  ⚠ noisy: p90/median {row['latency_b1_spread']:.1f}× in each of "
                      f"{row['latency_b1_attempts']} timings (a busy machine)")
        print(f"{role:9s} {row['precision']:13s} {shown}", flush=True)

    calibration = calibration_sample(train, run.seed_of(role), settings.calibration_images)
    rows = measure_precisions(role, path, test_set, calibration, settings,
                              "cuda" if torch.cuda.is_available() else "cpu", test.ignore, run.dataset.ap_mode, show,
                              multilabel_convention=run.dataset.multilabel_convention)
    rows = add_deltas(rows, run.score)
    for row in rows:
        if row.get("accuracy_loss_flagged"):
            print(f"{role:9s} {row['precision']:13s} ⚠ {row[f'delta_{run.score}']:+.2f} pt {run.score} against fp32, "
                  f"more than the {row['accuracy_loss_margin_pt']:g} pt margin: {row['accuracy_loss_cause']}",
                  flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=ROLES)
    role, ws = parser.parse_args().role, Workspace()
    result = ws.reports / "quantize" / f"{role}.json"
    with stage_outputs(f"quantize-{role}", result, ws=ws) as out:
        write_json(out(result), quantize_role(load_params(), ws, role))


if __name__ == "__main__":
    main()
