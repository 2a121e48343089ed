"""Checkpoints: a state dict plus the metadata that rebuilds the model, loadable with
``torch.load(..., weights_only=True)`` (no pickled code)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlib.features import FeatureStudent
from kdlib.models import build_model


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write atomically (temp file + rename), so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"state_dict": state, "meta": meta}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def model_from_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model recorded in ``meta`` (random init, no download) and load its weights.

    A feature-mimicking student (``meta["feature_student"]``) comes back as the
    :class:`~kdlib.features.FeatureStudent` it was trained as; its ``forward`` returns logits.
    """
    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    model = build_model(
        meta["arch"], meta["num_classes"], meta["in_chans"], pretrained=False, **meta.get("model_kwargs", {})
    )
    if meta.get("feature_student"):
        config = meta["feature_student"]
        model = FeatureStudent(model, config["student_width"], config["teacher_width"], meta["num_classes"],
                               config["project"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, meta
