"""The export stage's files and ``python -m kdlib.predict``: on a student trained for a few seconds
on a tiny MNIST, model.json's hashes and scores are those of the files, the ONNX files describe
themselves, predict on the prepared PNGs agrees with the PyTorch model on the evaluation tensors,
the int8 file is the quantize stage's ``onnx_int8`` model, and bad models and images are refused
by name with exit status 2."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlib.checkpoint import Checkpoint
from kdlib.data.preprocessing import Preprocessing
from kdlib.deployed import ModelInfo
from kdlib.export import FP32_FILE, INT8_FILE, MODEL_JSON, STACK_TRACE_KEY
from kdlib.predict import PredictError, main, predict
from stages.evaluate import evaluate_checkpoint
from stages.export import export_student
from stages.params import read_params, resolve
from stages.pipeline import prepare
from stages.train import train_role
from stages.workspace import Workspace

pytestmark = pytest.mark.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]
IMAGES = 64


def tiny_params() -> dict:
    """A student that learns something in ~3 s (about 75-80 % test top-1): 20 images per class,
    8 epochs of AdamW without augmentation; 70 test images."""
    params = read_params(REPO / "params.yaml")
    mnist = params["datasets"]["mnist"]
    mnist["root"] = str(REPO / "data" / "mnist")
    mnist["options"].update(train_per_class=20, val_per_class=2, test_per_class=7)
    mnist.update(augment="none", augment_options={})
    student = params["models"][params["student"]]
    student.update(epochs=8, warmup_epochs=0, batch_size=16, optimizer="adamw", lr=3e-3, weight_decay=0.0)
    student.pop("momentum", None)
    params["eval"].update(calibration_images=48, threads=1)
    return params


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """(run, workspace, model.json): the student trained into models/distill and exported by the stage's function."""
    run = resolve(tiny_params())
    ws = Workspace(tmp_path_factory.mktemp("export") / "ws")
    prepare(run, ws)
    train_role(run, "baseline", ws, progress=False, out_dir=ws.models / "distill")  # no teacher needed
    card = export_student(run, ws, ws.models / "export")
    return run, ws, card


def prepared_pngs(ws: Workspace, count: int = IMAGES) -> list[Path]:
    index = ws.index()
    return [Path(index.meta.root) / r.path for r in index.split("test")[:count]]


def pytorch_logits(run, ws: Workspace) -> torch.Tensor:
    """The checkpoint's logits on the test split as evaluation loads it (the evaluate stage's function)."""
    checkpoint = Checkpoint.read(ws.checkpoint("distill"))
    return evaluate_checkpoint(run, ws.index(), checkpoint, ws=ws).logits


