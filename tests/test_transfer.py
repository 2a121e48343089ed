"""Transfer sets that leave classes out, and the output-bias correction (Hinton, Vinyals & Dean 2015 §3):
the settings, which images the distilled student trains on (a left-out class is in no training batch),
and the correction, applied at evaluation only, on hand-computed logits."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from kdlib.data.index import DatasetIndex, DatasetMeta, Record
from kdlib.schema import SchemaError, parse
from kdlib.transfer import (SHIFT_GRID, TransferSettings, choose_shift, error_counts, kept_classes, shifted,
                            transfer_index)
from stages.params import read_params, resolve

REPO = Path(__file__).resolve().parents[1]
CLASSES = [str(d) for d in range(10)]


def toy_index() -> DatasetIndex:
    """Three training, one validation and one test image of each of MNIST's ten classes."""
    records = [Record(f"{split}/{c}_{i}.png", c, split, md5=f"{split}{c}{i}")
               for c in range(10) for split, n in (("train", 3), ("val", 1), ("test", 1)) for i in range(n)]
    return DatasetIndex(DatasetMeta("mnist", ".", CLASSES, 1, 28, [0.5], [0.25]), records)


def settings(**values) -> TransferSettings:
    return parse(TransferSettings, {"exclude_classes": [], "only_classes": None, "bias_shift": None, **values})


# ---------------------------------------------------------------- which images the student trains on
def test_excluding_a_class_removes_its_training_images_only() -> None:
    index = toy_index()
    reduced, absent = transfer_index(index, settings(exclude_classes=[3]))
    assert absent == [3]
    assert {r.label for r in reduced.split("train")} == set(range(10)) - {3}
    assert len(reduced.split("train")) == 27
    assert reduced.split("val") == index.split("val") and reduced.split("test") == index.split("test")


def test_only_classes_keeps_those_and_names_and_indices_agree() -> None:
    by_index = transfer_index(toy_index(), settings(only_classes=[7, 8]))
    by_name = transfer_index(toy_index(), settings(only_classes=["8", "7"]))
    assert by_index == by_name
    assert by_index[1] == [0, 1, 2, 3, 4, 5, 6, 9]
    assert {r.label for r in by_index[0].split("train")} == {7, 8}


def test_every_class_kept_is_the_index_itself() -> None:
    index = toy_index()
    assert transfer_index(index, settings()) == (index, [])


@pytest.mark.parametrize(("values", "message"), [
    ({"exclude_classes": ["11"]}, r"distill.transfer.exclude_classes = '11': not a class of the data set; expected "
                                  r"a name or an index in \[0, 9\] \(classes: 0, 1, 2"),
    ({"only_classes": [10]}, r"distill.transfer.only_classes = 10: not a class"),
    ({"exclude_classes": list(range(10))}, r"the transfer set keeps no class of the data set's 10"),
])
def test_a_bad_class_names_the_key_and_the_classes(values, message) -> None:
    with pytest.raises(ValueError, match=message):
        kept_classes(settings(**values), CLASSES)


@pytest.mark.parametrize(("values", "message"), [
    ({"exclude_classes": [3], "only_classes": [7]}, "expected exclude_classes or only_classes, not both"),
    ({"bias_shift": 3.5}, "bias_shift = 3.5: expected null: every class is in the transfer set"),
    ({"exclude_classes": [3], "bias_shift": "best"}, "expected null, `val` (chosen on the validation split) or a"),
    ({"exclude_classes": [3, 3]}, "expected a list of distinct class names or indices"),
])
def test_bad_settings_are_refused(values, message) -> None:
    with pytest.raises(SchemaError, match=message.replace("(", r"\(").replace(")", r"\)").replace("`", "`")):
        settings(**values)


