"""bench/pipeline.py --quick (a from-scratch `dvc repro`, stage by stage, then a method
experiment): the longest benchmark, in a file of its own so that pytest-xdist's --dist loadfile
runs it beside the other slow files rather than behind the other benchmarks.

Its from-scratch run has the parameters of the reproduced pipeline (pipeline_run.trained), in
another directory and stage by stage: the two are compared output by output, which is the
pipeline's bit-for-bit reproducibility check."""
from __future__ import annotations

from pathlib import Path

import pytest

from dvc_repo import built_once
from pipeline_run import lock_hashes, results_without_measurements, trained  # noqa: F401 (a fixture)
from test_bench import run_quick_benchmark

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(the default run's repository that the benchmark kept, the benchmark's JSON result)."""
    return built_once(tmp_path_factory, "bench-pipeline",
                      lambda folder: run_quick_benchmark("pipeline", folder / "out", "--keep", str(folder / "repo")))


def test_quick_pipeline_benchmark_writes_its_result(bench_run) -> None:
    folder, result = bench_run
    assert (folder / "out" / "pipeline.json").is_file() and result["noop_repro_seconds"] > 0


def test_a_second_run_from_scratch_reproduces_every_output_bit_for_bit(trained, bench_run) -> None:
    """The same parameters run from scratch twice (`dvc repro` here, `dvc repro --single-item` stage
    by stage in the benchmark, in other directories): every DVC output but the wall-clock
    measurements has the same md5, and results.md is the same but for its timings."""
    reproduced, _ = trained
    second = bench_run[0] / "repo"
    before, after = lock_hashes(reproduced), lock_hashes(second)
    assert {"models/teacher", "models/teacher_cache", "models/distill", "reports/figures"} <= set(before)
    assert before == after, {k: (before[k], after.get(k)) for k in before if before[k] != after.get(k)}
    results = results_without_measurements(reproduced)
    assert results == results_without_measurements(second) and "KD gain" in results
