"""What a deployed classifier carries besides its graph: the contract between the export stage
(:mod:`kdlib.export`, which writes it) and :mod:`kdlib.predict` (which reads it).

An exported ONNX file holds it in its ``metadata_props`` (ONNX Runtime shows them as
``session.get_modelmeta().custom_metadata_map``), each value a JSON text, so one ``.onnx`` file
describes itself: ``kdlib.format``, ``kdlib.task``, ``kdlib.classes``, ``kdlib.preprocessing``
(:meth:`kdlib.data.preprocessing.Preprocessing.to_json`) and ``kdlib.source`` (the checkpoint it
came from). ``model.json`` beside the files holds the same under ``task``, ``classes`` and
``preprocessing``, plus what a file cannot hold about itself (its sha256 and size) and the test
scores of each file. Every size they set is bounded (:data:`INPUT_SIZE_RANGE`,
:data:`SHORT_SIDE_RANGE`, :data:`CLASSES_RANGE`) before anything is allocated from it: the files
are input, and a crafted one must be refused, not obeyed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from kdlib.data.preprocessing import Preprocessing

FORMAT = 1
PREFIX = "kdlib."
TASKS = {"multiclass": "softmax", "multilabel": "sigmoid"}  # task → how logits become probabilities
REQUIRED_KEYS = ("format", "task", "classes", "preprocessing")

# Bounds on every size a model's metadata (or model.json) sets, checked before anything is
# allocated from it: a crafted ``input_size`` made predict allocate 3 GB in 12 s. Each is far
# above what a real classifier uses and far below what would exhaust a machine.
# input_size: the largest classifiers take 448-800 px (EVA-02, EfficientNet-L2); at 1024 a batch of
# 64 RGB images is 800 MB of float32.
INPUT_SIZE_RANGE = (8, 1024)  # 8: the smallest image_size / input_size the params schema accepts
# The resize before the center crop (round(input_size / eval_crop_pct)) and the reduced JPEG decode
# (decode_short_side): shorter sides; an image's longer side follows its aspect ratio, which
# kdlib.predict bounds per image (MAX_IMAGE_PIXELS).
SHORT_SIDE_RANGE = (1, 4096)
# ImageNet-21k has 21,841 classes: one logit per class name, and the output must hold them.
CLASSES_RANGE = (1, 100_000)


def _check_range(where: str, key: str, value: Any, bounds: tuple[int, int], why: str = "") -> None:
    """``ValueError`` naming ``where``, ``key``, ``value`` and the allowed range unless ``value`` is
    an integer in ``bounds`` (inclusive); ``why`` says what the value governs."""
    low, high = bounds
    if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
        raise ValueError(f"{where}: {key} = {str(value)[:40]}; expected an integer in [{low}, {high}]"
                         + (f" ({why})" if why else ""))


@dataclass(frozen=True)
class ModelInfo:
    """The classes a model's logits stand for, its task and the preprocessing of its input."""

    task: str
    classes: list[str]
    preprocessing: Preprocessing
    source: dict[str, Any] = field(default_factory=dict)  # informative: preset, arch, epoch, ...

    @property
    def activation(self) -> str:
        return TASKS[self.task]

    def metadata_props(self) -> dict[str, str]:
        """The ONNX ``metadata_props`` entries, ``kdlib.<key>`` → JSON text."""
        values = {"format": FORMAT, "task": self.task, "classes": self.classes,
                  "preprocessing": self.preprocessing.to_json(), "source": self.source}
        return {PREFIX + key: json.dumps(value, sort_keys=True) for key, value in values.items()}

    @classmethod
    def from_metadata_props(cls, props: Mapping[str, str], where: str) -> "ModelInfo | None":
        """The info in an ONNX file's metadata; None when it has no ``kdlib.`` entry at all (a
        model not exported by kdlib); ``ValueError`` naming ``where`` when the entries are broken."""
        ours = {key[len(PREFIX):]: text for key, text in props.items() if key.startswith(PREFIX)}
        if not ours:
            return None
        values = {}
        for key, text in ours.items():
            try:
                values[key] = json.loads(text)
            except ValueError:
                raise ValueError(f"{where}: metadata {PREFIX}{key} is not JSON ({text[:80]!r})") from None
        missing = [PREFIX + key for key in REQUIRED_KEYS if key not in values]
        if missing:
            raise ValueError(f"{where}: metadata lacks {', '.join(missing)}; expected every one of "
                             f"{', '.join(PREFIX + k for k in REQUIRED_KEYS)} (export the model again)")
        return cls.from_json(values, f"{where} (metadata)")

    @classmethod
    def from_json(cls, values: Any, where: str) -> "ModelInfo":
        """From a mapping with ``task``, ``classes``, ``preprocessing`` (and ``format`` when it is
        metadata); ``ValueError`` naming ``where`` and the key that is wrong."""
        if not isinstance(values, dict):
            raise ValueError(f"{where}: {type(values).__name__}; expected a JSON object")
        if "format" in values and values["format"] != FORMAT:
            raise ValueError(f"{where}: format {values['format']!r}; expected {FORMAT} (export the model again)")
        task, classes = values.get("task"), values.get("classes")
        if task not in TASKS:
            raise ValueError(f"{where}: task = {task!r}; expected one of: {', '.join(TASKS)}")
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
            raise ValueError(f"{where}: classes = {str(classes)[:80]}; expected a non-empty list of class names")
        if len(classes) > CLASSES_RANGE[1]:
            raise ValueError(f"{where}: classes has {len(classes):,} names; expected at most {CLASSES_RANGE[1]} "
                             "(one logit per class)")
        cls._check_sizes(values.get("preprocessing"), where)
        preprocessing = Preprocessing.from_json(values.get("preprocessing"), where)
        source = values.get("source") or {}
        return cls(task, list(classes), preprocessing, source if isinstance(source, dict) else {})

    @staticmethod
    def _check_sizes(pre: Any, where: str) -> None:
        """Every size in the ``preprocessing`` mapping within its bound (:data:`INPUT_SIZE_RANGE`,
        :data:`SHORT_SIDE_RANGE`), before :class:`Preprocessing` or anything else allocates from
        them; the other fields are checked by :meth:`Preprocessing.from_json`."""
        if not isinstance(pre, dict):
            return  # Preprocessing.from_json names what is wrong with it
        _check_range(where, "preprocessing.input_size", pre.get("input_size"), INPUT_SIZE_RANGE,
                     "the model's input is input_size x input_size")
        if pre.get("decode_short_side") is not None:
            _check_range(where, "preprocessing.decode_short_side", pre["decode_short_side"], SHORT_SIDE_RANGE,
                         "the shorter side a JPEG is decoded at")
        crop = pre.get("eval_crop_pct")
        if isinstance(crop, (int, float)) and not isinstance(crop, bool) and 0 < crop <= 1:
            side = round(pre["input_size"] / crop)
            if side > SHORT_SIDE_RANGE[1]:
                raise ValueError(f"{where}: preprocessing.eval_crop_pct = {crop!r} with input_size "
                                 f"{pre['input_size']} resizes the shorter side to {side:,} px; expected "
                                 f"eval_crop_pct >= {pre['input_size'] / SHORT_SIDE_RANGE[1]:.4g} (a resize to at "
                                 f"most {SHORT_SIDE_RANGE[1]} px)")
