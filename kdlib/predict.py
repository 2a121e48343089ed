"""Classify image files with an exported model: ``python -m kdlib.predict MODEL IMAGE... [--topk K] [--json]``.

``MODEL`` is an ONNX file written by the export stage (``models/export/student_fp32.onnx`` or
``student_int8.onnx``); it runs on ONNX Runtime's CPU provider. The classes, the task and the
preprocessing come from the file's metadata (:class:`kdlib.deployed.ModelInfo`), or, for a file
without it, from a ``model.json`` beside it that lists the file. Each image is decoded and
resized exactly as evaluation did (:class:`kdlib.data.preprocessing.Preprocessing`: the same
functions), and the logits become probabilities by softmax (single-label) or per-class sigmoid
(multi-label). A missing, corrupt or foreign model, or an unreadable image, is one line naming
the file and what was expected, and exit status 2. Both are untrusted input: the sizes a model's
metadata sets are bounded (:mod:`kdlib.deployed`), and so is the number of pixels an image may
decode or be resized to (:data:`MAX_IMAGE_PIXELS`), checked from its header before decoding it.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from kdlib.deployed import PREFIX, REQUIRED_KEYS, ModelInfo

MODEL_JSON = "model.json"  # kdlib.export.MODEL_JSON (not imported: that module imports every precision)
# Images per ONNX Runtime call, in order: the export stage scores its files in the same batches, because
# int8 kernels may round differently for a different batch shape on some CPUs (one of 70 test images
# changed class), and model.json's scores must be what this tool gives on the same images.
BATCH = 64
# The most pixels an image may have, and the most its evaluation resize may make of it (a 1 x 50,000
# PNG of a few hundred bytes, its shorter side resized to 256 px, is 256 x 12,800,000 pixels: 9.8 GB
# in RGB). PIL's default Image.MAX_IMAGE_PIXELS (2**30 // 4 // 3: 256 MiB of RGB), above which PIL
# only warns, up to twice that; fixed here, so that a caller raising or disabling PIL's limit does
# not lift this tool's.
MAX_IMAGE_PIXELS = 89_478_485


class PredictError(ValueError):
    """A model or image that cannot be used; the message names the file and what was expected."""


@dataclass(frozen=True)
class ClassScore:
    name: str
    index: int
    probability: float


@dataclass(frozen=True)
class ImagePrediction:
    """The ``topk`` most probable classes of one image, most probable first."""

    image: str
    top: list[ClassScore]

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "top": [{"class": c.name, "index": c.index, "probability": c.probability}
                                             for c in self.top]}


def _session(path: Path, threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's own warnings are not this tool's output
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - ORT raises its own pybind types for unreadable files
        raise PredictError(f"{path}: ONNX Runtime cannot load it ({_ort_reason(err)}); expected an ONNX model "
                           "file, e.g. models/export/student_fp32.onnx: it is truncated, corrupt or not ONNX") from None


def _one_line(err: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none), at most 300 characters."""
    return (" ".join(str(err).split()) or type(err).__name__)[:300]


def _ort_reason(err: Exception) -> str:
    """ORT's message without its prefix, the path again and the C++ source location:
    ``[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from X failed:Protobuf parsing failed.``
    becomes ``INVALID_PROTOBUF: Protobuf parsing failed.``"""
    text = " ".join(str(err).split()) or type(err).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : (\w+) : ", r"\1: ", text)
    text = re.sub(r"Load model from .*? failed: ?", "", text, count=1)
    text = re.sub(r"/\S*onnxruntime_src/\S+ \S+?\(.*?\) ", "", text, count=1)
    return text[:300]


