"""The residual CNN of the residual-CNN precision study (Intel scenes), registered in timm as ``rescnn``.

Stem: conv3×3 → 16 channels, BN, ReLU. Then ``blocks`` basic residual blocks
(conv3×3-BN-ReLU-conv3×3-BN + identity, or a 1×1-conv+BN shortcut when the shape changes, then
ReLU) alternating ``c → c`` and ``c → 2c`` at stride 2, global average pooling, and an MLP head
``Linear(C → h) - BN - ReLU - Dropout(0.5)`` per hidden width ``h`` then ``Linear(→ classes)``.
The default head has one hidden layer of ``C/2``. Convolutions have no bias (BN follows each).

Parameter counts for 3 input channels and 6 classes (that study's table):
4 / 6 / 8 / 10 blocks → 98,294 / 408,854 / 1,648,470 / 6,601,686; its 12-block teacher with
``head_hidden=(512, 256)`` → 26,534,358.
"""
from __future__ import annotations

from typing import Any, Sequence

from timm.layers import SelectAdaptivePool2d
from timm.models import register_model
from torch import Tensor, nn

from kdlib.models.base import TimmClassifier, entry_kwargs, own_model
from kdlib.models.pre_relu import PreReluStage
from kdlib.taps import module_input


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # two ReLU modules, not one used twice: PT2E quantizers (torch.export) see a module called
        # twice as one partition with two outputs and refuse it
        self.relu1 = nn.ReLU(inplace=True)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResCNN(TimmClassifier):
    """Residual CNN with the timm classifier interface (``forward_features`` / ``forward_head``)."""

    def __init__(
        self,
        blocks: int = 4,
        num_classes: int = 6,
        in_chans: int = 3,
        stem_channels: int = 16,
        head_hidden: Sequence[int] | None = None,
        drop_rate: float = 0.5,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError(f"rescnn needs blocks >= 1, got {blocks}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem_channels),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        channels, reduction = stem_channels, 1
        # timm's stage list (features_only, the feature-map methods' stage indices): the stem, then every block
        self.feature_info = [{"module": "stem", "num_chs": stem_channels, "reduction": 1}]
        for i in range(blocks):
            widen = i % 2 == 1
            out_channels = channels * 2 if widen else channels
            stages.append(BasicBlock(channels, out_channels, stride=2 if widen else 1))
            channels, reduction = out_channels, reduction * (2 if widen else 1)
            self.feature_info.append({"module": f"blocks.{i}", "num_chs": channels, "reduction": reduction})
        self.blocks = nn.Sequential(*stages)
        self.num_features = channels
        self.num_classes = num_classes
        self.pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        hidden = list(head_hidden) if head_hidden is not None else [channels // 2]
        head: list[nn.Module] = []
        width = channels
        for h in hidden:
            head += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Dropout(drop_rate)]
            width = h
        self.head_hidden = nn.Sequential(*head)
        self.head_hidden_size = width
        self.fc = nn.Linear(width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x))

    def pre_relu_stages(self) -> list[PreReluStage]:
        """Each stage's pre-ReLU output (:mod:`kdlib.models.pre_relu`): the stem's ReLU input after its BN, and
        each block's last ReLU input (``bn2`` plus the shortcut) with ``bn2``."""
        return [PreReluStage(module_input("stem.2"), "stem.1")] + [
            PreReluStage(module_input(f"blocks.{i}.relu2"), f"blocks.{i}.bn2") for i in range(len(self.blocks))]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_hidden(self.pool(x))
        return x if pre_logits else self.fc(x)


@register_model
@own_model(ResCNN)
def rescnn(pretrained: bool = False, **kwargs: Any) -> ResCNN:
    """The residual-CNN precision study's CNN; ``blocks`` sets the depth (4–12 in that study)."""
    return ResCNN(**entry_kwargs("rescnn", pretrained, kwargs))
