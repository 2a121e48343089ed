"""A small 3-convolution CNN student (``cnn_small``, 56,554 parameters at 10 classes on 1 channel).

conv3×3(32)-BN-ReLU-maxpool → conv3×3(64)-BN-ReLU-maxpool → conv3×3(64)-BN-ReLU →
global average pool → Linear(64 → classes). Sized so that on the embedded MNIST default it
trains in seconds per epoch on two CPU cores and leaves a visible gap to a ResNet-18 teacher,
which is what makes the distillation gain measurable.
"""
from __future__ import annotations

from typing import Any

from timm.layers import SelectAdaptivePool2d
from timm.models import register_model
from torch import Tensor, nn

from kdlib.models.base import TimmClassifier, entry_kwargs, own_model
from kdlib.models.pre_relu import PreReluStage
from kdlib.taps import module_input


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(TimmClassifier):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        widths: tuple[int, int, int] = (32, 64, 64),
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            *_conv_bn_relu(in_chans, w1),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w1, w2),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w2, w3),
        )
        self.num_features = self.head_hidden_size = w3
        # timm's stage list (what features_only and the feature-map methods' stage indices read): each block's ReLU
        self.feature_info = [{"module": f"features.{i}", "num_chs": w, "reduction": r}
                             for i, w, r in ((2, w1, 1), (6, w2, 2), (10, w3, 4))]
        self.num_classes = num_classes
        self.pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(w3, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def pre_relu_stages(self) -> list[PreReluStage]:
        """Each stage's pre-ReLU output (:mod:`kdlib.models.pre_relu`): the input of its ReLU, after its BN."""
        return [PreReluStage(module_input(f"features.{i}"), f"features.{i - 1}") for i in (2, 6, 10)]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(self.pool(x))
        return x if pre_logits else self.fc(x)


@register_model
@own_model(SmallCNN)
def cnn_small(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    return SmallCNN(**entry_kwargs("cnn_small", pretrained, kwargs))