def model_info(path: Path, metadata: dict[str, str]) -> ModelInfo:
    """The model's :class:`ModelInfo` from its ``metadata`` (ONNX ``metadata_props``), else from
    the ``model.json`` beside ``path`` when that lists the file."""
    try:
        info = ModelInfo.from_metadata_props(metadata, str(path))
    except ValueError as err:
        raise PredictError(str(err)) from None
    if info is not None:
        return info
    card_path = path.parent / MODEL_JSON
    card: Any = None
    if card_path.is_file():
        try:
            card = json.loads(card_path.read_text())
        except (ValueError, OSError) as err:
            raise PredictError(f"{card_path}: not readable JSON ({err}); expected the model.json the export "
                               f"stage writes beside {path.name}") from None
    if not (isinstance(card, dict) and isinstance(card.get("files"), dict) and path.name in card["files"]):
        raise PredictError(f"{path}: an ONNX model without kdlib metadata (none of "
                           f"{', '.join(PREFIX + k for k in REQUIRED_KEYS)} in its metadata_props) and no "
                           f"{MODEL_JSON} beside it that lists {path.name!r}; expected a model written by the export "
                           "stage (models/export/student_fp32.onnx or student_int8.onnx)")
    try:
        return ModelInfo.from_json(card, str(card_path))
    except ValueError as err:
        raise PredictError(str(err)) from None


