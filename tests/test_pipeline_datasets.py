"""A real data-set preset through the pipeline's own stage functions: prepare → teacher →
baseline → distill → evaluate, on a CUB-200 layout built on disk (tiny, one epoch)."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.evaluate import evaluate_checkpoint
from stages.params import load_params, validate
from stages.prepare import prepare
from stages.train import train_role

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
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["dataset"] = "cub200"
    params["datasets"]["cub200"].update(root=str(build_cub(tmp_path / "CUB_200_2011")), image_size=32,
                                        val_fraction=0.25)
    params["teacher"], params["student"] = "resnet18", "cnn_small"
    for preset in params["models"].values():
        preset.update(epochs=1, warmup_epochs=0, batch_size=8)
    validate(params)
    return params


def test_cub_preset_runs_prepare_train_distill_evaluate(cub_params, tmp_path):
    index = prepare(cub_params, tmp_path / "prepared")
    assert index.meta.classes == ["001.Bird_1", "002.Bird_2", "003.Bird_3"]
    counts = {s: len(index.split(s)) for s in ("train", "val", "test")}
    assert counts["test"] == 6 and counts["train"] + counts["val"] == 18 and counts["val"] >= 3
    for role in ("teacher", "baseline", "distill"):
        train_role(cub_params, role, index, tmp_path / role, tmp_path / "teacher" / "best.pt", progress=False)
        result, meta, _ = evaluate_checkpoint(cub_params, index, tmp_path / role / "best.pt")
        assert meta["in_chans"] == 3 and meta["input_size"] == 32
        assert len(result.targets) == 6 and 0.0 <= result.top1 <= 100.0


def test_missing_root_is_named(cub_params, tmp_path):
    cub_params["datasets"]["cub200"]["root"] = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare(cub_params, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "prepared.partial").exists()
