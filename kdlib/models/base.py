"""What the project's own architectures share: timm's classifier interface and entry-point rules."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from torch import Tensor, nn

F = TypeVar("F", bound=Callable[..., Any])


class TimmClassifier(nn.Module):
    """timm's interface: ``forward_features`` → ``forward_head(pre_logits=...)``, ``get_classifier``.

    Subclasses define ``forward_features`` and ``forward_head`` and name their last Linear ``fc``,
    so feature-based distillation reads pooled features the same way as from timm's models.
    ``global_pool`` is timm's: ``avg`` (GAP), ``max`` (GMP) or ``avgmax`` ((GAP + GMP) / 2).
    """

    fc: nn.Linear
    head_hidden_size: int  # width of the pooled pre-logits features (the classifier's input)

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        raise NotImplementedError

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A new ``num_classes`` head; 0 removes it, so ``forward`` returns pooled features."""
        width = self.head_hidden_size
        self.num_classes = num_classes
        self.fc = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()  # type: ignore[assignment]

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# What ``timm.create_model`` itself hands every entry point besides the caller's kwargs (timm
# 1.0: ``pretrained_cfg``, ``pretrained_cfg_overlay``, ``cache_dir``; ``pretrained_model_args``
# for ``hf-hub:`` / ``local-dir:`` names). They configure weight loading, not the architecture.
TIMM_ENTRY_KEYS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_model_args")


def entry_kwargs(name: str, pretrained: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Model kwargs from a timm entry-point call: the caller's, without :data:`TIMM_ENTRY_KEYS`.

    Everything else reaches the model's constructor, whose signature has no ``**kwargs``, so a
    misspelt keyword is a ``TypeError`` rather than a silently ignored setting. Our architectures
    have no hub weights: ``pretrained=True`` is refused (a file path is loaded by
    :func:`kdlib.models.build_model` instead)."""
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights; set pretrained to false or a file path")
    return {k: v for k, v in kwargs.items() if k not in TIMM_ENTRY_KEYS}


def own_model(cls: type[nn.Module]) -> Callable[[F], F]:
    """Mark a timm entry point as building ``cls`` from its kwargs, so parameter checks read the
    accepted keyword arguments from ``cls.__init__`` (see :func:`kdlib.models.accepted_kwargs`)."""
    def mark(entry: F) -> F:
        entry.model_cls = cls  # type: ignore[attr-defined]
        return entry
    return mark
