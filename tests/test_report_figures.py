"""The default run's figures: a distilled student's KD term never shares the cross-entropy axis, the accuracy
points sit on an axis that spans the data (no bar cut off below), and each figure says it is one run."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from kdlib.report import plot_accuracy_bars, plot_training_curves


def test_training_curves_keep_each_objective_on_its_own_axis(tmp_path: Path) -> None:
    histories = {
        "teacher": {"train/loss": [2.0, 1.0], "train/ce": [2.0, 1.0], "train/top1": [50.0, 70.0], "val/top1": [60, 80]},
        "distill": {"train/loss": [30.0, 20.0], "train/ce": [1.5, 0.9], "train/kd": [300.0, 200.0], "val/top1": [70, 85]},
        "align-like": {"train/loss": [0.4, 0.3], "val/top1": [50, 55]},  # no CE term: its whole loss
    }
    lines = plot_training_curves(histories, tmp_path / "curves.png", "top1", "one run (n = 1): seed 0")
    assert lines["training cross-entropy (log scale)"] == ["teacher", "distill", "align-like"]
    assert lines["the student's distillation terms"] == ["distill: kd"]
    assert lines["validation top-1 (%)"] == ["teacher", "distill", "align-like"]
    assert Image.open(tmp_path / "curves.png").size[0] > 1000


def test_accuracy_points_span_the_data_and_say_n(tmp_path: Path) -> None:
    scores = {"teacher": {"best": 97.44, "last": 97.46}, "baseline": {"best": 95.79, "last": 95.82},
              "distill": {"best": 97.21, "last": 97.24}}
    low, high = plot_accuracy_bars(scores, tmp_path / "acc.png", "top1", "one run (n = 1): seed 0")
    assert low < 95.79 and high > 97.46 and high <= 100.0 and high - low < 5.0
    assert Image.open(tmp_path / "acc.png").size[1] > 100