def test_model_json_records_the_files_their_metadata_and_the_source(exported) -> None:
    import onnx

    run, ws, card = exported
    folder = ws.models / "export"
    assert sorted(p.name for p in folder.iterdir()) == sorted([FP32_FILE, INT8_FILE, MODEL_JSON])
    assert json.loads((folder / MODEL_JSON).read_text()) == card
    for name in (FP32_FILE, INT8_FILE):
        data = (folder / name).read_bytes()
        assert card["files"][name]["sha256"] == hashlib.sha256(data).hexdigest()
        assert card["files"][name]["bytes"] == len(data)
        # nothing depends on where the repository lies: a forced re-run in a copy writes the same bytes
        assert str(REPO).encode() not in data and str(ws.root).encode() not in data and b"site-packages" not in data
    checkpoint, index = Checkpoint.read(ws.checkpoint("distill")), ws.index()
    assert card["source"]["checkpoint"] == "models/distill/best.pt"
    assert card["source"]["checkpoint_sha256"] == hashlib.sha256(checkpoint.path.read_bytes()).hexdigest()
    assert (card["source"]["preset"], card["source"]["arch"], card["source"]["epoch"]) == \
        (run.student.preset, checkpoint.record.arch, checkpoint.epoch)
    assert card["classes"] == index.meta.classes == [str(d) for d in range(10)] and card["task"] == "multiclass"
    assert card["preprocessing"]["input_size"] == 28 and card["preprocessing"]["channels"] == 1
    assert card["preprocessing"]["mean"] == [0.1307] and card["preprocessing"]["std"] == [0.3081]
    assert card["preprocessing"]["resize_at_input_size"] is False  # MNIST is stored at 28 px: evaluation never resizes
    assert card["files"][INT8_FILE]["calibration_images"] == 48
    for name in (FP32_FILE, INT8_FILE):  # each file's loss against PyTorch, flagged beyond the margin
        loss, delta = card["files"][name]["loss_vs_pytorch"], card["files"][name]["test"]["top1"] - \
            card["test"]["pytorch_fp32"]["top1"]
        assert loss["score"] == "top1" and loss["margin_pt"] == 1.0 and loss["delta"] == pytest.approx(delta, abs=1e-3)
        assert loss["flagged"] == (loss["delta"] < -1.0) and ("likely_cause" in loss) == loss["flagged"]

    for name in (FP32_FILE, INT8_FILE):  # each file describes itself
        props = {p.key: p.value for p in onnx.load(str(folder / name)).metadata_props}
        info = ModelInfo.from_metadata_props(props, name)
        assert info is not None and info.classes == card["classes"] and info.task == "multiclass"
        assert info.preprocessing.to_json() == card["preprocessing"]
        assert json.loads(props["kdlib.source"])["precision"] == ("fp32" if name == FP32_FILE else "int8")
    initializers = {str(onnx.numpy_helper.to_array(i).dtype) for i in onnx.load(str(folder / INT8_FILE)).graph.initializer}
    assert "int8" in initializers and card["files"][INT8_FILE]["bytes"] < 0.45 * card["files"][FP32_FILE]["bytes"]


def test_test_scores_in_model_json_are_recomputed_independently(exported) -> None:
    run, ws, card = exported
    logits = pytorch_logits(run, ws)
    targets = torch.tensor([r.label for r in ws.index().split("test")])
    top1 = 100.0 * float((logits.argmax(1) == targets).float().mean())
    assert card["test"]["images"] == len(targets) == 70
    assert card["test"]["pytorch_fp32"]["top1"] == pytest.approx(top1, abs=1e-3)
    assert top1 > 40  # the student learnt something: near-ties would make agreement meaningless
    for name in (FP32_FILE, INT8_FILE):
        predictions = predict(ws.models / "export" / name, prepared_pngs(ws, 70), topk=1, threads=1)
        classes = torch.tensor([int(p.top[0].name) for p in predictions])
        assert card["files"][name]["test"]["top1"] == pytest.approx(100.0 * float((classes == targets).float().mean()),
                                                                    abs=1e-3)
        assert card["files"][name]["agreement_with_pytorch"]["same_top1"] == pytest.approx(
            float((classes == logits.argmax(1)).float().mean()), abs=1e-6)


def test_predict_on_the_prepared_pngs_agrees_with_the_pytorch_model(exported) -> None:
    run, ws, _ = exported
    reference = torch.softmax(pytorch_logits(run, ws)[:IMAGES].double(), dim=1)
    images = prepared_pngs(ws)
    fp32 = predict(ws.models / "export" / FP32_FILE, images, topk=10, threads=1)
    assert [p.image for p in fp32] == [str(i) for i in images]
    for prediction, expected in zip(fp32, reference):
        probabilities = torch.zeros(10, dtype=torch.float64)
        for score in prediction.top:
            probabilities[score.index] = score.probability
        assert [s.name for s in prediction.top] == [str(s.index) for s in prediction.top]
        assert prediction.top[0].index == int(expected.argmax())  # fp32: every image
        torch.testing.assert_close(probabilities, expected, atol=1e-4, rtol=0)  # the same pixels, the same model
    int8 = predict(ws.models / "export" / INT8_FILE, images, topk=1, threads=1)
    agreement = np.mean([p.top[0].index == int(e.argmax()) for p, e in zip(int8, reference)])
    print(f"int8 file: same top-1 as the PyTorch model on {agreement:.1%} of {IMAGES} test images")
    assert agreement >= 0.8, agreement