def test_params_hold_the_transfer_section() -> None:
    params = read_params(REPO / "params.yaml")
    assert resolve(params).params.transfer == settings()
    changed = copy.deepcopy(params)
    changed["distill"]["transfer"].update(exclude_classes=[3], bias_shift="val")
    run = resolve(changed)
    assert run.params.transfer.exclude_classes == [3] and run.params.transfer.bias_shift == "val"
    index = toy_index()
    assert run.training_index(index, "teacher") is index and run.training_index(index, "baseline") is index
    assert 3 not in {r.label for r in run.training_index(index, "distill").split("train")}
    # the teacher cache of a transfer set is keyed by its classes (and an unrestricted one as before)
    key = run.teacher_cache_key(REPO / "params.yaml", [REPO / "dvc.yaml"], index)
    plain = resolve(params).teacher_cache_key(REPO / "params.yaml", [REPO / "dvc.yaml"], index)
    assert '"transfer_classes":[0,1,2,4,5,6,7,8,9]' in key["transform"] and "transfer_classes" not in plain["transform"]
    del changed["distill"]["transfer"]
    with pytest.raises(Exception, match=r"distill.transfer: missing section"):
        resolve(changed)


def test_a_left_out_class_is_in_no_training_batch() -> None:
    """Through the loader the student trains with: not one image of class 3 in any batch of any epoch."""
    from PIL import Image

    from kdlib.data import IndexedImageDataset
    from kdlib.data.views import AugmentedViews, make_view_seeds
    from kdlib.runtime import Runtime, make_loader

    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        index = toy_index()
        for r in index.records:
            (root / r.path).parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (28, 28), color=r.label * 20).save(root / r.path)
        reduced, _ = transfer_index(index, settings(exclude_classes=["3"]))
        train = IndexedImageDataset(root, reduced.split("train"), 1, None, preload=True)
        views = AugmentedViews(train, make_view_seeds(0, len(train), 2))
        loader = make_loader(views, 4, True, 0, Runtime(), 0)
        seen = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            for _, targets, _, _ in loader:
                seen += targets.tolist()
    assert len(seen) == 2 * 27 and 3 not in seen and set(seen) == set(range(10)) - {3}


# ---------------------------------------------------------------- the bias correction
LOGITS = torch.tensor([[2.0, 1.0, 0.0],   # target 0: right; wrong once class 2 gains more than 2.0
                       [1.0, 0.0, 0.5],   # target 2 (absent): wrong by 0.5
                       [0.0, 3.0, 1.0],   # target 1: right; wrong once class 2 gains more than 2.0
                       [0.2, 0.0, 0.0]])  # target 2 (absent): wrong by 0.2
TARGETS = torch.tensor([0, 2, 1, 2])


def test_error_counts_by_hand() -> None:
    assert error_counts(LOGITS, TARGETS, [2]) == {"images": 4, "errors": 2, "absent_images": 2, "absent_errors": 2}
    assert error_counts(LOGITS, TARGETS, []) == {"images": 4, "errors": 2, "absent_images": 0, "absent_errors": 0}


def test_a_shift_raises_only_the_absent_classes() -> None:
    out = shifted(LOGITS, [2], 0.6)
    assert torch.equal(out[:, :2], LOGITS[:, :2]) and torch.allclose(out[:, 2], LOGITS[:, 2] + 0.6)
    assert torch.equal(LOGITS[1], torch.tensor([1.0, 0.0, 0.5]))  # a copy: the logits are untouched
    # raising class 2 by 0.6 fixes both of its images (0.5 + 0.6 > 1.0; 0.6 > 0.2) and breaks nothing
    assert error_counts(out, TARGETS, [2])["errors"] == 0
    # by 2.5 it also takes images 0 (0 + 2.5 > 2.0) and 2 (1.0 + 2.5 > 3.0) from the right classes
    assert error_counts(shifted(LOGITS, [2], 2.5), TARGETS, [2]) == {"images": 4, "errors": 2, "absent_images": 2,
                                                                        "absent_errors": 0}


