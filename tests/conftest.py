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


# The work units of `-n 2 --dist loadgroup` (Makefile), longest first. A unit is one file, as
# under --dist loadfile, unless its tests carry their own xdist_group mark; each quick benchmark
# is a unit of its own (they share nothing). With two workers the run lasts as long as the later
# one: started last, one of these (minutes each) would run on alone after everything else ends.
LONGEST_FIRST = (
    "pipeline_e2e_fresh",
    "tests/test_bench.py::test_quick_benchmark_writes_its_result[pipeline]",
    "pipeline_e2e_experiments",
    "tests/test_interrupts.py",
    "tests/test_pipeline_datasets.py",
)
OWN_UNIT = "tests/test_bench.py::test_quick_benchmark_writes_its_result["


def work_unit(item: pytest.Item) -> str:
    marks = [m.args[0] if m.args else m.kwargs["name"] for m in item.iter_markers("xdist_group")]
    if marks:
        return marks[0]
    return item.nodeid if item.nodeid.startswith(OWN_UNIT) else item.nodeid.split("::")[0]


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(work_unit(item)))
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    # a stable sort: a file's tests keep their order, and the other units the collection's
    items.sort(key=lambda item: rank.get(work_unit(item), len(rank)))
