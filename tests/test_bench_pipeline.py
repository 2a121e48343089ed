"""bench/pipeline.py --quick (a from-scratch `dvc repro`, stage by stage, then a method
experiment): the longest benchmark, in a file of its own so that pytest-xdist's --dist loadfile
runs it beside the other slow files rather than behind the other benchmarks."""
from __future__ import annotations

from pathlib import Path

import pytest

from test_bench import run_quick_benchmark


@pytest.mark.slow
def test_quick_pipeline_benchmark_writes_its_result(tmp_path: Path) -> None:
    run_quick_benchmark("pipeline", tmp_path)
