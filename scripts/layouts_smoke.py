"""Run the whole DVC pipeline once per data-set layout, on tiny generated copies of each.

For every layout: build a small data set in its real on-disk format (tests/layout_fixtures.py),
then, in a scratch copy of this repository, `dvc exp run -S dataset=<layout>
-S datasets.<layout>.root=<fixture> ...` with one-epoch presets, and print each command and
whether it succeeded. ``--dry-run`` builds the fixtures and checks each experiment's parameters
as the stages will (:func:`stages.params.resolve`) without running DVC.

    python scripts/layouts_smoke.py [LAYOUT ...] [--dry-run]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]

from common import copy_repo, git_env  # noqa: E402
from layout_fixtures import LAYOUTS_ALL, MULTILABEL, build_dataset  # noqa: E402
from kdlib.study.spec import apply_overrides, parse_overrides  # noqa: E402
from stages.params import ParamError, read_params, resolve  # noqa: E402


def smoke_sets(layout: str, overrides: dict) -> list[str]:
    """The ``-S`` values of ``layout``'s experiment: its fixture, 32 px, one-epoch CNN presets."""
    sets = [f"dataset={layout}", f"datasets.{layout}.root={overrides['root']}",
            f"datasets.{layout}.image_size=32",
            "teacher=cnn_small", "student=cnn_small", "models.cnn_small.epochs=1",
            "models.cnn_small.warmup_epochs=0", "models.cnn_small.batch_size=8",
            f"distill.method={'sigmoid_kd' if layout in MULTILABEL else 'kd'}"]
    return sets + [f"datasets.{layout}.options.{k}={v}" for k, v in overrides.get("options", {}).items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("layouts", nargs="*", metavar="LAYOUT", help=f"default: all of {', '.join(LAYOUTS_ALL)}")
    ap.add_argument("--dry-run", action="store_true", help="check each experiment's parameters; run no DVC")
    args = ap.parse_args()
    layouts = args.layouts or LAYOUTS_ALL
    unknown = [name for name in layouts if name not in LAYOUTS_ALL]
    if unknown:
        ap.error(f"no fixture for {', '.join(unknown)}; known: {', '.join(LAYOUTS_ALL)}")
    env = git_env()
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = REPO if args.dry_run else copy_repo(Path(tmp) / "repo")
        for layout in layouts:
            sets = smoke_sets(layout, build_dataset(layout, Path(tmp) / "data" / layout))
            set_args = [x for item in sets for x in ("-S", item)]
            cmd = ["dvc", "exp", "run", "--temp", "-n", f"smoke-{layout}".replace("_", "-"), *set_args]
            if args.dry_run:  # params.yaml of this repository, read only
                params = apply_overrides(read_params(work / "params.yaml"), parse_overrides(sets), layout,
                                         add_keys=True)
                try:
                    resolve(params)
                    print(f"ok       $ {' '.join(cmd)}")
                except ParamError as err:
                    failures += 1
                    print(f"INVALID  $ {' '.join(cmd)}\n  {err}")
                continue
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            print("$ " + " ".join(cmd), flush=True)
            if proc.returncode:
                failures += 1
                print(f"  FAILED ({proc.returncode})\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
                continue
            print(f"  ok in {seconds:.0f} s", flush=True)
    print(f"{len(layouts) - failures} passed, {failures} failed")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
