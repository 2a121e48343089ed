"""The pipeline reproduced once from scratch with tiny parameters, for the end-to-end tests
(test_pipeline_e2e.py, test_pipeline_e2e_experiments.py, test_study_e2e.py, test_bench_pipeline.py):
separate files so that pytest-xdist's --dist loadfile can run them on different workers."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bench.common import shrink as bench_shrink
from dvc_repo import built_once, copy_workspace, dvc_env, run, scratch_repository


def shrink(params: dict) -> dict:
    """The parameters ``bench/pipeline.py --quick`` runs (test_bench_pipeline.py compares its
    from-scratch run with this one, output by output): 4 / 2 / 4 MNIST images a class, one epoch,
    two precisions that compile nothing (kdlib/quantize has its own tests)."""
    return bench_shrink(params, per_class=4, epochs=1)


def build_trained(work: Path) -> dict:
    """Copy the repository into ``work`` with tiny parameters, run `dvc repro` from scratch, then
    `dvc repro` again; the record keeps both outputs for the first test's checks."""
    def small(repo: Path) -> None:
        params = shrink(yaml.safe_load((repo / "params.yaml").read_text()))
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = scratch_repository(work, small)
    first = run(["dvc", "repro"], work, env)
    second = run(["dvc", "repro"], work, env)
    return {"first_stdout": first.stdout, "second_stdout": second.stdout}


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The pipeline reproduced once from scratch, shared by the two end-to-end files (which
    pytest-xdist may run on different workers): read-only, each file changes a copy of it."""
    return built_once(tmp_path_factory, "pipeline-trained", build_trained)


@pytest.fixture(scope="module")
def experiments_workdir(trained, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A copy of the reproduced pipeline for the `dvc exp run` tests, which run in order on it."""
    return copy_workspace(trained[0], tmp_path_factory.mktemp("experiments") / "repo"), dvc_env()


ROLES = ("teacher", "baseline", "distill")


def declared_outputs(work: Path) -> list[Path]:
    pipeline = yaml.safe_load((work / "dvc.yaml").read_text())
    paths = []
    for stage in pipeline["stages"].values():
        variants = [(item, stage["do"]) for item in stage["foreach"]] if "foreach" in stage else [(None, stage)]
        for item, body in variants:
            for entry in body.get("outs", []) + body.get("metrics", []) + body.get("plots", []):
                path = entry if isinstance(entry, str) else next(iter(entry))
                paths.append(work / (path.replace("${item}", item).replace("${key}", item) if item else path))
    return paths


MEASURED = ("timing.json", "reports/costs.json", "reports/quantization.json", "reports/quantization.csv", "reports/results.md")


def measured(path: str) -> bool:
    return path.endswith(MEASURED) or path.startswith("reports/quantize/")


def lock_hashes(work: Path) -> dict[str, str]:
    """md5 of every DVC output except those holding wall-clock measurements (training time, latency),
    which differ by design; results.md is compared without its quantization section."""
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])
            if not measured(out["path"])}


def results_without_measurements(work: Path) -> str:
    return (work / "reports/results.md").read_text().split("## Quantized evaluation")[0]
