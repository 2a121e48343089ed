"""Shared test setup: make the repository root importable (for ``stages``) and keep torch small."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Two CPU cores are shared with other work: one intra-op thread keeps the tests predictable.
torch.set_num_threads(1)


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT



# `-n 2 --dist loadfile --no-loadscope-reorder` (Makefile) hands the workers one file at a time in
# this order: with two workers the run lasts as long as the later one, and one of these files
# (minutes each) started last would run on alone after everything else ended. The rest keep the
# collection's order.
LONGEST_FIRST = (
    "tests/test_pipeline_e2e.py",  # builds the reproduced pipeline the experiments file copies
    "tests/test_bench_pipeline.py",
    "tests/test_pipeline_e2e_experiments.py",
    "tests/test_remote.py",
    "tests/test_study_e2e.py",  # copies the reproduced pipeline too
    "tests/test_bad_inputs_dvc.py",  # and so does this one
    "tests/test_interrupts.py",
    "tests/test_resume.py",
    "tests/test_distributed.py",
    "tests/test_bench_scale.py",
    "tests/test_pipeline_datasets.py",
    "tests/test_bench.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    # a stable sort: each file's tests keep their order
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
