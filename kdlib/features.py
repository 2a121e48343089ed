"""Pooled penultimate features of timm models, and the student shape feature mimicking needs.

Features are read through timm's own interface, never by forking model code: a model built
with ``num_classes=0`` (or after ``reset_classifier(0)``) returns its pooled pre-logits
features, and ``forward_head(forward_features(x), pre_logits=True)`` gives the same vector
next to the logits. The pooling is the model's own: ``kwargs: {global_pool: avg | max | avgmax}``
in a model preset selects the GAP / GMP / GWP of LSHFM (Wang et al., TPAMI 2021)
(``avgmax`` = (GAP + GMP) / 2).

LSHFM gives the student a linear ``feat_fc`` from its feature width
to the teacher's when they differ (or when forced); its output is both the mimicked feature
and the classifier's input. :class:`FeatureStudent` is that model: backbone → ``feat_fc`` →
``fc``. It is an ordinary ``nn.Module`` whose ``forward`` returns logits, so evaluation,
quantization and export treat it like any other model.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kdlib.losses.registry import StudentOutput, TeacherOutput


def logits_and_features(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits, pooled features)`` of a timm-interface model from one backbone pass."""
    feature_map = model.forward_features(images)
    return model.forward_head(feature_map), model.forward_head(feature_map, pre_logits=True)


@torch.no_grad()
def feature_width(model: nn.Module, in_chans: int, input_size: int) -> int:
    """Width of ``model``'s pooled pre-logits features, measured on one dummy image."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feature_map = model.forward_features(torch.zeros(1, in_chans, input_size, input_size, device=device))
    width = model.forward_head(feature_map, pre_logits=True).shape[-1]
    model.train(was_training)
    return int(width)


class FeatureStudent(nn.Module):
    """``backbone`` (classifier removed) → ``feat_fc`` (Linear, or Identity when widths match
    and no projection is forced) → ``fc`` (Linear to the classes).

    ``freeze_backbone()`` (the ``align`` stage) leaves only ``feat_fc`` trainable and keeps the
    backbone in eval mode, so its BatchNorm statistics stay as they were: LSHFM lets them drift
    during alignment, which changes the very features ``feat_fc`` is being fitted to.
    """

    def __init__(self, backbone: nn.Module, student_width: int, teacher_width: int, num_classes: int,
                 project: bool) -> None:
        super().__init__()
        backbone.reset_classifier(0)
        self.backbone = backbone
        self.student_width, self.teacher_width = student_width, teacher_width
        self.feat_fc: nn.Module = nn.Linear(student_width, teacher_width) if project else nn.Identity()
        self.fc = nn.Linear(teacher_width, num_classes)
        self.num_classes = num_classes
        self.backbone_frozen = False

    @property
    def projected(self) -> bool:
        return isinstance(self.feat_fc, nn.Linear)

    def config(self) -> dict[str, Any]:
        """What :func:`kdlib.checkpoint.model_from_checkpoint` needs to rebuild this wrapper."""
        return {"student_width": self.student_width, "teacher_width": self.teacher_width,
                "project": self.projected}

    def freeze_backbone(self) -> None:
        self.backbone_frozen = True
        for module in (self.backbone, self.fc):
            for p in module.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "FeatureStudent":
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def apply_constraints(self) -> None:
        """The backbone's weight constraints (an MLP's max-norm), which the training loop applies after
        every update: the wrapper must not hide them."""
        constrain = getattr(self.backbone, "apply_constraints", None)
        if constrain is not None:
            constrain()

    def forward_distill(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.feat_fc(self.backbone(images))
        return self.fc(features), features

    def forward(self, images: Tensor) -> Tensor:
        return self.fc(self.feat_fc(self.backbone(images)))


def make_feature_student(model: nn.Module, teacher_width: int, in_chans: int, input_size: int,
                         force_projection: bool = False) -> FeatureStudent:
    """Wrap a freshly built student: a ``feat_fc`` projection when its feature width differs
    from the teacher's ``teacher_width`` or ``force_projection`` is set."""
    width = feature_width(model, in_chans, input_size)
    project = force_projection or width != teacher_width
    return FeatureStudent(model, width, teacher_width, model.num_classes, project)


def student_output(model: nn.Module, images: Tensor, features: bool) -> StudentOutput:
    """Run the student as a method needs it: with pooled features (a :class:`FeatureStudent`),
    or with both heads when a distillation-token model is in distilled training (timm returns
    ``(class logits, distillation logits)`` then)."""
    if features:
        logits, feats = model.forward_distill(images)
        return StudentOutput(logits, features=feats)
    out = model(images)
    if isinstance(out, tuple):
        return StudentOutput(out[0], dist_logits=out[1])
    return StudentOutput(out)


def prediction_logits(out: StudentOutput) -> Tensor:
    """The logits the student predicts with: the mean of both heads for token distillation,
    as timm and DeiT average them at inference."""
    return out.logits if out.dist_logits is None else (out.logits + out.dist_logits) / 2


def teacher_output(model: nn.Module, images: Tensor, features: bool) -> TeacherOutput:
    if features:
        logits, feats = logits_and_features(model, images)
        return TeacherOutput(logits, feats)
    return TeacherOutput(model(images))
