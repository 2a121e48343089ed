"""Each precision really holds the dtype it claims (stored tensors, module types, file sizes),
gives the fp32 model's predictions within its precision, and a precision that cannot run says why."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from kdlib.models import build_model
from kdlib.quantize import PRECISIONS, QuantContext, Skipped
from kdlib.quantize.figures import pareto_front, quantization_table
from kdlib.quantize.measure import add_deltas, count_macs, latency_ms

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("cnn_small", 10, 1).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as a trained model has
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def batches() -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 1, 28, 28, generator=g), [torch.randn(32, 1, 28, 28, generator=g) for _ in range(2)]


def _ctx(batches, tmp_path: Path) -> QuantContext:
    example, calibration = batches
    return QuantContext(example, calibration, torch.device("cpu"), 1, tmp_path, static_batch_sizes=(1, 16))


def _weight_count(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def _prepare(name: str, model: nn.Module, batches, tmp_path: Path):
    try:
        return PRECISIONS.get(name)(model, _ctx(batches, tmp_path))
    except Skipped as why:  # only a machine without the kernels/packages may skip; say which
        pytest.skip(f"{name} skipped here: {why}")


def test_registry_lists_every_precision() -> None:
    assert set(PRECISIONS.names()) == {"fp32", "fp32_channels_last", "bf16", "fp16", "int8_dynamic", "int8_static", "fp8",
                                       "onnx_fp32", "onnx_int8"}
    with pytest.raises(KeyError, match="known: bf16, fp16, fp32"):
        PRECISIONS.get("int4")


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_half_precisions_are_skipped_where_the_cpu_only_emulates_them(name, cnn, batches, tmp_path, monkeypatch):
    from kdlib.quantize import Skipped

    monkeypatch.setattr("kdlib.quantize.half.has_native_kernels", lambda dtype, device: False)
    with pytest.raises(Skipped, match="no native kernels on this CPU"):
        PRECISIONS.get(name)(cnn, _ctx(batches, tmp_path))


def test_native_kernel_probe_answers_for_every_dtype() -> None:
    from kdlib.runtime import has_native_kernels

    cpu = torch.device("cpu")
    assert has_native_kernels(torch.float32, cpu) and has_native_kernels(torch.bfloat16, torch.device("cuda"))
    assert isinstance(has_native_kernels(torch.bfloat16, cpu), bool)


@pytest.mark.parametrize("name,dtype", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_half_precisions_store_and_compute_in_that_dtype(name, dtype, cnn, batches, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("kdlib.quantize.half.has_native_kernels", lambda dtype, device: True)  # any CPU
    prepared = _prepare(name, cnn, batches, tmp_path)
    floats = {k for k in prepared.stored_dtypes() if k.startswith(("float", "bfloat"))}
    assert floats == {dtype}
    inner = prepared.module.model
    assert all(p.dtype == getattr(torch, dtype) for p in inner.parameters())
    seen = []
    hook = inner.fc.register_forward_hook(lambda m, i, o: seen.append(i[0].dtype))
    example = batches[0]
    out = prepared.module(example)
    hook.remove()
    assert seen == [getattr(torch, dtype)]  # activations too, not only weights
    assert out.dtype == torch.float32 and _agreement(out, cnn(example)) >= 0.9
    fp32_size = PRECISIONS.get("fp32")(cnn, _ctx(batches, tmp_path)).save(tmp_path / "ref").stat().st_size
    assert prepared.save(tmp_path / name).stat().st_size < 0.6 * fp32_size


def test_int8_dynamic_quantizes_linear_weights(cnn, batches, tmp_path) -> None:
    prepared = _prepare("int8_dynamic", cnn, batches, tmp_path)
    fc = prepared.module.model.fc
    assert fc.weight.qdata.dtype == torch.int8  # torchao Int8Tensor: int8 storage, fp32 logical dtype
    assert prepared.stored_dtypes()["int8"] >= cnn.fc.weight.numel()
    assert _agreement(prepared.module(batches[0]), cnn(batches[0])) >= 0.9


def test_int8_dynamic_without_linear_layers_is_skipped(batches, tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten()).eval()
    with pytest.raises(Skipped, match="no nn.Linear"):
        PRECISIONS.get("int8_dynamic")(model, _ctx(batches, tmp_path))


def test_int8_static_holds_int8_weights_and_matches_fp32(cnn, batches, tmp_path) -> None:
    prepared = _prepare("int8_static", cnn, batches, tmp_path)
    dtypes = prepared.stored_dtypes()
    assert dtypes["int8"] == _weight_count(cnn)
    assert dtypes.get("float32", 0) < 0.02 * _weight_count(cnn)  # scales and biases only
    fp32_size = PRECISIONS.get("fp32")(cnn, _ctx(batches, tmp_path)).save(tmp_path / "ref").stat().st_size
    size = prepared.save(tmp_path / "int8").stat().st_size
    # the .pt2 archive carries the serialized graph (~130 KB), which dominates a 56k-parameter model
    assert size < fp32_size, (size, fp32_size)
    example = batches[0]
    out = prepared.module(example[:5])  # 5 is padded to a compiled batch size; padding rows dropped
    assert out.shape == (5, 10)
    assert _agreement(out, cnn(example[:5])) >= 0.8


def test_fp8_stores_every_weight_in_float8(cnn, batches, tmp_path) -> None:
    prepared = _prepare("fp8", cnn, batches, tmp_path)
    dtypes = prepared.stored_dtypes()
    assert dtypes["float8_e4m3fn"] == _weight_count(cnn)
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in prepared.module.modules())
    fp32_size = PRECISIONS.get("fp32")(cnn, _ctx(batches, tmp_path)).save(tmp_path / "ref").stat().st_size
    assert fp32_size / prepared.save(tmp_path / "fp8").stat().st_size > 3.0
    example = batches[0]
    ref = cnn(example)
    out = prepared.module(example)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max() and _agreement(out, ref) >= 0.9


def test_onnx_runtime_fp32_and_int8(cnn, batches, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    example = batches[0]
    fp32 = _prepare("onnx_fp32", cnn, batches, tmp_path)
    torch.testing.assert_close(fp32.module(example), cnn(example), atol=1e-4, rtol=1e-4)
    assert fp32.module(example[:3]).shape == (3, 10)  # the batch dimension stays dynamic
    int8 = _prepare("onnx_int8", cnn, batches, tmp_path)
    path = int8.save(tmp_path / "int8")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert int8.stored_dtypes()["int8"] >= _weight_count(cnn)
    assert fp32.save(tmp_path / "fp32").stat().st_size / path.stat().st_size > 2.5
    assert _agreement(int8.module(example), cnn(example)) >= 0.8


def test_onnx_profile_names_the_executed_kernels(cnn, batches, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from kdlib.quantize.onnx_common import profile_nodes

    fp32, int8 = (_prepare(name, cnn, batches, tmp_path / name) for name in ("onnx_fp32", "onnx_int8"))
    x = batches[0][:1].numpy()
    fp32_profile, int8_profile = (profile_nodes(p.module.path, x, 1, runs=20, skip=5) for p in (fp32, int8))
    assert sum(n["op"] == "Conv" for n in fp32_profile["nodes"]) == 3  # Relu fused into the fp32 Conv
    assert sum(n["op"] == "QLinearConv" for n in int8_profile["nodes"]) == 3  # QDQ pairs fused into int8 kernels
    for profile in (fp32_profile, int8_profile):
        assert profile["run_median_us"] >= max(n["median_us"] for n in profile["nodes"]) > 0
        assert profile["kernel_sum_us"] == pytest.approx(sum(n["median_us"] for n in profile["nodes"]))


def test_measurement_helpers(cnn) -> None:
    x = torch.randn(1, 1, 28, 28)
    # conv1 28*28*32*9 + conv2 14*14*64*32*9 + conv3 7*7*64*64*9 + fc 64*10
    assert count_macs(cnn, x) == 28 * 28 * 32 * 9 + 14 * 14 * 64 * 32 * 9 + 7 * 7 * 64 * 64 * 9 + 640
    median, p95 = latency_ms(cnn, x, 1, 5)
    assert 0 < median <= p95


def test_deltas_pareto_and_table() -> None:
    rows = [
        {"model": "s", "precision": "fp32", "status": "ok", "top1": 97.0, "size_bytes": 400, "params": 10,
         "latency_b1_median_ms": 1.0, "latency_b1_p95_ms": 1.2, "throughput_img_s": 100.0, "throughput_batch": 64,
         "macs": 5e6, "backend": "eager", "peak_rss_mib": 500.0},
        {"model": "s", "precision": "int8_static", "status": "ok", "top1": 96.5, "size_bytes": 100, "params": 10,
         "latency_b1_median_ms": 0.25, "latency_b1_p95_ms": 0.3, "throughput_img_s": 400.0,
         "throughput_batch": 64, "macs": 5e6, "backend": "pt2e", "peak_rss_mib": 520.0},
        {"model": "s", "precision": "fp16", "status": "skipped", "reason": "no kernel", "params": 10},
    ]
    add_deltas(rows, "top1")
    assert rows[1]["delta_top1"] == -0.5 and rows[1]["size_ratio"] == 4.0 and rows[1]["speedup_b1"] == 4.0
    assert rows[1]["accuracy_loss_flagged"] is False and rows[1]["accuracy_loss_margin_pt"] == 1.0  # within 1 pt
    assert pareto_front([(1.0, 97.0), (0.25, 96.5), (2.0, 90.0)]) == [1, 0]
    table = quantization_table(rows, "top1", {"s": 12.0})
    assert "skipped: no kernel" in table and "-0.50" in table and "12 s" in table


def test_int8_static_quantizes_a_residual_cnn(batches) -> None:
    """A module called twice (one ReLU shared by a residual block) is one partition with two outputs,
    which the X86InductorQuantizer refuses: rescnn uses a ReLU per call site."""
    from kdlib.quantize.int8_static import quantize_pt2e, stored_dtypes

    torch.manual_seed(0)
    model = build_model("rescnn", 10, 1, blocks=4).eval()
    example, calibration = batches
    converted = quantize_pt2e(model, example, calibration)
    assert stored_dtypes(converted).get("int8", 0) >= 0.9 * _weight_count(model)


def test_inference_memory_counts_the_model_not_the_process(tmp_path) -> None:
    """``inference_mib`` (peak RSS from just before the model is loaded until it has been timed)
    sees ResNet-18's 43 MiB of fp32 weights that the whole-process peak, dominated by torch itself,
    hides; each job runs in its own fresh process, as the quantize stage runs them."""
    from kdlib.checkpoint import save_checkpoint
    from kdlib.quantize.measure import EvalJob, TensorImages, reset_peak_rss, run_isolated

    if not reset_peak_rss():
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    meta = {"num_classes": 10, "in_chans": 1, "model_kwargs": {}, "input_size": 28, "mean": [0.5], "std": [0.25],
            "classes": [str(i) for i in range(10)]}
    g = torch.Generator().manual_seed(0)
    test_set = TensorImages(torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=g),
                            torch.randint(0, 10, (8,), generator=g))
    memory = {}
    for arch in ("cnn_small", "resnet18"):
        path = tmp_path / f"{arch}.pt"
        save_checkpoint(path, build_model(arch, 10, 1).eval(), {**meta, "arch": arch})
        row = run_isolated(EvalJob(arch, path, "fp32", test_set, test_set.images, threads=1, batch_size=8,
                                   throughput_batch=4, warmup=1, timed_runs=2, throughput_runs=1))
        assert row["status"] == "ok", row
        assert 0 < row["inference_mib"] <= row["peak_rss_mib"] - row["rss_start_mib"] + 1
        # the latency's spread, re-timed at most LATENCY_ATTEMPTS times, and the CPU's int8 capability
        assert 1 <= row["latency_b1_attempts"] <= 3 and row["latency_b1_spread"] >= 1.0
        assert row["latency_b1_noisy"] == (row["latency_b1_spread"] > row["latency_b1_spread_bound"])
        assert row["latency_b1_median_ms"] <= row["latency_b1_p90_ms"] <= row["latency_b1_p95_ms"]
        assert set(row["cpu"]) == {"torch_capability", "vnni", "vnni_flags"}
        memory[arch] = row["inference_mib"]
    assert memory["resnet18"] - memory["cnn_small"] > 30  # ResNet-18's fp32 weights are 42.7 MiB
