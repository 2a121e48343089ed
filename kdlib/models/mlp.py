"""A fully connected ReLU network (``mlp``) with dropout and a max-norm constraint, as in Hinton et al.

Architecture, for an input of ``in_chans × img_size × img_size`` values and hidden widths
``hidden = [h_1, …, h_L]``::

    flatten → Dropout(input_dropout) → [Linear(→ h_l) → ReLU → Dropout(hidden_dropout)] × L → Linear(h_L → classes)

(the last hidden layer's dropout is timm's ``drop_rate``, the dropout on the classifier's input;
it defaults to ``hidden_dropout``). Parameters: ``Σ_l (n_{l−1}·n_l + n_l)`` with ``n_0`` the input size
and ``n_{L+1}`` the classes: the teacher of Hinton, Vinyals & Dean 2015 ("Distilling the Knowledge in
a Neural Network", §3), 784-1200-1200-10, has 784·1200+1200 + 1200·1200+1200 + 1200·10+10 =
2,395,210; its 784-800-800-10 student 1,276,810.

Max-norm (Hinton, Srivastava, Krizhevsky, Sutskever & Salakhutdinov 2012, "Improving neural networks
by preventing co-adaptation of feature detectors", arXiv:1207.0580, p. 2 and Appendix A): in place of an
L2 penalty on the whole weight vector, the L2 norm of the incoming weight vector of each individual
hidden unit has an upper bound, and when a weight update breaks it the unit's weights are renormalized
by division (a constraint rather than a penalty lets a large learning rate be used without
the weights growing without limit). After every optimizer step :meth:`MLP.apply_constraints` maps each
row ``w_j`` (hidden unit ``j``'s incoming weights, its bias excluded) of hidden layer ``l`` to::

    w_j ← w_j · min(1, c_l / ‖w_j‖₂)

The constraint is on *hidden* units only, as the paper words it; the output (softmax) layer is left
free. (Srivastava et al. 2014, JMLR 15, the longer dropout paper, later constrained every layer.)

The bound's scale depends on how dropout is written. The 2012 paper trains the weights unscaled on
the thinned network and halves a unit's outgoing weights at test time; its MNIST nets bound the
*squared* length by ``l = 15`` (Appendix A), i.e. ``‖w_j‖₂ ≤ √15 ≈ 3.873``. ``torch.nn.Dropout``
(used here) divides the kept inputs by ``1 − p`` during training instead, so the same network stores
``(1 − p)·w``: the paper's bound is ``c_l = (1 − p_l)·√15`` on the stored rows, ``p_l`` being the
dropout rate of layer ``l``'s input — 0.8·√15 = 3.098 behind input dropout 0.2 and 0.5·√15 = 1.936
behind hidden dropout 0.5 (the ``max_col_norm: 1.9365`` of Goodfellow et al.'s 2013 maxout networks
in pylearn2, whose dropout also rescales, is the same number). ``max_norm`` bounds the stored rows as
written, so ``max_norm: [3.098, 1.936]`` is the paper's constraint for 784-1200-1200 with dropout 0.2 / 0.5.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from timm.models import register_model
from torch import Tensor, nn

from kdlib.models.base import TimmClassifier, entry_kwargs, own_model


def _rate(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"mlp {name} = {value!r}: expected a dropout probability in [0, 1)")
    return float(value)


def _bounds(max_norm: float | Sequence[float] | None, layers: int) -> list[float | None]:
    """One bound (or None) per hidden layer from ``max_norm``: None, one number for every hidden
    layer, or a list of one positive number per hidden layer."""
    if max_norm is None:
        return [None] * layers
    values = [max_norm] * layers if isinstance(max_norm, (int, float)) else list(max_norm)
    ok = len(values) == layers and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)
    if not ok:
        raise ValueError(f"mlp max_norm = {max_norm!r}: expected null, a positive number, or a list of "
                         f"{layers} positive numbers (one per hidden layer)")
    return [float(v) for v in values]


class MLP(TimmClassifier):
    """Fully connected ReLU classifier with input/hidden dropout and per-unit max-norm (module docstring).

    ``forward_features`` returns the last hidden layer's ReLU activations ``(B, h_L)``;
    ``forward_head(x, pre_logits=True)`` returns them after the classifier-input dropout (identity in
    eval mode), and without ``pre_logits`` the logits.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        hidden: Sequence[int] = (1200, 1200),
        input_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        drop_rate: float | None = None,
        max_norm: float | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        widths = list(hidden)
        if not widths or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in widths):
            raise ValueError(f"mlp hidden = {hidden!r}: expected a non-empty list of positive integer widths")
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
            raise ValueError(f"mlp img_size = {img_size!r}: expected a positive integer (the input's side in pixels)")
        input_dropout = _rate("input_dropout", input_dropout)
        hidden_dropout = _rate("hidden_dropout", hidden_dropout)
        last_dropout = hidden_dropout if drop_rate is None else _rate("drop_rate", drop_rate)
        self.in_chans, self.img_size = in_chans, img_size
        self.in_features = in_chans * img_size * img_size
        self.max_norms = _bounds(max_norm, len(widths))
        self.input_drop = nn.Dropout(input_dropout)
        layers: list[nn.Module] = []
        width = self.in_features
        for i, h in enumerate(widths):
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.Dropout(hidden_dropout))
            width = h
        self.hidden = nn.Sequential(*layers)
        # timm's stage list (the feature-map methods' stage indices): each hidden layer's ReLU, (B, width)
        relus = [i for i, m in enumerate(layers) if isinstance(m, nn.ReLU)]
        self.feature_info = [{"module": f"hidden.{i}", "num_chs": h, "reduction": 1} for i, h in zip(relus, widths)]
        self.hidden_linears = [m for m in self.hidden if isinstance(m, nn.Linear)]
        self.drop = nn.Dropout(last_dropout)  # timm's drop_rate: the classifier's input
        self.num_features = self.head_hidden_size = width
        self.num_classes = num_classes
        self.fc = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()  # type: ignore[assignment]

    def forward_features(self, x: Tensor) -> Tensor:
        if x.shape[1:] != (self.in_chans, self.img_size, self.img_size):
            raise ValueError(f"mlp built for {self.in_chans}×{self.img_size}×{self.img_size} inputs, got "
                             f"{tuple(x.shape[1:])}; set kwargs.img_size to the input size")
        return self.hidden(self.input_drop(x.flatten(1)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(x)
        return x if pre_logits else self.fc(x)

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Renormalize, in place, every hidden unit's incoming weight row whose L2 norm exceeds its
        layer's bound ``c``: ``w_j ← w_j · c / ‖w_j‖₂`` (Hinton et al. 2012); rows within the bound
        are left bit for bit as they are. The training loop calls this after every optimizer step."""
        for linear, bound in zip(self.hidden_linears, self.max_norms):
            if bound is None:
                continue
            weight = linear.weight
            norms = torch.linalg.vector_norm(weight, dim=1, keepdim=True)
            scale = torch.where(norms > bound, bound / norms, torch.ones_like(norms))
            weight.mul_(scale)


@register_model
@own_model(MLP)
def mlp(pretrained: bool = False, **kwargs: Any) -> MLP:
    return MLP(**entry_kwargs("mlp", pretrained, kwargs))
