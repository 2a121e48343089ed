"""What a deployed classifier carries besides its graph: the contract between the export stage
(:mod:`kdlib.export`, which writes it) and :mod:`kdlib.predict` (which reads it).

An exported ONNX file holds it in its ``metadata_props`` (ONNX Runtime shows them as
``session.get_modelmeta().custom_metadata_map``), each value a JSON text, so one ``.onnx`` file
describes itself: ``kdlib.format``, ``kdlib.task``, ``kdlib.classes``, ``kdlib.preprocessing``
(:meth:`kdlib.data.preprocessing.Preprocessing.to_json`) and ``kdlib.source`` (the checkpoint it
came from). ``model.json`` beside the files holds the same under ``task``, ``classes`` and
``preprocessing``, plus what a file cannot hold about itself (its sha256 and size) and the test
scores of each file.
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
        preprocessing = Preprocessing.from_json(values.get("preprocessing"), where)
        source = values.get("source") or {}
        return cls(task, list(classes), preprocessing, source if isinstance(source, dict) else {})
