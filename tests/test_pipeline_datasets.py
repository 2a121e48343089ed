"""A real data-set preset through the pipeline's own stage functions: prepare → teacher →
baseline → distill → evaluate, on a CUB-200 layout built on disk (tiny, one epoch); and a
multi-label VOC preset through the same functions and through the stage scripts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdlib.checkpoint import Checkpoint
from stages.evaluate import evaluate_checkpoint
from stages.params import ParamError, read_params, resolve, validate
from stages.pipeline import prepare, train_pipeline
from stages.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]


def build_cub(root: Path, classes: int = 3, per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    images, labels, split, names = [], [], [], []
    image_id = 0
    for c in range(1, classes + 1):
        name = f"{c:03d}.Bird_{c}"
        names.append(f"{c} {name}")
        (root / "images" / name).mkdir(parents=True)
        for k in range(per_class):
            image_id += 1
            rel = f"{name}/bird_{image_id}.jpg"
            size = (int(rng.integers(40, 80)), int(rng.integers(40, 80)))
            pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8) // (c + 1)
            Image.fromarray(pixels).save(root / "images" / rel, quality=90)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {1 if k < per_class - 2 else 0}")
    for fname, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                         ("train_test_split.txt", split), ("classes.txt", names)):
        (root / fname).write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def cub_params(tmp_path: Path) -> dict:
    params = read_params(REPO / "params.yaml")
    params["dataset"] = "cub200"
    params["datasets"]["cub200"].update(root=str(build_cub(tmp_path / "CUB_200_2011")), image_size=32,
                                        val_fraction=0.25)
    params["teacher"], params["student"] = "resnet18", "cnn_small"
    for preset in params["models"].values():
        preset.update(epochs=1, warmup_epochs=0, batch_size=8)
    validate(params)
    return params


def test_cub_preset_runs_prepare_train_distill_evaluate(cub_params, tmp_path):
    ws = Workspace(tmp_path)
    run = resolve(cub_params)
    index = prepare(run, ws)
    assert (ws.prepared / "index.csv").is_file()
    assert index.meta.classes == ["001.Bird_1", "002.Bird_2", "003.Bird_3"]
    counts = {s: len(index.split(s)) for s in ("train", "val", "test")}
    assert counts["test"] == 6 and counts["train"] + counts["val"] == 18 and counts["val"] >= 3
    train_pipeline(run, ws)
    for role in ("teacher", "baseline", "distill"):
        checkpoint = Checkpoint.read(ws.checkpoint(role))
        result = evaluate_checkpoint(run, index, checkpoint)
        meta = checkpoint.meta
        assert meta["in_chans"] == 3 and meta["input_size"] == 32
        assert checkpoint.record.in_chans == 3 and checkpoint.record.input_size == 32
        assert len(result.targets) == 6 and 0.0 <= result.top1 <= 100.0


def test_missing_root_is_named(cub_params, tmp_path):
    cub_params["datasets"]["cub200"]["root"] = str(tmp_path / "nowhere")
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare(resolve(cub_params), ws)
    assert not ws.prepared.exists() and not ws.prepared.with_name("prepared.partial").exists()


@pytest.fixture
def served_dir(tmp_path: Path):
    """A real HTTP server on 127.0.0.1 serving ``tmp_path / 'www'``; yields (base_url, request log)."""
    import functools
    import http.server
    import threading

    www = tmp_path / "www"
    www.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", www, requests
    server.shutdown()
    server.server_close()


def test_preset_with_url_downloads_verifies_extracts_once(cub_params, served_dir, tmp_path):
    import hashlib
    import tarfile

    base_url, www, requests = served_dir
    source = Path(cub_params["datasets"]["cub200"]["root"])
    archive = www / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="CUB_200_2011")
    preset = cub_params["datasets"]["cub200"]
    del preset["root"]
    preset.update(url=f"{base_url}/CUB_200_2011.tgz", sha256=hashlib.sha256(archive.read_bytes()).hexdigest(),
                  download_dir=str(tmp_path / "downloads"), archive_subdir="CUB_200_2011")
    validate(cub_params)
    ws = Workspace(tmp_path / "ws")
    first = prepare(resolve(cub_params), ws)
    assert len(first.records) == 24 and len(requests) == 1
    second = prepare(resolve(cub_params), ws)
    assert [r.md5 for r in second.records] == [r.md5 for r in first.records]
    assert len(requests) == 1  # idempotent: verified archive and extraction are reused

    from kdlib.data.fetch import FetchError

    preset.update(sha256="0" * 64, download_dir=str(tmp_path / "other"))
    ws2 = Workspace(tmp_path / "ws2")
    with pytest.raises(FetchError, match="sha256"):
        prepare(resolve(cub_params), ws2)
    assert not ws2.prepared.exists()


def test_url_without_checksum_is_refused_by_validation(cub_params):
    cub_params["datasets"]["cub200"]["url"] = "http://127.0.0.1:9/x.tgz"
    with pytest.raises(ParamError, match="sha256"):
        validate(cub_params)


VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]


def build_voc(root: Path, images: int = 70) -> Path:
    base = root / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    ids = [f"{i:06d}" for i in range(images)]
    for i, image_id in enumerate(ids):
        present = sorted({i % 20, int(rng.integers(0, 20))})  # every class in trainval
        objects = "".join(
            f"<object><name>{VOC_CLASSES[c]}</name><difficult>{int(i % 7 == 0 and k == 0)}</difficult></object>"
            for k, c in enumerate(present))
        (base / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{objects}</annotation>")
        pixels = (rng.integers(0, 60, (40, 48, 3)) + 9 * present[0]).astype(np.uint8)
        Image.fromarray(pixels).save(base / "JPEGImages" / f"{image_id}.jpg")
    (base / "ImageSets/Main/trainval.txt").write_text("\n".join(ids[:60]) + "\n")
    (base / "ImageSets/Main/test.txt").write_text("\n".join(ids[60:]) + "\n")
    return root


def test_voc_multilabel_preset_trains_with_bce_and_sigmoid_kd_and_reports_map(tmp_path):
    params = read_params(REPO / "params.yaml")
    params["dataset"], params["teacher"], params["student"] = "voc2007", "cnn_small", "cnn_small"
    params["datasets"]["voc2007"].update(root=str(build_voc(tmp_path / "voc")), image_size=32, val_fraction=0.2)
    params["distill"]["method"] = "sigmoid_kd"
    for preset in params["models"].values():
        preset.update(epochs=2, warmup_epochs=0, batch_size=8)
    run = resolve(params)
    assert run.task == "multilabel" and run.score == "mAP"
    ws = Workspace(tmp_path)
    index = prepare(run, ws)
    assert index.meta.task == "multilabel" and index.meta.num_classes == 20
    assert any(r.difficult for r in index.records) and all(r.label == -1 for r in index.records)
    for role, (result, _) in train_pipeline(run, ws).items():
        assert result.score_name == "mAP" and 0.0 <= result.best_val_score <= 100.0
        evaluated = evaluate_checkpoint(run, index, Checkpoint.read(ws.checkpoint(role)))
        assert evaluated.targets.shape == (10, 20)
        assert {"mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"} <= set(evaluated.metrics)

    # the multi-label stage 2 of LSHFM (Wang et al., TPAMI 2021): BCE + beta (L2 + LSH) after aligning feat_fc
    params["distill"]["method"] = "lshl2"
    params["distill"]["lshl2"].update(beta=0.5, num_hyperplanes=64, force_feat_fc=True)  # same widths here
    params["align"]["epochs"] = 1
    result = train_pipeline(resolve(params), ws, roles=("distill",))["distill"][0]
    assert result.score_name == "mAP" and {"train/bce", "train/l2", "train/lsh"} <= set(result.history[0])
    assert ws.align_checkpoint.is_file()
    # the fitted LSH state (no separate lsh.pt any more) is in every checkpoint
    assert not (ws.models / "distill" / "lsh.pt").exists()
    for which in ("best", "last"):
        state = Checkpoint.read(ws.checkpoint("distill", which)).method_state
        assert set(state) == {"bias", "seed", "weight_std"}
        assert state["bias"].shape == (64,) and state["seed"] == params["seed"]

    params["distill"]["method"] = "kd"  # single-label KD on multi-label data is refused, by name
    with pytest.raises(ParamError, match="sigmoid_kd") as err:
        resolve(params)
    assert "distill.method = 'kd' does not fit a multilabel data set" in str(err.value)


@pytest.mark.slow
def test_stage_scripts_run_on_multilabel_voc(tmp_path):
    """The stage scripts, run as processes in order (as dvc.yaml runs them: evaluate and quantize
    once per role), on a VOC fixture."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    work = tmp_path / "work"
    work.mkdir()
    params = read_params(REPO / "params.yaml")
    params["dataset"], params["teacher"], params["student"] = "voc2007", "cnn_small", "cnn_small"
    params["datasets"]["voc2007"].update(root=str(build_voc(tmp_path / "voc")), image_size=32, val_fraction=0.2)
    params["distill"]["method"] = "sigmoid_kd"
    for preset in params["models"].values():
        preset.update(epochs=1, warmup_epochs=0, batch_size=8)
    # report gathers the quantize stage's rows: one precision, few timed calls, keeps it quick
    params["eval"].update(precisions=["fp32"], warmup_runs=1, timed_runs=3, throughput_batch=4, throughput_runs=1,
                          calibration_images=8)
    validate(params)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    roles = ("teacher", "baseline", "distill")
    steps = [["prepare"], ["train", "teacher"], ["train", "baseline"], ["teacher_cache"], ["align"],
             ["train", "distill"], *(["evaluate", role] for role in roles), *(["quantize", role] for role in roles),
             ["report"]]
    for args in steps:
        proc = subprocess.run([sys.executable, "-m", f"stages.{args[0]}", *args[1:]], cwd=work, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (args, proc.stdout[-2000:] + proc.stderr[-2000:])
    reports = work / "reports"
    summary = json.loads((reports / "summary.json").read_text())
    assert "kd_gain_mAP" in summary and set(roles) <= set(summary)
    for role in roles:
        metrics = json.loads((reports / "evaluate" / f"{role}.json").read_text())
        assert "mAP" in metrics["best"] and "mAP" in metrics["last"]
        assert metrics["params"] > 0 and metrics["checkpoint_bytes"] > 0
        assert summary[role] == {"best": metrics["best"]["mAP"], "last": metrics["last"]["mAP"]}
        matrix = json.loads((reports / "evaluate" / "matrix" / f"{role}.json").read_text())
        assert matrix == {"classes": VOC_CLASSES, "matrix": None}  # multi-label: no confusion matrix
        assert json.loads((reports / "evaluate" / "confusion" / f"{role}.json").read_text()) == []
        rows = json.loads((reports / "quantize" / f"{role}.json").read_text())
        assert [row["precision"] for row in rows] == ["fp32"]
    assert summary["kd_gain_mAP"] == pytest.approx(summary["distill"]["best"] - summary["baseline"]["best"], abs=1e-3)
    assert not (reports / "evaluate" / "metrics.json").exists()
    assert not (reports / "evaluate" / "confusion_matrices.json").exists()
    assert json.loads((reports / "distill/metrics.json").read_text())["best_val_mAP"] >= 0
    assert (reports / "quantization.json").is_file() and (reports / "quantization.csv").is_file()
    results = (reports / "results.md").read_text()
    assert "test mAP best" in results and "CF1" in results
    assert (reports / "figures/training_curves.png").is_file()
