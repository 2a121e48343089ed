"""Wall time of the whole default `dvc repro` on this machine, stage by stage.

Copies the repository to a temporary directory and runs each stage with
`dvc repro --single-item` in pipeline order (DVC's own overhead included), then a no-op
`dvc repro`. Targets: whole pipeline <= 10 min on 2 cores (quantized evaluation included);
teacher test top-1 >= 97%; no-op repro < 2 s.

    python bench/pipeline.py [--quick]
"""
from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

import yaml
from common import bench_parser, copy_repo, default_params, git_env, print_table, shrink, write_result

REPO = Path(__file__).resolve().parents[1]
STAGES = tuple(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])  # dvc.yaml's order


def main() -> None:
    parser = bench_parser(__doc__)
    args = parser.parse_args()
    env = git_env()
    with tempfile.TemporaryDirectory() as tmp:
        work = copy_repo(Path(tmp) / "repo")
        if args.quick:
            (work / "params.yaml").write_text(yaml.safe_dump(shrink(default_params()), sort_keys=False))
        seconds = {}
        for stage in STAGES:
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
        assert "Running stage" not in noop.stdout, noop.stdout
        evaluation = json.loads((work / "reports/evaluate/metrics.json").read_text())
    total = sum(seconds.values())
    teacher_top1 = evaluation["teacher"]["best"]["top1"]
    print_table(["stage", "seconds"], [[s, seconds[s]] for s in STAGES] + [["total", total], ["no-op repro", noop_s]])
    print(f"teacher test top-1 {teacher_top1:.2f}; baseline {evaluation['baseline']['best']['top1']:.2f}; "
          f"KD {evaluation['distill']['best']['top1']:.2f} (gain {evaluation['kd_gain_top1']:+.2f})")
    met = total <= 600 and teacher_top1 >= 97.0 and noop_s < 2.0
    print(f"targets (total <= 600 s, teacher >= 97%, no-op < 2 s): {'met' if met else 'NOT met'}")
    write_result("pipeline", {"quick": args.quick, "stage_seconds": seconds, "total_seconds": total,
                              "noop_repro_seconds": noop_s, "teacher_top1": teacher_top1,
                              "evaluate": {k: v for k, v in evaluation.items()}, "target_met": met}, args.out)


if __name__ == "__main__":
    main()
