"""The evaluation view of one image file, as data: what a deployed model needs to be fed as
evaluation fed it.

:meth:`DatasetSpec.load <kdlib.data.spec.DatasetSpec.load>` builds the test split from three
facts besides the file: how it is decoded (full size, or at short side ``round(size /
eval_crop_pct)`` when the data set has a ``preload_size``), whether it is resized (not when every
stored image already has the input size, e.g. MNIST), and the resize + center crop of
:func:`~kdlib.data.transforms.build_transforms` (shorter side to ``round(size / eval_crop_pct)``,
antialiased bilinear, then the central ``size × size``). :class:`Preprocessing` records those facts
(:meth:`to_json` / :meth:`from_json`, for an exported model's metadata) and :meth:`Preprocessing.load`
applies them by calling the same decode and transform functions, so an image is the tensor the
test split holds for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from kdlib.data.decode import decode_at_short_side, decode_image, needed_eval_short_side
from kdlib.data.transforms import BatchNormalizer, build_transforms

if TYPE_CHECKING:
    from kdlib.data.index import DatasetMeta
    from kdlib.data.spec import DatasetSpec

FORMAT = 1  # the version of :meth:`Preprocessing.to_json`'s layout


@dataclass(frozen=True)
class Preprocessing:
    """How evaluation turns an image file into the model's input (see the module docstring)."""

    channels: int  # 1: the image is converted to grayscale (PIL "L"); 3: to RGB
    input_size: int  # the model sees input_size × input_size
    eval_crop_pct: float  # resize the shorter side to round(input_size / eval_crop_pct), then center-crop
    resize_at_input_size: bool  # whether an image already input_size × input_size is resized and cropped too
    decode_short_side: int | None  # None: decode at full size; S: reduced JPEG decode + resize to short side S
    mean: tuple[float, ...]  # normalization of x / 255, per channel
    std: tuple[float, ...]

    @classmethod
    def for_evaluation(cls, spec: "DatasetSpec", meta: "DatasetMeta", input_size: int) -> "Preprocessing":
        """What ``spec.load(index, "test", input_size, False)`` does to each image of a data set
        described by ``meta``, and the statistics it is normalized with."""
        return cls(channels=meta.channels, input_size=input_size, eval_crop_pct=spec.eval_crop_pct,
                   # the data set's images all have stored_size: evaluation skips the resize exactly then
                   resize_at_input_size=meta.stored_size != input_size,
                   decode_short_side=spec.short_side(input_size, train=False),
                   mean=tuple(meta.mean), std=tuple(meta.std))

    @property
    def resize_short_side(self) -> int:
        return needed_eval_short_side(self.input_size, self.eval_crop_pct)

    def decode(self, path: Path) -> Tensor:
        """The file's pixels before the resize: :class:`~kdlib.data.IndexedImageDataset`'s decode.
        ``FileNotFoundError`` / ``ValueError`` name the file."""
        if self.decode_short_side is None:
            return decode_image(path, self.channels)
        return decode_at_short_side(path, self.channels, self.decode_short_side)

    def view(self, image: Tensor) -> Tensor:
        """A decoded ``uint8`` CHW image resized and center-cropped to the input size, as evaluation does."""
        at_size = tuple(image.shape[-2:]) == (self.input_size, self.input_size)
        stored = self.input_size if at_size and not self.resize_at_input_size else None
        transform = build_transforms("none", self.input_size, stored, False, eval_crop_pct=self.eval_crop_pct).sample
        return image if transform is None else transform(image)

    def load(self, path: Path) -> Tensor:
        """The ``uint8`` ``(channels, input_size, input_size)`` tensor evaluation feeds for ``path``."""
        return self.view(self.decode(path))

    def normalizer(self) -> BatchNormalizer:
        """``uint8`` batch → float ``(x / 255 − mean) / std``."""
        return BatchNormalizer(self.mean, self.std)

    def to_json(self) -> dict[str, Any]:
        """The fields, and the steps they mean in words (for a reader without kdlib)."""
        resize = (f"resize the shorter side to {self.resize_short_side} px (antialiased bilinear, torchvision "
                  f"v2.Resize), then center-crop {self.input_size}x{self.input_size}")
        steps = [f"decode with PIL and convert to {'grayscale (L)' if self.channels == 1 else 'RGB'}"
                 + ("" if self.decode_short_side is None else
                    f", at shorter side {self.decode_short_side} px (JPEG draft decode, then antialiased bilinear)"),
                 resize + ("" if self.resize_at_input_size else
                           f" (an image already {self.input_size}x{self.input_size} is left as it is)"),
                 "scale to [0, 1] (x / 255), subtract mean and divide by std per channel; NCHW float32"]
        return {"format": FORMAT, "channels": self.channels, "input_size": self.input_size,
                "eval_crop_pct": self.eval_crop_pct, "resize_short_side": self.resize_short_side,
                "resize_at_input_size": self.resize_at_input_size, "decode_short_side": self.decode_short_side,
                "mean": list(self.mean), "std": list(self.std), "steps": steps}

    @classmethod
    def from_json(cls, values: Any, where: str) -> "Preprocessing":
        """The inverse of :meth:`to_json`; ``ValueError`` naming ``where`` and the key on anything else."""
        if not isinstance(values, dict):
            raise ValueError(f"{where}: preprocessing is {type(values).__name__}; expected a JSON object")
        if values.get("format") != FORMAT:
            raise ValueError(f"{where}: preprocessing format {values.get('format')!r}; expected {FORMAT} "
                             "(written by a different kdlib: export the model again)")

        def field(key: str, ok: Any, expected: str) -> Any:
            value = values.get(key)
            if not ok(value):
                raise ValueError(f"{where}: preprocessing.{key} = {value!r}; expected {expected}")
            return value

        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        channels = field("channels", lambda v: v in (1, 3) and not isinstance(v, bool), "1 or 3")
        numbers = lambda v: isinstance(v, list) and len(v) == channels and all(number(x) for x in v)  # noqa: E731
        return cls(
            channels=channels,
            input_size=field("input_size", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                             "a positive integer"),
            eval_crop_pct=field("eval_crop_pct", lambda v: number(v) and 0 < v <= 1, "a number in (0, 1]"),
            resize_at_input_size=field("resize_at_input_size", lambda v: isinstance(v, bool), "true or false"),
            decode_short_side=field("decode_short_side", lambda v: v is None or (isinstance(v, int) and v > 0),
                                    "null or a positive integer"),
            mean=tuple(field("mean", numbers, f"{channels} numbers")),
            std=tuple(field("std", lambda v: numbers(v) and all(x > 0 for x in v), f"{channels} positive numbers")),
        )
