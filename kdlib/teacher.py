"""The teacher during distillation: frozen, in eval mode, without gradients.

Follows timm's ``DistillationTeacher``: when the teacher was trained at another input size,
the student's batch is resized for it (bilinear), so teacher and student see the same view.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class OnlineTeacher:
    def __init__(self, model: nn.Module, input_size: int | None = None) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.input_size = input_size

    @torch.no_grad()
    def __call__(self, images: Tensor, positions: Tensor) -> Tensor:
        self.model.eval()  # a caller's model.train() must never reach the teacher's BN/dropout
        if self.input_size is not None and images.shape[-1] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return self.model(images)
