"""Training under torchrun: several processes against one, several machines on loopback, bad input.

A model without batch statistics (a 1-block DeiT, no dropout) trained by 2 processes of batch 8
follows the same trajectory as 1 process of batch 16 up to float32 rounding: both see the same
images at every step (kdlib.runtime.make_loader), DDP averages the two half-batch gradients
into the full-batch gradient, and the logged means are all-reduced. With BatchNorm they differ
by design: each process normalizes with the statistics of its own 8 images, not of all 16.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stages.launch import usable_cpus
from stages.params import ParamError, read_params, resolve
from train_repo import copy_repository, free_port, md5, prepared_repository, run_stage, set_params, start_stage, tsv

pytestmark = pytest.mark.slow
# float32 rounding of a sum over 16 images in another order: ~1e-7 relative per step, a few steps
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared_repository(tmp_path_factory.mktemp("ddp") / "repo")


def deit_teacher(processes: int, batch: int, **runtime: object):
    def change(params: dict) -> None:
        params["teacher"] = "deit"
        params["models"]["deit"]["batch_size"] = batch
        params["runtime"].update(nproc_per_node=processes, **runtime)
    return change


def history(repo: Path) -> dict[str, list[float]]:
    plots = repo / "reports" / "teacher" / "plots" / "metrics"
    return {name: [float(row[1]) for row in tsv(plots / f"{name}.tsv")[1:]]
            for name in ("train/loss", "val/loss", "val/top1")}


def weights(repo: Path) -> dict[str, torch.Tensor]:
    return torch.load(repo / "models" / "teacher" / "last.pt", weights_only=True)["state_dict"]


def test_two_processes_follow_one_process_with_the_same_global_batch(repo: Path, tmp_path: Path) -> None:
    set_params(repo, deit_teacher(1, 16))
    run_stage(repo, "stages.train", "teacher")
    one, one_weights = history(repo), weights(repo)
    one_metrics = json.loads((repo / "reports" / "teacher" / "metrics.json").read_text())
    set_params(repo, deit_teacher(2, 8))
    out = run_stage(repo, "stages.train", "teacher").stdout
    assert "2 process(es), global batch 16" in out
    two, two_weights = history(repo), weights(repo)
    two_metrics = json.loads((repo / "reports" / "teacher" / "metrics.json").read_text())
    for name in one:
        assert two[name] == pytest.approx(one[name], rel=TOLERANCE, abs=TOLERANCE), name
    # the weights carry every step's rounding (8.8e-6 after 4 epochs in bench/scale.py; BatchNorm: 0.24)
    assert max(float((one_weights[k] - two_weights[k]).abs().max()) for k in one_weights) < 10 * TOLERANCE
    assert (one_metrics["world_size"], two_metrics["world_size"]) == (1, 2)
    assert one_metrics["global_batch"] == two_metrics["global_batch"] == 16
    assert one_metrics["best_epoch"] == two_metrics["best_epoch"]
    assert not list((repo / ".kdlib-resume").rglob("*.pt")), "a completed run leaves no resume state"


def test_two_machines_on_loopback_write_the_same_outputs(repo: Path, tmp_path: Path) -> None:
    other = copy_repository(repo, tmp_path / "node1")
    port = free_port()
    for node, path in enumerate((repo, other)):
        set_params(path, deit_teacher(1, 8, nnodes=2, node_rank=node, rdzv_endpoint=f"127.0.0.1:{port}",
                                      rdzv_timeout_s=60))
    procs = [start_stage(path, "stages.train", "teacher") for path in (repo, other)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err[-4000:]
    assert "2 process(es), global batch 16" in results[0][0]
    for name in ("best.pt", "last.pt", "manifest.json"):
        assert md5(repo / "models" / "teacher" / name) == md5(other / "models" / "teacher" / name), name
    metrics = json.loads((other / "reports" / "teacher" / "metrics.json").read_text())
    assert metrics["world_size"] == 2


def test_unreachable_rendezvous_fails_within_its_timeout_naming_the_key(repo: Path, tmp_path: Path) -> None:
    other = copy_repository(repo, tmp_path / "lonely")
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    set_params(other, deit_teacher(1, 8, nnodes=2, node_rank=1, rdzv_endpoint=endpoint, rdzv_timeout_s=2))
    before = sorted((p.relative_to(other), md5(p)) for p in (other / "models").rglob("*") if p.is_file())
    start = time.monotonic()
    proc = run_stage(other, "stages.train", "teacher", check=False, timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - start < 30
    assert f"runtime.rdzv_endpoint = '{endpoint}'" in proc.stderr and "within runtime.rdzv_timeout_s = 2 s" in proc.stderr
    assert sorted((p.relative_to(other), md5(p)) for p in (other / "models").rglob("*") if p.is_file()) == before


def test_more_processes_than_cores_is_refused_before_any_work(repo: Path, tmp_path: Path) -> None:
    other = copy_repository(repo, tmp_path / "crowded")
    cpus = usable_cpus()
    set_params(other, deit_teacher(cpus + 1, 8))
    proc = run_stage(other, "stages.train", "teacher", check=False)
    assert proc.returncode != 0
    assert f"runtime.nproc_per_node = {cpus + 1}: expected at most {cpus}, the CPU cores" in proc.stderr
    assert "torch.distributed.run" not in proc.stderr  # refused before torchrun started


def test_a_stage_started_by_hand_under_torchrun_is_refused(repo: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                           "-m", "stages.train", "teacher"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "this stage starts torchrun itself" in proc.stderr and "-S runtime.nproc_per_node=N" in proc.stderr


@pytest.mark.parametrize(("runtime", "message"), [
    ({"nproc_per_node": 0}, "runtime.nproc_per_node = 0: expected an integer in [1, inf]"),
    ({"nnodes": 2}, "runtime.rdzv_endpoint = None: expected host:port of node 0 when nnodes > 1"),
    ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "10.0.0.1:29500"},
     "runtime.node_rank = 2: expected an integer in [0, 1] (nnodes = 2)"),
    ({"rdzv_endpoint": "node0"}, "runtime.rdzv_endpoint = 'node0': expected host:port, e.g. 10.0.0.1:29500"),
    ({"device": "cpu", "sync_bn": True}, "runtime.sync_bn = True: expected false on CPU"),
    ({"device": "tpu"}, "runtime.device = 'tpu': expected one of: auto, cpu, cuda"),
])
def test_bad_runtime_settings_name_the_key_and_what_is_allowed(runtime: dict, message: str) -> None:
    params = read_params()
    params["runtime"].update(runtime)
    with pytest.raises(ParamError) as err:
        resolve(params)
    assert message in str(err.value)


def _method_parameters_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from kdlib import distributed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # each process starts from other values, as a method's head built unseeded would
        head = torch.nn.Linear(3, 2)
        distributed.broadcast_parameters(list(head.parameters()))
        head.weight.grad = torch.full((2, 3), float(rank + 1))
        head.bias.grad = torch.full((2,), 10.0 * (rank + 1))
        distributed.average_gradients(list(head.parameters()))
        torch.save({"weight": head.weight.detach(), "bias": head.bias.detach(),
                    "weight_grad": head.weight.grad, "bias_grad": head.bias.grad}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_methods_own_parameters_start_equal_and_step_on_averaged_gradients(tmp_path: Path) -> None:
    """Outside DDP, a method's parameters (kdlib.train.fit) start as rank 0's on both processes and
    their gradients are the mean over processes: (1 + 2) / 2 = 1.5 and (10 + 20) / 2 = 15."""
    torch.multiprocessing.spawn(_method_parameters_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    zero, one = (torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1))
    torch.manual_seed(0)
    assert torch.equal(zero["weight"], torch.nn.Linear(3, 2).weight.detach())
    for name in ("weight", "bias"):
        assert torch.equal(zero[name], one[name])
    assert torch.equal(one["weight_grad"], torch.full((2, 3), 1.5)) and torch.equal(zero["bias_grad"], torch.full((2,), 15.0))


def _layer_taps_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from kdlib import distributed
    from kdlib.models import build_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = build_model("cnn_small", 3, 1)
        step = distributed.wrap_student(model, False, torch.device("cpu"), layers=("features.6",))
        images = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(rank))
        out = step(images)
        # as a method's loss: a CE-like term on the logits (every parameter gets a gradient, as DDP expects)
        # and a term on the hooked layer's output
        (out.layers[0].pow(2).mean() + out.logits.pow(2).mean()).backward()
        distributed.release_taps(step)
        torch.save({"grad": model.features[0].weight.grad.clone(), "hooks": sum(len(m._forward_hooks) for m in model.modules())},
                   f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_hooked_layers_under_ddp_send_averaged_gradients(tmp_path: Path) -> None:
    """A feature-map method's loss reaches the student through a forward hook's output. Under DDP
    (2 gloo processes, a batch each) the first convolution's gradient is the mean of the two batches'
    single-process gradients on both processes, and the hooks come off after training."""
    from kdlib.models import build_model
    from kdlib.taps import LayerTaps

    torch.multiprocessing.spawn(_layer_taps_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    zero, one = (torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1))
    alone = []
    for rank in (0, 1):
        torch.manual_seed(0)
        model = build_model("cnn_small", 3, 1)
        images = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(rank))
        logits, (layer,) = LayerTaps(model, ("features.6",)).forward(images)
        (layer.pow(2).mean() + logits.pow(2).mean()).backward()
        alone.append(model.features[0].weight.grad.clone())
    expected = (alone[0] + alone[1]) / 2
    torch.testing.assert_close(zero["grad"], expected, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(one["grad"], expected, rtol=1e-5, atol=1e-8)
    assert zero["hooks"] == one["hooks"] == 0
