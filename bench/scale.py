"""Multi-process training and resume, measured on the real stages (tiny MNIST, CPU, gloo).

1. One process of batch 16 against two of batch 8 (the same global batch), for a model without
   batch statistics (a 1-block DeiT, no dropout) and one with BatchNorm (cnn_small): the largest
   difference of each logged curve and of the final weights. Without batch statistics the two
   runs agree to float32 rounding; with BatchNorm each process normalizes with the statistics of
   its own 8 images, so they differ by design (SyncBatchNorm, CUDA only, would remove that).
2. Kill and resume: the teacher stage SIGKILLed after its second epoch (the stage and its
   torchrun workers), run again, against an uninterrupted run: md5 of best.pt, last.pt,
   manifest.json and metrics.json, with one process and with two (there a worker is killed and
   torchrun's --max-restarts restarts the group).

    python bench/scale.py [--quick]
"""
from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import REPO, bench_parser, print_table, write_result

sys.path.insert(0, str(REPO / "tests"))  # the tests' tiny repository: one definition of it
from train_repo import (copy_repository, kill_group, md5, prepared_repository, run_stage, set_params,  # noqa: E402
                        start_stage, tsv, worker_pids)

OUTPUTS = ("models/teacher/best.pt", "models/teacher/last.pt", "models/teacher/manifest.json",
           "reports/teacher/metrics.json")
CURVES = ("train/loss", "val/loss", "val/top1")


def teacher(preset: str, processes: int, batch: int, epochs: int, **runtime: object):
    def change(params: dict) -> None:
        params["teacher"] = preset
        params["models"][preset].update(batch_size=batch, epochs=epochs)
        params["runtime"].update(nproc_per_node=processes, max_restarts=1 if processes > 1 else 0, **runtime)
    return change


def curves(repo: Path) -> dict[str, list[float]]:
    plots = repo / "reports" / "teacher" / "plots" / "metrics"
    return {name: [float(row[1]) for row in tsv(plots / f"{name}.tsv")[1:]] for name in CURVES}


def last_weights(repo: Path) -> dict[str, torch.Tensor]:
    return torch.load(repo / "models" / "teacher" / "last.pt", weights_only=True)["state_dict"]


def one_against_two(base: Path, preset: str, epochs: int) -> dict:
    runs = {}
    for processes, batch in ((1, 16), (2, 8)):
        set_params(base, teacher(preset, processes, batch, epochs))
        start = time.perf_counter()
        run_stage(base, "stages.train", "teacher", timeout=1800)
        runs[processes] = (curves(base), last_weights(base), time.perf_counter() - start)
    (one, w1, s1), (two, w2, s2) = runs[1], runs[2]
    row = {name: max(abs(a - b) for a, b in zip(one[name], two[name])) for name in CURVES}
    row["weights"] = max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1 if w1[k].is_floating_point())
    return {"preset": preset, "max_abs_difference": row, "seconds": {"1": round(s1, 1), "2": round(s2, 1)},
            "final": {"1": {k: v[-1] for k, v in one.items()}, "2": {k: v[-1] for k, v in two.items()}}}


def kill_and_resume(base: Path, work: Path, processes: int, epochs: int) -> dict:
    change = teacher("cnn_small", processes, 16 // processes, epochs)
    reference, killed = copy_repository(base, work / f"ref{processes}"), copy_repository(base, work / f"kill{processes}")
    for repo in (reference, killed):
        set_params(repo, change)
    run_stage(reference, "stages.train", "teacher", timeout=1800)
    proc = start_stage(killed, "stages.train", "teacher")
    while not list((killed / ".kdlib-resume").glob("teacher/*/epoch-0002/COMPLETE")):
        if proc.poll() is not None:
            raise SystemExit(f"the stage ended before its second epoch: {proc.communicate()}")
        time.sleep(0.05)
    if processes == 1:
        kill_group(proc)
        out = run_stage(killed, "stages.train", "teacher", timeout=1800)
        said = [line for line in out.stderr.splitlines() if "resuming" in line]
    else:
        os.kill(worker_pids(killed)[-1], signal.SIGKILL)  # torchrun restarts the group
        out_text, err = proc.communicate(timeout=1800)
        if proc.returncode:
            raise SystemExit(f"torchrun did not recover: {err[-3000:]}")
        said = [line for line in err.splitlines() if "resuming" in line]
    rows = {name: {"uninterrupted": md5(reference / name), "killed_and_resumed": md5(killed / name)}
            for name in OUTPUTS}
    return {"processes": processes, "said": said, "md5": rows,
            "identical": all(r["uninterrupted"] == r["killed_and_resumed"] for r in rows.values())}


def main() -> None:
    parser = bench_parser(__doc__)
    args = parser.parse_args()
    epochs = 2 if args.quick else 4
    with tempfile.TemporaryDirectory() as tmp:
        base = prepared_repository(Path(tmp) / "repo")
        presets = ("deit",) if args.quick else ("deit", "cnn_small")
        comparisons = [one_against_two(base, preset, epochs) for preset in presets]
        resumes = [kill_and_resume(base, Path(tmp), n, max(epochs, 3)) for n in ((1,) if args.quick else (1, 2))]

    print("\n1 process x batch 16 against 2 processes x batch 8: largest difference over the epochs")
    print_table(["student", *CURVES, "final weights", "seconds 1 / 2 proc"],
                [[c["preset"], *(f"{c['max_abs_difference'][k]:.2e}" for k in (*CURVES, "weights")),
                  f"{c['seconds']['1']} / {c['seconds']['2']}"] for c in comparisons])
    print("\nteacher stage killed after epoch 2, run again, against an uninterrupted run")
    print_table(["processes", "file", "uninterrupted md5", "killed + resumed md5", "same"],
                [[r["processes"], name, v["uninterrupted"], v["killed_and_resumed"],
                  v["uninterrupted"] == v["killed_and_resumed"]] for r in resumes for name, v in r["md5"].items()])
    for r in resumes:
        print(f"{r['processes']} process(es): {' | '.join(r['said'])}")
    write_result("scale", {"quick": args.quick, "epochs": epochs, "one_against_two": comparisons,
                           "kill_and_resume": resumes,
                           "resume_identical": all(r["identical"] for r in resumes)}, args.out)


if __name__ == "__main__":
    main()