class Predictor:
    """One loaded model: :meth:`predict` classifies image files."""

    def __init__(self, model_path: Path, threads: int | None = None) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise PredictError(f"{path}: {'is a folder' if path.is_dir() else 'no such file'}; expected an ONNX "
                               "model file written by the export stage, e.g. models/export/student_fp32.onnx")
        self.path = path
        self.session = _session(path, threads)
        self.info = model_info(path, dict(self.session.get_modelmeta().custom_metadata_map))
        self.input = self.session.get_inputs()[0]
        self._check_signature()
        self.normalize = self.info.preprocessing.normalizer()

    def _check_signature(self) -> None:
        """The graph takes what the preprocessing makes and gives one logit per class."""
        pre, inputs, outputs = self.info.preprocessing, self.session.get_inputs(), self.session.get_outputs()
        wanted = (pre.channels, pre.input_size, pre.input_size)
        shape = list(self.input.shape)
        fixed = [(have, want) for have, want in zip(shape[1:], wanted) if isinstance(have, int)]
        if len(inputs) != 1 or len(shape) != 4 or any(have != want for have, want in fixed):
            raise PredictError(f"{self.path}: takes {[(i.name, i.shape) for i in inputs]}; expected one input of "
                               f"shape [batch, {', '.join(map(str, wanted))}], what its preprocessing makes")
        out = outputs[0].shape
        if len(out) != 2 or (isinstance(out[1], int) and out[1] != len(self.info.classes)):
            raise PredictError(f"{self.path}: output {outputs[0].name} has shape {out}; expected "
                               f"[batch, {len(self.info.classes)}], one logit per class name")

    def load_image(self, image: Path) -> torch.Tensor:
        """``image`` as the ``uint8`` tensor evaluation feeds; :class:`PredictError` naming it otherwise.

        Its size is read from the header first and refused above :data:`MAX_IMAGE_PIXELS`, decoded
        or after the resize (:meth:`_check_dimensions`); PIL's decompression-bomb warning is an
        error here whatever the warning filters say, so nothing large is ever decoded."""
        path = Path(image)
        if not path.is_file():
            raise PredictError(f"{path}: {'is a folder' if path.is_dir() else 'no such file'}; expected an "
                               "image file (PNG, JPEG, ...)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                with Image.open(path) as header:
                    width, height = header.size
                self._check_dimensions(path, width, height)
                return self.info.preprocessing.load(path)
            except PredictError:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
                raise PredictError(f"{path}: refused by PIL as a possible decompression bomb ({_one_line(err)}); "
                                   f"expected an image of at most {MAX_IMAGE_PIXELS:,} pixels") from None
            except Exception as err:  # noqa: BLE001 - PIL's decoders raise OSError, SyntaxError, EOFError,
                # struct.error, ValueError, IndexError... on a corrupt file: each is the file's fault, not a bug
                why = _one_line(err).removeprefix(f"cannot decode image {path}: ")
                raise PredictError(f"{path}: cannot read it as an image ({why}); expected an image file PIL "
                                   "decodes (PNG, JPEG, ...)") from None

    def _check_dimensions(self, path: Path, width: int, height: int) -> None:
        """Refuse a ``width x height`` image whose decode, or whose evaluation resize (shorter side
        to ``resize_short_side``, the longer in proportion), would exceed :data:`MAX_IMAGE_PIXELS`."""
        pixels = width * height
        if pixels > MAX_IMAGE_PIXELS or min(width, height) < 1:
            raise PredictError(f"{path}: {width}x{height} pixels ({pixels:,}); expected an image of 1 to "
                               f"{MAX_IMAGE_PIXELS:,} pixels (kdlib.predict.MAX_IMAGE_PIXELS)")
        pre = self.info.preprocessing
        if (width, height) == (pre.input_size, pre.input_size) and not pre.resize_at_input_size:
            return  # used as it is
        side, short, long = pre.resize_short_side, min(width, height), max(width, height)
        resized = side * int(side * long / short)
        if resized > MAX_IMAGE_PIXELS:
            raise PredictError(f"{path}: {width}x{height} pixels; resizing its shorter side to {side} px, as the "
                               f"model's preprocessing does, makes {resized:,} pixels; expected an image whose "
                               f"longer side is at most {MAX_IMAGE_PIXELS // side // side:,} times its shorter "
                               f"(at most {MAX_IMAGE_PIXELS:,} pixels after the resize)")

    def logits(self, images: torch.Tensor) -> np.ndarray:
        """Logits of a ``uint8`` NCHW batch, run :data:`BATCH` images at a time in order."""
        batch = np.ascontiguousarray(self.normalize(images).numpy(), dtype=np.float32)
        return np.concatenate([self.session.run(None, {self.input.name: batch[start:start + BATCH]})[0]
                               for start in range(0, len(batch), BATCH)])

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        logits = logits.astype(np.float64)
        if self.info.activation == "sigmoid":
            return 1.0 / (1.0 + np.exp(-logits))
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    def predict(self, images: Sequence[Path | str], topk: int = 5) -> list[ImagePrediction]:
        """The ``topk`` most probable classes (at most all) of each image, in the order given.
        Every image is read before any is classified, so a bad one fails the call naming it."""
        if topk < 1:
            raise PredictError(f"topk = {topk}; expected a positive number of classes")
        if not images:
            return []
        probabilities = self.probabilities(self.logits(torch.stack([self.load_image(Path(i)) for i in images])))
        k = min(topk, probabilities.shape[1])
        results = []
        for image, row in zip(images, probabilities):
            order = np.argsort(-row, kind="stable")[:k]
            results.append(ImagePrediction(str(image), [ClassScore(self.info.classes[i], int(i), float(row[i]))
                                                        for i in order]))
        return results


def predict(model_path: Path | str, images: Sequence[Path | str], topk: int = 5,
            threads: int | None = None) -> list[ImagePrediction]:
    """The ``topk`` classes of each image file by the exported model at ``model_path``
    (:class:`Predictor`); :class:`PredictError` names a file that cannot be used."""
    return Predictor(Path(model_path), threads).predict(images, topk)


def format_text(predictions: Sequence[ImagePrediction]) -> str:
    """Per image: its path, then one line per class: rank, name, probability."""
    lines = []
    for prediction in predictions:
        lines.append(prediction.image)
        width = max(len(c.name) for c in prediction.top)
        lines += [f"  {rank}. {c.name:<{width}}  {c.probability:.4f}" for rank, c in enumerate(prediction.top, 1)]
    return "\n".join(lines)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdlib.predict", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="an ONNX file written by the export stage")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files to classify")
    parser.add_argument("--topk", type=_positive, default=5, help="classes shown per image (default 5)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    parser.add_argument("--threads", type=_positive, default=None, help="ONNX Runtime intra-op threads")
    args = parser.parse_args(argv)
    try:
        predictions = predict(args.model, args.images, args.topk, args.threads)
    except PredictError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps([p.to_json() for p in predictions], indent=2) if args.json else format_text(predictions))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
