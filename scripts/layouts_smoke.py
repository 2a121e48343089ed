"""Run the whole DVC pipeline once per data-set layout, on tiny generated copies of each.

For every layout: build a small data set in its real on-disk format (tests/layout_fixtures.py),
then, in a scratch copy of this repository, `dvc exp run -S dataset=<layout>
-S datasets.<layout>.root=<fixture> ...` with one-epoch presets, and print each command and
whether it succeeded.

    python scripts/layouts_smoke.py [LAYOUT ...]
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]

from common import copy_repo, git_env  # noqa: E402
from layout_fixtures import LAYOUTS_ALL, build_dataset  # noqa: E402

from layout_fixtures import MULTILABEL  # noqa: E402


def main() -> None:
    layouts = sys.argv[1:] or LAYOUTS_ALL
    env = git_env()
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = copy_repo(Path(tmp) / "repo")
        for layout in layouts:
            overrides = build_dataset(layout, Path(tmp) / "data" / layout)
            sets = [f"dataset={layout}", f"datasets.{layout}.root={overrides['root']}",
                    f"datasets.{layout}.image_size=32",
                    "teacher=cnn_small", "student=cnn_small", "models.cnn_small.epochs=1",
                    "models.cnn_small.warmup_epochs=0", "models.cnn_small.batch_size=8",
                    f"distill.method={'sigmoid_kd' if layout in MULTILABEL else 'kd'}"]
            sets += [f"datasets.{layout}.options.{k}={v}" for k, v in overrides.get("options", {}).items()]
            cmd = ["dvc", "exp", "run", "--temp", "-n", f"smoke-{layout}".replace("_", "-")]
            for item in sets:
                cmd += ["-S", item]
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
