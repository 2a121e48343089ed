"""Checkpoints: the format, writing and reading.

A checkpoint file holds ``{"state_dict", "meta"}`` (and ``"method_state"`` when the method
fitted something, e.g. LSHFM's hyperplane bias, or trained parameters of its own beside the student,
``method_state["trained_parameters"]``: FitNet's regressor, ReviewKD's fusion modules), loadable with ``torch.load(...,
weights_only=True)``: no pickled code. ``meta`` is a :class:`ModelRecord` — what rebuilds the
model and where it came from — plus the ``epoch`` and ``val_score`` it was saved at.
:meth:`Checkpoint.read` reads one once; :meth:`Checkpoint.model` rebuilds the model from it.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from kdlib.features import FeatureStudent
from kdlib.io import disk_full_error, torch_saved_size
from kdlib.models import ModelSpec, build_model
from kdlib.outputs import OutputError, check_manifest


# kdlib does not know the pipeline; this names its convention (models/<stage>/{best,last}.pt)
REBUILD_HINT = "in the DVC pipeline: `dvc repro --force <stage>`, the stage being the checkpoint's folder name"

class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or not one of ours; the message names the file."""


@dataclass(frozen=True, kw_only=True)
class ModelRecord:
    """What rebuilds a trained model (architecture, classes, input) and where it came from
    (role, preset, data set, seed: informative, so they may be absent)."""

    role: str = ""
    preset: str = ""
    arch: str
    model_kwargs: dict[str, Any]
    num_classes: int
    in_chans: int
    classes: list[str]
    input_size: int
    mean: list[float]
    std: list[float]
    dataset: str = ""
    seed: int = 0
    feature_student: dict[str, Any] | None = None  # FeatureStudent.config() for feature methods

    @classmethod
    def for_model(cls, role: str, preset: str, spec: ModelSpec, data: Any, seed: int, model: nn.Module
                  ) -> "ModelRecord":
        """The record of ``model``, built from ``spec`` for the data set described by ``data``
        (a :class:`kdlib.data.index.DatasetMeta`)."""
        return cls(role=role, preset=preset, arch=spec.arch, model_kwargs=spec.model_kwargs,
                   num_classes=data.num_classes, in_chans=data.channels, classes=list(data.classes),
                   input_size=spec.input_size or data.image_size, mean=list(data.mean), std=list(data.std),
                   dataset=data.name, seed=seed,
                   feature_student=model.config() if isinstance(model, FeatureStudent) else None)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "ModelRecord":
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: meta[k] for k in names if k in meta})

    def as_meta(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def build(self) -> nn.Module:
        """The architecture with random weights (no download); a feature-mimicking student comes
        back as the :class:`~kdlib.features.FeatureStudent` it was trained as."""
        model = build_model(self.arch, self.num_classes, self.in_chans, pretrained=False, **self.model_kwargs)
        if self.feature_student:
            config = self.feature_student
            model = FeatureStudent(model, config["student_width"], config["teacher_width"], self.num_classes,
                                   config["project"])
        return model


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    record: ModelRecord
    meta: dict[str, Any]  # the record, epoch and val_score as stored
    state_dict: dict[str, torch.Tensor]
    method_state: dict[str, Any]

    @property
    def epoch(self) -> int:
        return int(self.meta["epoch"])

    @property
    def val_score(self) -> float:
        return float(self.meta["val_score"])

    @classmethod
    def read(cls, path: Path) -> "Checkpoint":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist; run the training that writes it first "
                                  f"({REBUILD_HINT})")
        try:  # a folder written by kdlib.outputs lists its files: best.pt beside a last.pt of another run fails
            check_manifest(path.parent, [path.name])
        except OutputError as err:
            raise CheckpointError(f"checkpoint {path}: {err}; rebuild it ({REBUILD_HINT})") from None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            meta = data["meta"]
            record = ModelRecord.from_meta(meta)
            state = data["state_dict"]
        except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, KeyError, TypeError) as err:
            raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); it is truncated "
                                  f"or not a kdlib checkpoint: delete it and re-run the training that "
                                  f"wrote it ({REBUILD_HINT})") from None
        return cls(path, record, meta, state, data.get("method_state", {}))

    def model(self) -> nn.Module:
        """The trained model, in eval mode."""
        model = self.record.build()
        model.load_state_dict(self.state_dict)
        return model.eval()


def save_checkpoint(path: Path, model: nn.Module, meta: Mapping[str, Any],
                    method_state: Mapping[str, Any] | None = None) -> None:
    """Write ``model``'s weights with ``meta`` (a :meth:`ModelRecord.as_meta` plus epoch and
    val_score) atomically: a temporary file renamed into place, never a half-written file. A full
    disk is an ``OSError(ENOSPC)`` naming ``path`` (:func:`kdlib.io.disk_full_error`), not torch's
    "unexpected pos"; the temporary file is removed on any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    content: dict[str, Any] = {"state_dict": state, "meta": dict(meta)}
    if method_state:
        content["method_state"] = dict(method_state)
    # torch.save names the records inside the zip after the file: a fixed temporary name keeps
    # the bytes reproducible (a per-process name would differ run to run)
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        torch.save(content, tmp)
        os.replace(tmp, path)
        return
    except BaseException as err:
        # judged before the temporary goes (its blocks count as free once it does); raised below,
        # outside this block, so that torch's failed writer (holding the file open) is released
        full = disk_full_error(path, tmp, err, lambda: torch_saved_size(content))
        tmp.unlink(missing_ok=True)
        if full is None:
            raise
    raise full


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The raw ``{"state_dict", "meta", ...}`` of a checkpoint (errors as :meth:`Checkpoint.read`)."""
    ckpt = Checkpoint.read(path)
    return {"state_dict": ckpt.state_dict, "meta": ckpt.meta, "method_state": ckpt.method_state}


def model_from_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """``(model in eval mode, meta)`` of the checkpoint at ``path``."""
    ckpt = Checkpoint.read(path)
    return ckpt.model(), ckpt.meta