def test_the_int8_file_is_the_quantize_stages_onnx_int8_model(exported, tmp_path) -> None:
    """Calibrated on the same seeded images, batched as the quantize stage batches them
    (eval.throughput_batch, not the export's 64): the same graph and weights, byte for byte,
    once the metadata is set aside."""
    import onnx

    from kdlib.quantize import PRECISIONS, QuantContext
    from kdlib.quantize.measure import calibration_sample

    run, ws, _ = exported
    checkpoint = Checkpoint.read(ws.checkpoint("distill"))
    normalize = Preprocessing.for_evaluation(run.dataset, ws.index().meta, 28).normalizer()
    train = run.dataset.load(ws.index(), "train", 28, False)
    calibration = calibration_sample(train, run.seed, run.params.eval.calibration_images)
    test = run.dataset.load(ws.index(), "test", 28, False)
    example = normalize(torch.stack([test[i][0] for i in range(4)]))
    ctx = QuantContext(example, [normalize(b) for b in calibration.split(run.params.eval.throughput_batch)],
                       threads=1, workdir=tmp_path)
    measured = PRECISIONS.get("onnx_int8")(checkpoint.model(), ctx).save(tmp_path / "measured")

    def without_metadata(path: Path) -> bytes:
        model = onnx.load(str(path))
        del model.metadata_props[:]
        for node in model.graph.node:  # the export drops the exporter's stack traces (machine paths)
            kept = [p for p in node.metadata_props if p.key != STACK_TRACE_KEY]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
        return model.SerializeToString()

    assert len(calibration) == 48
    assert without_metadata(ws.models / "export" / INT8_FILE) == without_metadata(measured)


def test_preprocessing_is_the_evaluation_view_when_it_resizes(exported) -> None:
    """At 32 px the 28-px MNIST images are resized (to 37) and center-cropped, as the test split
    at that size is: the same tensors."""
    run, ws, _ = exported
    index = ws.index()
    for size in (28, 32):
        test = run.dataset.load(index, "test", size, False)
        preprocessing = Preprocessing.for_evaluation(run.dataset, index.meta, size)
        assert preprocessing.resize_at_input_size == (size != 28)
        for i, path in enumerate(prepared_pngs(ws, 5)):
            image = preprocessing.load(path)
            assert image.shape == (1, size, size) and image.dtype == torch.uint8
            assert torch.equal(image, test[i][0])
    cropped = Preprocessing.for_evaluation(replace(run.dataset, eval_crop_pct=0.5), index.meta, 32)
    assert cropped.resize_short_side == 64 and Preprocessing.from_json(cropped.to_json(), "x") == cropped


