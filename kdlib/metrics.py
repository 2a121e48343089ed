"""Classification metrics on logits, and a full pass of a model over a loader."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kdlib.logline import PhaseLog


def topk_correct(logits: Tensor, targets: Tensor, ks: Sequence[int]) -> dict[int, int]:
    """Number of samples whose target is among the top-``k`` logits, for each ``k``
    (``k`` larger than the number of classes counts every sample).

    Equal logits rank by class index, lowest first: the rule of ``argmax`` (which top-1 agreement and
    the confusion matrix use) and of ``kdlib.predict``. ``Tensor.topk`` leaves ties in no stated order,
    and a quantized model's outputs take few distinct values, so ties happen: an int8 student with two
    classes at exactly the same logit was scored one way here and the other way by ``predict``."""
    max_k = min(max(ks), logits.shape[1])
    top = logits.sort(dim=1, descending=True, stable=True).indices[:, :max_k]
    hits = top.eq(targets.view(-1, 1))
    return {k: int(hits[:, : min(k, max_k)].any(dim=1).sum()) for k in ks}


def confusion_matrix(targets: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    """``cm[i, j]`` = number of samples of class ``i`` predicted as ``j``."""
    flat = targets.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


@dataclass
class EvalResult:
    loss: float
    top1: float  # NaN for multi-label data
    top5: float
    logits: Tensor
    targets: Tensor
    score: float = float("nan")  # what picks the best checkpoint: top-1, or mAP for multi-label
    metrics: dict[str, float] = field(default_factory=dict)  # headline metrics of the task, in %

    @property
    def predictions(self) -> Tensor:
        return self.logits.argmax(dim=1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    prepare: Callable[[Tensor], Tensor],
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    ignore: Tensor | None = None,
    ap_mode: str = "voc",
    multilabel_convention: str = "kdlib",
) -> EvalResult:
    """Loss and accuracy metrics (in %) of ``model`` over ``loader``.

    Single-label targets: cross-entropy, top-1, top-5. Multi-hot targets: BCE, mAP (``ap_mode``
    "voc" all-point interpolated or "coco" non-interpolated; ``ignore`` marks entries left out,
    e.g. VOC's difficult objects) and CP/CR/CF1/OP/OR/OF1 at probability 0.5, under
    ``multilabel_convention`` "kdlib" or "lshfm" (LSHFM's code's rules for a class without
    positives and a class never predicted: :mod:`kdlib.multilabel`, "Conventions").
    ``prepare`` turns a ``uint8`` batch into model input (normalization, memory format).
    """
    was_training = model.training
    model.eval()
    all_logits, all_targets = [], []
    phase = PhaseLog("evaluate", len(loader.dataset) if hasattr(loader.dataset, "__len__") else None)
    for images, targets, _ in loader:
        images = prepare(images.to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = model(images)
        all_logits.append(logits.float().cpu())
        all_targets.append(targets)
        phase.update(len(targets))
    model.train(was_training)
    logits, targets = torch.cat(all_logits), torch.cat(all_targets)
    if targets.ndim == 2:
        from kdlib.multilabel import mean_average_precision, threshold_metrics

        _, map_percent = mean_average_precision(logits, targets, ignore, mode=ap_mode,
                                                convention=multilabel_convention)
        metrics = {"mAP": map_percent, **threshold_metrics(torch.sigmoid(logits), targets, 0.5, ignore=ignore,
                                                           convention=multilabel_convention)}
        return EvalResult(float(F.binary_cross_entropy_with_logits(logits, targets)), float("nan"),
                          float("nan"), logits, targets, map_percent, metrics)
    hits = topk_correct(logits, targets, (1, 5))
    n = max(len(targets), 1)
    top1, top5 = 100.0 * hits[1] / n, 100.0 * hits[5] / n
    return EvalResult(float(F.cross_entropy(logits, targets)), top1, top5, logits, targets, top1,
                      {"top1": top1, "top5": top5})


def evaluate_dataset(model: nn.Module, dataset: Any, mean: Sequence[float], std: Sequence[float], batch_size: int,
                     device: torch.device, ap_mode: str = "voc", multilabel_convention: str = "kdlib") -> EvalResult:
    """:func:`evaluate` of ``model`` over every image of ``dataset`` (an
    :class:`~kdlib.data.dataset.IndexedImageDataset`), normalized with ``mean``/``std``, in float32."""
    from kdlib.data.transforms import BatchNormalizer
    from kdlib.runtime import Runtime, make_loader

    loader = make_loader(dataset, batch_size, False, 0, Runtime(device))
    normalizer = BatchNormalizer(mean, std).to(device)
    return evaluate(model.to(device), loader, normalizer, device, None, dataset.ignore, ap_mode, multilabel_convention)


def fidelity(teacher_logits: Tensor, student_logits: Tensor) -> dict[str, float]:
    """How closely a student matches its teacher on the same images (Stanton et al., "Does Knowledge
    Distillation Really Work?", NeurIPS 2021): not whether either is right, but whether they agree.

    Single-label (``[N, C]`` logits of ``softmax`` models):
    ``agreement = 100 / N · Σ_i 1[argmax t_i = argmax s_i]`` (%, top-1 agreement) and
    ``kl = 1 / N · Σ_i Σ_c p_t(c|i) (log p_t(c|i) − log p_s(c|i))`` with ``p = softmax(logits)`` at
    temperature 1 (nats; the paper's mean KL(teacher ‖ student) on the test set).
    Multi-label models: :func:`multilabel_fidelity`.
    """
    t, s = teacher_logits.double(), student_logits.double()
    if t.shape != s.shape:
        raise ValueError(f"teacher logits {tuple(t.shape)} and student logits {tuple(s.shape)} differ in shape")
    return {"agreement": 100.0 * float((t.argmax(1) == s.argmax(1)).double().mean()),
            "kl": float((F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1).mean())}


def multilabel_fidelity(teacher_logits: Tensor, student_logits: Tensor) -> dict[str, float]:
    """:func:`fidelity` for independent sigmoids: agreement of every thresholded (``p > 0.5``) label
    (%), and ``kl = mean over images and labels of p_t log(p_t/p_s) + (1−p_t) log((1−p_t)/(1−p_s))``."""
    t, s = teacher_logits.double(), student_logits.double()
    if t.shape != s.shape:
        raise ValueError(f"teacher logits {tuple(t.shape)} and student logits {tuple(s.shape)} differ in shape")
    log_pt, log_1pt, log_ps, log_1ps = F.logsigmoid(t), F.logsigmoid(-t), F.logsigmoid(s), F.logsigmoid(-s)
    kl = log_pt.exp() * (log_pt - log_ps) + log_1pt.exp() * (log_1pt - log_1ps)
    return {"agreement": 100.0 * float(((t > 0) == (s > 0)).double().mean()), "kl": float(kl.mean())}


def confusion_outputs(result: EvalResult, classes: list[str], multilabel: bool
                      ) -> tuple[list[dict[str, str]], list[list[int]] | None]:
    """(actual/predicted name pairs for DVC's confusion template, the confusion matrix) of a single-label
    result; ``([], None)`` for multi-label data, where an image has no one label."""
    if multilabel:
        return [], None
    pairs = [{"actual": classes[a], "predicted": classes[p]}
             for a, p in zip(result.targets.tolist(), result.predictions.tolist())]
    return pairs, confusion_matrix(result.targets, result.predictions, len(classes)).tolist()
