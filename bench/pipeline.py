"""Wall time of the whole default `dvc repro` on this machine, stage by stage, then of a method
experiment on top of it.

Copies the repository to a temporary directory and runs each stage with
`dvc repro --single-item` in pipeline order (DVC's own overhead included; `evaluate` and
`quantize` are one stage per model, `evaluate@teacher`, `evaluate@baseline`, ..., each timed,
and summed per group), then a no-op `dvc repro`. Then it commits the results in the copy and
times `dvc exp run -S distill.method=lshl2` (`--method`): only what depends on the method runs
again (teacher_cache, align, distill, evaluate@distill, quantize@distill, report), the teacher's
and the baseline's stages are skipped; its per-stage times come from DVC's own output, read as
it is written. Targets: the default pipeline <= 300 s on 2 cores, quantized evaluation included;
the method experiment <= half of what it costs when evaluate and quantize are one stage over all
models (that graph re-ran the unchanged teacher's and baseline's evaluate and quantize too: their
seconds from the default run are added to the experiment's to give it); teacher test top-1 >= 97%;
no-op repro < 2 s.

    python bench/pipeline.py [--quick] [--method lshl2] [--keep DIR]

``--quick`` runs the parameters of the test suite's reproduced pipeline (``common.shrink(params, 4, 1)``);
``--keep DIR`` leaves a copy of the default run's repository at DIR (the tests compare it, output by
output, with their own from-scratch ``dvc repro`` of the same parameters).
"""
from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from common import (bench_parser, copy_repo, copy_workspace, default_params, dvc_stages, git_env, print_table,
                    shrink, stage_group, write_result)

from stages.params import ROLES

GROUPS = ("evaluate", "quantize")  # foreach stages: one per role, their seconds also summed
RUNNING = re.compile(r"Running stage '([^']+)'")
SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")
# what DVC prints once a stage's command has finished and its outputs are saved
DONE = re.compile(r"Updating lock file|Running stage '|Stage '[^']+' didn't change|Ran experiment")


def group_sums(seconds: dict[str, float]) -> dict[str, float]:
    return {g: sum(s for stage, s in seconds.items() if stage_group(stage) == g) for g in GROUPS}


