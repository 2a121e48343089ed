"""Top-k counts and the confusion matrix on hand-checked examples."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from kdlib.metrics import confusion_matrix, evaluate, topk_correct

# Rows ranked by logit (best first):
#   0: [2, 0, 1, 3]   target 2 → top-1 hit
#   1: [3, 1, 0, 2]   target 1 → top-2 hit
#   2: [0, 3, 2, 1]   target 2 → top-3 hit
#   3: [1, 2, 3, 0]   target 0 → only top-4
#   4: [3, 0, 1, 2]   target 3 → top-1 hit
LOGITS = torch.tensor(
    [
        [0.5, 0.1, 3.0, -1.0],
        [0.2, 1.0, -2.0, 4.0],
        [5.0, -1.0, 1.0, 2.0],
        [-3.0, 2.0, 1.5, 0.0],
        [0.3, 0.2, 0.1, 0.9],
    ]
)
TARGETS = torch.tensor([2, 1, 2, 0, 3])


def test_topk_correct_hand_example() -> None:
    assert topk_correct(LOGITS, TARGETS, (1, 2, 3, 4)) == {1: 2, 2: 3, 3: 4, 4: 5}


def test_topk_k_larger_than_classes_counts_every_sample() -> None:
    assert topk_correct(LOGITS, TARGETS, (1, 5)) == {1: 2, 5: 5}
    assert topk_correct(LOGITS[:, :3], torch.tensor([2, 1, 2, 0, 0]), (5, 10)) == {5: 5, 10: 5}


def test_topk_order_of_ks_does_not_matter() -> None:
    assert topk_correct(LOGITS, TARGETS, (3, 1)) == {3: 4, 1: 2}


def test_confusion_matrix_hand_example() -> None:
    targets = torch.tensor([0, 0, 1, 2, 2, 2])
    predictions = torch.tensor([0, 1, 1, 2, 0, 2])
    expected = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    cm = confusion_matrix(targets, predictions, 3)
    assert torch.equal(cm, expected)
    assert cm.sum() == 6 and torch.trace(cm) == 4


def test_confusion_matrix_keeps_absent_classes() -> None:
    cm = confusion_matrix(torch.tensor([1]), torch.tensor([1]), 4)
    assert cm.shape == (4, 4)
    assert cm[1, 1] == 1 and cm.sum() == 1


def test_evaluate_on_fixed_logits() -> None:
    """A model that returns the fixed LOGITS: top-1 40 %, top-5 100 %, loss = mean CE."""
    model = torch.nn.Identity()
    data = TensorDataset(LOGITS, TARGETS, torch.arange(5))
    result = evaluate(model, DataLoader(data, batch_size=2), lambda x: x, torch.device("cpu"))
    assert result.top1 == 40.0 and result.top5 == 100.0
    assert abs(result.loss - float(torch.nn.functional.cross_entropy(LOGITS, TARGETS))) < 1e-6
    assert torch.equal(result.predictions, torch.tensor([2, 3, 0, 1, 3]))


def test_equal_logits_rank_by_class_index_as_argmax_does() -> None:
    # an int8 student's logits for one MNIST test image (classes 3 and 5 exactly equal); Tensor.topk
    # ranked 5 first, argmax and kdlib.predict's stable argsort pick 3
    row = torch.tensor([[-1.5248405, -2.3635027, 0.22872606, 1.2198724, -0.83866227,
                         1.2198724, -1.2961143, 0.64805716, -0.64805716, -0.6099362]])
    assert int(row.argmax(1)) == 3
    assert topk_correct(row, torch.tensor([3]), (1, 2)) == {1: 1, 2: 1}
    assert topk_correct(row, torch.tensor([5]), (1, 2)) == {1: 0, 2: 1}
    ties = torch.tensor([[0.0, 1.0, 1.0, 1.0], [2.0, 2.0, 0.0, 2.0]])
    for target, expected in ((1, {1: 1, 2: 1}), (2, {1: 0, 2: 1}), (3, {1: 0, 2: 0})):
        assert topk_correct(ties[:1], torch.tensor([target]), (1, 2)) == expected
    assert topk_correct(ties[1:], torch.tensor([0]), (1,)) == {1: 1}
    assert topk_correct(ties[1:], torch.tensor([3]), (1, 2, 3)) == {1: 0, 2: 0, 3: 1}
