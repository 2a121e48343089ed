"""The teacher during distillation: frozen, in eval mode, without gradients.

Follows timm's ``DistillationTeacher``: the student's batch is adapted to what the teacher was
trained on, so both see the same view: renormalized when the teacher used another mean/std
(e.g. a teacher trained with ImageNet statistics and a student with the data set's own), and
resized (bilinear) when it was trained at another input size.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.features import teacher_output
from kdlib.losses.registry import TeacherOutput
from kdlib.taps import LayerTaps


def _as_lists(stats: tuple[Sequence[float], Sequence[float]]) -> list[list[float]]:
    return [list(map(float, values)) for values in stats]


def _channel_tensor(values: Sequence[float]) -> Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


class OnlineTeacher:
    """Runs the teacher on each batch the student sees. ``features=True`` also returns its
    pooled penultimate features (feature-mimicking methods)."""

    def __init__(
        self,
        model: nn.Module,
        input_size: int | None = None,
        student_stats: tuple[Sequence[float], Sequence[float]] | None = None,
        teacher_stats: tuple[Sequence[float], Sequence[float]] | None = None,
        features: bool = False,
    ) -> None:
        self.model = model.eval()
        self.features = features
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.input_size = input_size
        self.taps: LayerTaps | None = None
        self.renorm: tuple[Tensor, Tensor] | None = None
        if student_stats and teacher_stats and _as_lists(student_stats) != _as_lists(teacher_stats):
            s_mean, s_std = (_channel_tensor(v) for v in student_stats)
            t_mean, t_std = (_channel_tensor(v) for v in teacher_stats)
            # x_t = (x_s·σ_s + μ_s − μ_t) / σ_t, as one multiply-add
            self.renorm = (s_std / t_std, (s_mean - t_mean) / t_std)

    def tap(self, paths: Sequence[str]) -> None:
        """Return the outputs of the teacher's layers ``paths`` (module paths) with every answer;
        no paths: none (the teacher answers as untapped, with its pooled features if asked)."""
        if self.taps is not None:
            self.taps.remove()
        self.taps = LayerTaps(self.model, paths) if paths else None

    @torch.no_grad()
    def __call__(self, images: Tensor, positions: Tensor | None = None, views: Tensor | None = None
                 ) -> TeacherOutput:
        """The teacher's output on a normalized student batch (``positions`` / ``views`` name
        the batch's images and views; a cache needs them, the online teacher does not)."""
        self.model.eval()  # a caller's model.train() must never reach the teacher's BN/dropout
        if self.renorm is not None:
            scale, shift = (t.to(images.device) for t in self.renorm)
            images = images * scale + shift
        if self.input_size is not None and images.shape[-1] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        if self.taps is not None:
            logits, layers = self.taps.forward(images)
            return TeacherOutput(logits, layers=layers)
        return teacher_output(self.model, images, self.features)