def test_cli_prints_topk_lines_and_json(exported, capsys) -> None:
    _, ws, _ = exported
    model, images = ws.models / "export" / FP32_FILE, prepared_pngs(ws, 2)
    expected = predict(model, images, topk=3)
    text = subprocess.run([sys.executable, "-m", "kdlib.predict", str(model), *map(str, images), "--topk", "3"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert len(lines) == 2 * 4 and lines[0] == str(images[0]) and lines[4] == str(images[1])
    for block, prediction in zip((lines[1:4], lines[5:8]), expected):
        ranks = [line.split() for line in block]
        assert [r[0] for r in ranks] == ["1.", "2.", "3."]
        assert [r[1] for r in ranks] == [s.name for s in prediction.top]
        shown = [float(r[2]) for r in ranks]
        assert shown == sorted(shown, reverse=True)
        assert shown == pytest.approx([s.probability for s in prediction.top], abs=5e-5)
    assert main([str(model), str(images[0]), "--json", "--topk", "20"]) == 0  # in this process: a second start costs ~5 s
    rows = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in rows] == [str(images[0])] and len(rows[0]["top"]) == 10  # topk at most the classes
    assert sum(t["probability"] for t in rows[0]["top"]) == pytest.approx(1.0, abs=1e-6)
    assert rows[0]["top"][0]["class"] == expected[0].top[0].name


def test_a_model_without_metadata_uses_the_model_json_beside_it(exported, tmp_path) -> None:
    import onnx

    _, ws, _ = exported
    model = onnx.load(str(ws.models / "export" / FP32_FILE))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / FP32_FILE))
    images = prepared_pngs(ws, 3)
    with pytest.raises(PredictError, match="without kdlib metadata"):
        predict(tmp_path / FP32_FILE, images)
    shutil.copy(ws.models / "export" / MODEL_JSON, tmp_path / MODEL_JSON)
    assert [p.to_json() for p in predict(tmp_path / FP32_FILE, images)] == \
        [p.to_json() for p in predict(ws.models / "export" / FP32_FILE, images)]


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    import onnx
    from onnx import TensorProto, helper

    files = {"missing": tmp_path / "absent.onnx", "garbage": tmp_path / "garbage.onnx",
             "foreign": tmp_path / "relu.onnx", "image": tmp_path / "notes.png"}
    files["garbage"].write_bytes(bytes(range(256)) * 8)
    tensor = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [tensor[0]], [tensor[1]])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(files["foreign"]))
    files["image"].write_text("not an image\n")
    return files


def test_bad_models_and_images_are_refused_by_name_with_status_2(exported, bad_files, tmp_path, capsys) -> None:
    _, ws, _ = exported
    model, image = ws.models / "export" / INT8_FILE, prepared_pngs(ws, 1)[0]
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    cases = [
        ([bad_files["missing"], image], f"{bad_files['missing']}: no such file; expected an ONNX model file"),
        ([truncated, image], f"{truncated}: ONNX Runtime cannot load it (INVALID_PROTOBUF"),
        ([bad_files["garbage"], image], f"{bad_files['garbage']}: ONNX Runtime cannot load it"),
        ([bad_files["foreign"], image], f"{bad_files['foreign']}: an ONNX model without kdlib metadata"),
        ([model, image, bad_files["image"]], f"{bad_files['image']}: cannot read it as an image"),
        ([model, tmp_path / "nope.png"], f"{tmp_path / 'nope.png'}: no such file; expected an image file"),
    ]
    for args, message in cases:
        assert main([str(a) for a in args]) == 2, args
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith(f"error: {message}"), captured.err
    # the same through the real command line: no traceback, status 2
    proc = subprocess.run([sys.executable, "-m", "kdlib.predict", str(truncated), str(image)], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(truncated) in proc.stderr, proc.stderr
    with pytest.raises(SystemExit) as usage:  # argparse's own refusal, also status 2
        main([str(model), str(image), "--topk", "0"])
    assert usage.value.code == 2 and "expected a positive integer" in capsys.readouterr().err


def test_a_multilabel_model_gives_per_class_sigmoid_probabilities(exported, tmp_path) -> None:
    """The same graph declared multi-label: each class's probability is its own sigmoid, not a
    share of a softmax."""
    import onnxruntime as ort

    from kdlib.export import with_metadata

    _, ws, card = exported
    source = ws.models / "export" / FP32_FILE
    info = ModelInfo("multilabel", card["classes"], Preprocessing.from_json(card["preprocessing"], "model.json"))
    model = with_metadata(source, tmp_path / "multilabel.onnx", info.metadata_props())
    images = prepared_pngs(ws, 4)
    predictions = predict(model, images, topk=10)
    batch = info.preprocessing.normalizer()(torch.stack([info.preprocessing.load(i) for i in images])).numpy()
    logits = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"input": batch})[0]
    for prediction, row in zip(predictions, logits):
        shown = np.array([s.probability for s in sorted(prediction.top, key=lambda s: s.index)])
        np.testing.assert_allclose(shown, 1 / (1 + np.exp(-row.astype(np.float64))), atol=1e-6)
        assert abs(shown.sum() - 1.0) > 1e-3  # not normalized across classes
