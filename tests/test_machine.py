"""kdlib.machine: the CPU name comes from /proc/cpuinfo, and training timings carry the machine."""
from __future__ import annotations

from pathlib import Path

import torch

from kdlib.machine import cpu_model, describe, label
from kdlib.report import model_costs
from kdlib.train import FitResult


def test_cpu_model_reads_the_model_name_line_and_falls_back_without_one(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD  EPYC 9654 96-Core Processor\n"
                    "processor\t: 1\nmodel name\t: AMD  EPYC 9654 96-Core Processor\n")
    assert cpu_model(info) == "AMD EPYC 9654 96-Core Processor"
    info.write_text("processor\t: 0\nCPU implementer\t: 0x41\n")  # an ARM cpuinfo has no model name
    assert cpu_model(info) and cpu_model(info) != ""
    assert cpu_model(tmp_path / "absent") == cpu_model(info)


def test_describe_on_cpu_names_no_accelerator() -> None:
    info = describe(torch.device("cpu"))
    assert info["logical_cores"] >= 1 and info["torch"] == torch.__version__ and "accelerator" not in info
    assert label(info) == f"{info['cpu']}, {info['logical_cores']} cores"
    assert label({"cpu": "Intel Xeon", "logical_cores": 16, "accelerator": "NVIDIA H200"}) == \
        "NVIDIA H200 (Intel Xeon, 16 cores)"
    assert label(None) == label({}) == "not recorded"


def test_the_machine_travels_from_a_fit_into_costs_json() -> None:
    machine = "AMD EPYC, 2 cores"
    result = FitResult(best_epoch=1, score_name="top1", best_val_score=90.0, last_epoch=2, last_val_score=89.0,
                       stopped_early=False, train_seconds=4.0, images_per_second=10.0, epoch_seconds=[2.0, 2.0],
                       global_batch=10, machine=machine)
    timing = result.timing()
    assert timing["machine"] == machine and "machine" not in result.summary()  # measured, not reproducible
    costs = model_costs({"global_batch": 10}, timing, None, train_images=20)
    assert costs == {"train_seconds": 4.0, "ms_per_step": 1000.0, "machine": machine}
    assert "machine" not in model_costs({"global_batch": 10}, {"train_seconds": 4.0}, None, train_images=20)