def timed_dvc(work: Path, args: list[str], env: dict[str, str]) -> tuple[float, dict[str, float], list[str], str]:
    """Run ``dvc ARGS`` in ``work``, reading its output as it comes: (wall seconds, {stage: seconds}
    of each stage it ran, from its ``Running stage`` line to DVC's next line saying it is done,
    [stages it skipped], the output)."""
    start = time.perf_counter()
    proc = subprocess.Popen(["dvc", *args], cwd=work, env={**env, "PYTHONUNBUFFERED": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    lines = [(time.perf_counter(), line) for line in proc.stdout]
    proc.wait()
    end = time.perf_counter()
    output = "".join(line for _, line in lines)
    if proc.returncode:
        raise SystemExit(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{output[-5000:]}")
    seconds: dict[str, float] = {}
    skipped: list[str] = []
    for i, (t, line) in enumerate(lines):
        if match := SKIPPED.search(line):
            skipped.append(match.group(1))
        elif match := RUNNING.search(line):
            done = next((u for u, later in lines[i + 1:] if DONE.search(later)), end)
            seconds[match.group(1)] = done - t
    return end - start, seconds, skipped, output


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--method", default="lshl2",
                        help="distill.method of the experiment on top of the default run (default: lshl2)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="copy the default run's repository (git, DVC cache, outputs) to DIR, which must not exist")
    args = parser.parse_args()
    if args.keep is not None and args.keep.exists():
        parser.error(f"--keep {args.keep} exists: give a path to create")
    env = git_env()
    params = default_params()
    if args.method == params["distill"]["method"]:
        parser.error(f"--method {args.method} is the default run's method: the experiment would change nothing")
    exp_set = f"distill.method={args.method}"
    with tempfile.TemporaryDirectory() as tmp:
        work = copy_repo(Path(tmp) / "repo")
        if args.quick:
            (work / "params.yaml").write_text(yaml.safe_dump(shrink(params, per_class=4, epochs=1), sort_keys=False))
        stages = dvc_stages(work)
        seconds = {}
        for stage in stages:
            start = time.perf_counter()
            proc = subprocess.run(["dvc", "repro", "--single-item", stage], cwd=work, env=env,
                                  capture_output=True, text=True)
            seconds[stage] = time.perf_counter() - start
            if proc.returncode:
                raise SystemExit(f"dvc repro -s {stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            print(f"{stage}: {seconds[stage]:.1f} s", flush=True)
        start = time.perf_counter()
        noop = subprocess.run(["dvc", "repro"], cwd=work, env=env, capture_output=True, text=True)
        noop_s = time.perf_counter() - start
        if noop.returncode or "Running stage" in noop.stdout:
            raise SystemExit(f"the second `dvc repro` was not a no-op:\n{noop.stdout[-3000:]}\n{noop.stderr[-3000:]}")
        print(f"no-op repro: {noop_s:.1f} s", flush=True)
        evaluation = {role: json.loads((work / "reports" / "evaluate" / f"{role}.json").read_text()) for role in ROLES}
        summary = json.loads((work / "reports" / "summary.json").read_text())
        if args.keep is not None:
            copy_workspace(work, args.keep)

        # a method experiment on top of the committed default run: only the method's stages run again
        for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "bench: default run"]):
            subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
        exp_s, exp_seconds, exp_skipped, _ = timed_dvc(work, ["exp", "run", "-S", exp_set], env)
        for stage in stages:
            shown = f"{exp_seconds[stage]:.1f} s" if stage in exp_seconds else "skipped"
            print(f"exp {exp_set}: {stage}: {shown}", flush=True)
        exp_summary = json.loads((work / "reports" / "summary.json").read_text())

    score = "top1" if "kd_gain_top1" in summary else "mAP"
    total, sums, exp_sums = sum(seconds.values()), group_sums(seconds), group_sums(exp_seconds)
    teacher_top1 = evaluation["teacher"]["best"][score]

    def exp_cell(stage: str) -> Any:
        return exp_seconds[stage] if stage in exp_seconds else "skipped"

    print_table(["stage", "default repro (s)", f"exp run -S {exp_set} (s)"],
                [[s, seconds[s], exp_cell(s)] for s in stages]
                + [[f"{g} (sum of {sum(stage_group(s) == g for s in stages)})", sums[g], exp_sums[g]] for g in GROUPS]
                + [["total", total, exp_s], ["no-op repro", noop_s, ""]])
    print(f"teacher test {score} {teacher_top1:.2f}; baseline {evaluation['baseline']['best'][score]:.2f}; "
          f"KD {evaluation['distill']['best'][score]:.2f} (gain {summary[f'kd_gain_{score}']:+.2f}); "
          f"{args.method} student {exp_summary['distill']['best']:.2f} (gain {exp_summary[f'kd_gain_{score}']:+.2f})")
    print(f"exp run -S {exp_set}: {exp_s:.1f} s, ran {', '.join(exp_seconds) or 'nothing'}; "
          f"skipped {', '.join(exp_skipped) or 'nothing'}")
    # what the experiment would cost if evaluate/quantize re-measured every model, as one stage did
    one_stage = exp_s + sum(seconds[f"{g}@{r}"] for g in GROUPS for r in ROLES
                            if f"{g}@{r}" in seconds and f"{g}@{r}" not in exp_seconds)
    print(f"method experiment {exp_s:.1f} s vs {one_stage:.1f} s with one evaluate/quantize stage over all models "
          f"({exp_s / one_stage:.2f}x)")
    targets = {"total <= 300 s": total <= 300, "method experiment <= half": exp_s <= one_stage / 2,
               "teacher >= 97%": teacher_top1 >= 97.0, "no-op < 2 s": noop_s < 2.0}
    met = all(targets.values())
    print("targets: " + ", ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in targets.items()))
    write_result("pipeline", {
        "quick": args.quick, "stages": stages, "stage_seconds": seconds, "group_seconds": sums,
        "total_seconds": total, "noop_repro_seconds": noop_s, "teacher_top1": teacher_top1,
        # the old metrics.json shape, {role: {best, last, ...}, kd_gain_<score>}, which readers of this file expect
        "evaluate": {**evaluation, f"kd_gain_{score}": summary[f"kd_gain_{score}"]}, "summary": summary,
        "method_experiment": {"set": [exp_set], "stages_run": list(exp_seconds), "stages_skipped": exp_skipped,
                              "group_seconds": exp_sums, "summary": exp_summary},
        "method_experiment_seconds": exp_s, "method_experiment_stage_seconds": exp_seconds,
        "method_experiment_one_stage_seconds": one_stage, "targets": targets, "target_met": met}, args.out)


if __name__ == "__main__":
    main()