def test_lowering_the_kept_classes_is_raising_the_absent_ones() -> None:
    """The paper lowers the 7 and 8 biases; a softmax ranks the same after a common offset."""
    lowered = LOGITS.clone()
    lowered[:, :2] -= 0.6
    assert torch.equal(lowered.argmax(1), shifted(LOGITS, [2], 0.6).argmax(1))


def test_the_chosen_shift_is_the_smallest_with_the_fewest_errors() -> None:
    # shifts in (0.5, 2.0] fix both absent images without breaking image 2: the smallest on the grid is 0.6
    assert choose_shift(LOGITS, TARGETS, [2]) == 0.6
    assert choose_shift(LOGITS, TARGETS, [2], grid=[3.0, 1.0, 0.0]) == 1.0
    # nothing to gain: no shift
    right = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert choose_shift(right, torch.tensor([0, 1]), [1]) == 0.0
    assert 3.5 in SHIFT_GRID and 7.6 in SHIFT_GRID and -7.6 in SHIFT_GRID


def test_the_report_carries_the_transfer_errors_into_summary_json() -> None:
    """What a study reads (summary.json's models.distill) holds the counts evaluate made."""
    from kdlib.report import model_record

    counts = {"images": 10000, "errors": 206, "absent_images": 1010, "absent_errors": 133, "bias_shift": 3.5,
              "bias_shift_from": "fixed", "corrected_errors": 109, "corrected_absent_errors": 14}
    evaluation = {"preset": "hinton_student", "arch": "mlp", "params": 1, "checkpoint_bytes": 1,
                  "transfer_absent_classes": ["3"],
                  "best": {"top1": 97.94, "top5": 99.9, "epoch": 3, "transfer": counts},
                  "last": {"top1": 97.9, "top5": 99.9, "epoch": 4, "transfer": counts}}
    record = model_record(evaluation, {"params": 1}, "top1")
    assert record["transfer_absent_classes"] == ["3"] and record["best"]["transfer"] == counts
    del evaluation["transfer_absent_classes"], evaluation["best"]["transfer"], evaluation["last"]["transfer"]
    assert "transfer" not in model_record(evaluation, {"params": 1}, "top1")["best"]


def test_a_study_row_gathers_the_transfer_errors_over_seeds(tmp_path: Path) -> None:
    """The study table's row (summary.json) of a transfer-set cell: errors overall and on the absent class
    before and after the shift, mean ± std over seeds, and each seed's own counts."""
    from kdlib.study.spec import load_study
    from kdlib.study.table import study_rows
    from tests.test_study import record, write_study

    study = load_study(write_study(tmp_path, "seeds: [0, 1]\nset: {distill.transfer.exclude_classes: [3], "
                                             "distill.transfer.bias_shift: 3.5}\ngrid: {distill.kd.temperature: [20.0]}\n"))
    records = []
    for seed, (errors, absent, corrected, corrected_absent) in enumerate([(206, 133, 109, 14), (210, 130, 111, 16)]):
        r = record(study, {"distill.kd.temperature": 20.0}, seed, 99.3, 98.5, 97.9)
        r.summary["models"]["distill"]["best"]["transfer"] = {
            "images": 10000, "errors": errors, "absent_images": 1010, "absent_errors": absent, "bias_shift": 3.5,
            "bias_shift_from": "fixed", "corrected_errors": corrected, "corrected_absent_errors": corrected_absent}
        records.append(r)
    row, = study_rows(study, records)
    assert row["distill_transfer_set"] == {"exclude_classes": [3]} and row["distill_transfer_absent_images"] == 1010
    assert row["distill_best_transfer_errors"]["mean"] == 208.0 and row["distill_best_transfer_errors"]["n"] == 2
    assert row["distill_best_transfer_corrected_absent_errors"]["mean"] == 15.0
    assert row["per_seed"][1]["distill_best_transfer"]["corrected_errors"] == 111
    plain, = study_rows(study, [record(study, {"distill.kd.temperature": 20.0}, 0, 99.3, 98.5, 97.9)])
    assert not any(key.startswith("distill_transfer") or "transfer" in key for key in plain)
