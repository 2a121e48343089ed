"""Every data-set layout through the pipeline's own stage functions: a tiny copy of the data set in
its real on-disk format (tests/layout_fixtures.py) → prepare → teacher → baseline → distill →
evaluate, with one-epoch cnn_small presets at 32 px."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

from kdlib.checkpoint import Checkpoint
from layout_fixtures import FACTS, LAYOUTS_ALL, MULTILABEL, build_dataset, tiny_params
from stages.evaluate import evaluate_checkpoint
from stages.params import read_params, resolve
from stages.pipeline import prepare, train_pipeline
from stages.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_params() -> dict:
    return read_params(REPO / "params.yaml")


@pytest.mark.parametrize("layout", LAYOUTS_ALL)
def test_layout_runs_prepare_train_distill_evaluate(layout: str, base_params: dict, tmp_path: Path) -> None:
    facts = FACTS[layout]
    overrides = build_dataset(layout, tmp_path / "data")
    params = tiny_params(base_params, layout, overrides)
    assert params["datasets"][layout]["root"] == overrides["root"]
    assert params["datasets"][layout]["layout"] == layout

    run = resolve(params)
    assert run.task == facts.task
    ws = Workspace(tmp_path)
    index = prepare(run, ws)
    assert ws.prepared.is_dir() and not (tmp_path / "data/prepared.partial").exists()
    meta = index.meta
    assert meta.name == layout and meta.extra["layout"] == layout and meta.extra["skipped"] == []
    assert meta.classes == facts.classes and meta.num_classes == len(facts.classes)
    assert meta.task == facts.task == ("multilabel" if layout in MULTILABEL else "multiclass")
    counts = {split: len(index.split(split)) for split in ("train", "val", "test")}
    assert all(counts.values()), counts
    assert counts["test"] == facts.test, counts  # the official test images, all of them, only them
    assert counts["train"] + counts["val"] == facts.train, counts  # val is carved from official train
    assert counts["val"] >= 1
    for record in index.records:
        assert (Path(meta.root) / record.path).is_file(), record.path
    if facts.task == "multilabel":
        assert all(r.label == -1 and r.positives for r in index.records)
        train_classes = Counter(c for r in index.split("train") for c in r.classes_present())
        assert set(train_classes) == set(range(meta.num_classes))
        assert {c for r in index.split("test") for c in r.positives} == set(range(meta.num_classes))
        if layout == "voc2007":  # the fixture marks some objects difficult: kept as positives, flagged
            assert any(r.difficult for r in index.records)
            assert all(set(r.difficult) <= set(r.positives) for r in index.records)
    else:
        assert {r.label for r in index.split("train")} == set(range(meta.num_classes))
        assert Counter(r.label for r in index.split("test")) == {c: facts.test_per_class
                                                                 for c in range(meta.num_classes)}

    for role, (result, n_params) in train_pipeline(run, ws).items():
        assert ws.checkpoint(role).is_file() and n_params > 0
        assert result.score_name == ("mAP" if facts.task == "multilabel" else "top1")
        assert 0.0 <= result.best_val_score <= 100.0

    checkpoint = Checkpoint.read(ws.checkpoint("distill"))
    evaluated = evaluate_checkpoint(run, index, checkpoint)
    checkpoint_meta = checkpoint.meta
    assert checkpoint_meta["role"] == "distill" and checkpoint_meta["classes"] == facts.classes
    assert checkpoint_meta["num_classes"] == len(facts.classes) and checkpoint_meta["input_size"] == 32
    assert len(evaluated.targets) == facts.test
    keys = ("mAP", "CF1") if facts.task == "multilabel" else ("top1", "top5")
    for key in keys:
        value = evaluated.metrics[key]
        assert not math.isnan(value) and 0.0 <= value <= 100.0, (key, value)
    if facts.task == "multilabel":
        assert tuple(evaluated.targets.shape) == (facts.test, len(facts.classes))
    else:
        assert evaluated.metrics["top1"] <= evaluated.metrics["top5"]
