"""Contrastive representation distillation (``crd``).

Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699. The student's
and the teacher's pooled features are embedded (a Linear layer each, then L2-normalized: :math:`v^s, v^t`,
``feat_dim`` wide) and each is contrasted with the other net's *memory bank* — one row per training image,
a momentum average of that image's past embeddings — over its own image (positive) and ``nce_k`` images of
other classes (negatives), with the NCE loss of the paper's Eq. 18:

.. math::

    L = w_{ce}\\,\\mathrm{CE}_\\epsilon(z_s, y) + w_{feat}\\,(L_{NCE}(P^s) + L_{NCE}(P^t)), \\qquad
    P^s_{bj} = \\frac{e^{\\langle M^t_{i_{bj}}, v^s_b\\rangle/\\tau}}{Z^s}, \\quad
    P^t_{bj} = \\frac{e^{\\langle M^s_{i_{bj}}, v^t_b\\rangle/\\tau}}{Z^t},

.. math::

    L_{NCE}(P) = -\\frac{1}{B}\\sum_b \\Big[\\log\\frac{P_{b0}}{P_{b0} + K/N + \\varepsilon}
        + \\sum_{j=1}^{K} \\log\\frac{K/N}{P_{bj} + K/N + \\varepsilon}\\Big]

with :math:`i_{b0}` the anchor's own position, :math:`i_{b1..K}` drawn uniformly without replacement from the
images of other classes, :math:`N` the training-set size, :math:`\\varepsilon = 10^{-7}`, and the constants
:math:`Z^s, Z^t` set once, from the first batch, to :math:`N` times the mean of the unnormalized
:math:`e^{\\cdot/\\tau}`. After the scores, each bank's rows of the batch's images become
:math:`\\mathrm{normalize}(m\\,M_i + (1-m)\\,v_i)`. The banks start uniform in :math:`\\pm\\sqrt{3/d}`.

Knobs (RepDistiller's ``train_student.py`` and mdistiller's ``CRD`` defaults): ``feat_dim`` 128, ``nce_k``
16384, ``nce_t`` (τ) 0.07, ``nce_m`` (momentum) 0.5, ``ce_weight`` 1, ``feat_weight`` 0.8,
``student_layers`` / ``teacher_layers`` null = ``[pre_logits]`` (one layer each; another layer is
flattened). ``nce_k`` larger than the fewest images of other classes than an anchor's is refused in
:meth:`CRDLoss.setup`. Terms logged: ``ce``, ``crd`` (unweighted). The embeddings are the method's own
parameters; the banks and :math:`Z` are buffers (saved with the resume state). Soft (MixUp/CutMix) targets
only enter the CE term; a mixed row's memory row and class are its first image's (its position).

Tested against RepDistiller's ``ContrastMemory``, ``ContrastLoss`` and ``Embed``. Differences from the
original code, and why:

* Negatives are drawn here, on the method's device, from torch's global RNG (the trainer seeds and resumes
  it), not by the data loader's workers from NumPy's (``CIFAR100InstanceSample``): a resumed run draws the
  same negatives, and the data pipeline stays method-agnostic. Only the ``exact`` mode (the default) is
  kept: the positive is the anchor's own image, not one of its class (``relax``). The original draws with
  replacement once ``nce_k`` exceeds the other-class images; that is refused here instead.
* Under several processes the banks are updated from every process's batch, gathered in rank order, and
  :math:`Z` from the mean over the processes' first batches, so the banks stay identical on every process
  (the original is single-process). Of an image twice in a gathered batch (a padded shard) the last copy
  updates its row, as the original's ``index_copy_`` on CPU does with a repeated index.
* The banks are drawn from a generator seeded with the run's seed (the original draws them from the global
  RNG at construction), the same on every process.
* Only the embeddings count as the method's extra parameters (mdistiller's ``get_extra_parameters`` adds
  the banks' N × 2 × feat_dim buffer entries): they are state, not trained parameters.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from kdlib.losses._common import check_positive, check_unit_interval, require_teacher
from kdlib.losses._layers import LayerMethod
from kdlib.losses.base import SetupContext
from kdlib.losses.ce import ce_loss
from kdlib.losses.registry import MULTICLASS, LossOutput, StudentOutput, TeacherOutput, register_method
from kdlib.taps import PRE_LOGITS, Layer, LayerPlan

EPS = 1e-7  # the authors' eps of the NCE loss
# the most random keys drawn at once when sampling negatives (rows × training images): bounds the memory of a
# large training set (ImageNet's 1.28 M images: 13 rows at a time)
_KEYS_PER_CHUNK = 1 << 24


class Embed(nn.Module):
    """RepDistiller's ``Embed``: flatten, Linear to ``dim_out``, divide by the L2 norm."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x.reshape(x.shape[0], -1))
        return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


def nce_loss(x: Tensor, n_data: int) -> Tensor:
    """Eq. 18 over ``x`` ``(B, 1 + K)``: column 0 the positive's normalized score, the rest the negatives'."""
    m = x.size(1) - 1
    noise = m * (1 / float(n_data))  # K·P_n, P_n = 1/N the uniform noise distribution (the original's rounding)
    positive, negative = x[:, 0], x[:, 1:]
    log_d1 = torch.div(positive, positive.add(noise + EPS)).log()
    log_d0 = torch.div(torch.full_like(negative, noise), negative.add(noise + EPS)).log()
    return -(log_d1.sum(0) + log_d0.reshape(-1).sum(0)) / x.shape[0]


def other_class_negatives(labels: Tensor, positions: Tensor, k: int) -> Tensor:
    """``(B, k)`` training-set indices, for each anchor ``positions[b]`` ``k`` distinct images of classes other than
    its own, uniformly (the ``k`` largest of uniform keys, the anchor's class keyed below every other), drawn
    from torch's RNG on ``labels``' device. ``k`` must not exceed any anchor's number of other-class images."""
    anchors = labels[positions]
    out = torch.empty(len(positions), k, dtype=torch.long, device=labels.device)
    rows = max(1, _KEYS_PER_CHUNK // len(labels))
    for start in range(0, len(positions), rows):
        own = anchors[start:start + rows]
        keys = torch.rand(len(own), len(labels), device=labels.device)
        keys.masked_fill_(labels[None, :] == own[:, None], -1.0)  # rand is in [0, 1): never among the k largest
        out[start:start + rows] = keys.topk(k, dim=1, sorted=False).indices
    return out


@register_method("crd")
class CRDLoss(LayerMethod):
    """``w_ce·CE + w_feat·(NCE_s + NCE_t)`` against two memory banks (see the module docstring)."""

    needs_teacher = True
    needs_features = False
    uses_distillation_token = False
    uses_layers = True
    tasks = (MULTICLASS,)
    soft_targets = "mixed"
    uses_progress = False
    uses_positions = True
    method_name, feat_term = "crd", "crd"
    bank_names: ClassVar[tuple[str, str]] = ("memory_s", "memory_t")

    def __init__(self, feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07, nce_m: float = 0.5,
                 ce_weight: float = 1.0, feat_weight: float = 0.8, student_layers=None, teacher_layers=None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(ce_weight, feat_weight, student_layers, teacher_layers, label_smoothing)
        for name, value in (("feat_dim", feat_dim), ("nce_k", nce_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.feat_dim, self.nce_k = feat_dim, nce_k
        self.nce_t = check_positive("nce_t", nce_t)
        self.nce_m = check_unit_interval("nce_m", nce_m)
        if self.nce_m == 1.0:
            raise ValueError("nce_m must be in [0, 1) (momentum 1 never writes an embedding to the banks), got 1.0")
        self.embed_s: Embed | None = None
        self.embed_t: Embed | None = None
        self.n_data, self.bank_seed = 0, 0
        self._z_set: bool | None = None  # whether Z is set; None: read it from the buffer
        # a loaded state brings its own Z (set or not)
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_z_set", None))

    def default_layers(self, student_stages: int, teacher_stages: int) -> tuple[list[Layer], list[Layer]]:
        return [PRE_LOGITS], [PRE_LOGITS]

    def layer_problem(self, plan: LayerPlan) -> str | None:
        if len(plan.student) != 1:
            return (f"crd contrasts one student layer with one teacher layer; got {len(plan.student)} pairs "
                    f"({', '.join(plan.student)} → {', '.join(plan.teacher)}); set student_layers / teacher_layers "
                    "to one layer each")
        return None

    def setup(self, context: SetupContext) -> None:
        if context.train_labels is None:
            raise ValueError("distill.crd draws its negatives from other classes: it needs single-label training data "
                             "(SetupContext.train_labels is None, multi-label)")
        labels = torch.as_tensor(context.train_labels, dtype=torch.long).reshape(-1).cpu()
        counts = torch.bincount(labels)
        present = counts.nonzero().flatten()
        others = len(labels) - counts[present]
        fewest = int(others.min())
        if self.nce_k > fewest:
            cls = int(present[others.argmin()])
            raise ValueError(f"distill.crd: nce_k = {self.nce_k} negatives per image is more than the {fewest} "
                             f"training images outside class {cls} ({len(labels)} images, {int(counts[cls])} of class "
                             f"{cls}); expected nce_k <= {fewest}")
        self.n_data, self.bank_seed = len(labels), context.seed
        self.register_buffer("labels", labels, persistent=False)
        super().setup(context)  # checks and keeps the plan, then build_adapters

    def build_adapters(self, plan: LayerPlan) -> None:
        self.embed_s = Embed(math.prod(plan.student_shapes[0]), self.feat_dim)
        self.embed_t = Embed(math.prod(plan.teacher_shapes[0]), self.feat_dim)
        # RepDistiller's init, from the run's seed: the same banks on every process
        generator = torch.Generator().manual_seed(self.bank_seed)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        for name in self.bank_names:
            self.register_buffer(name, torch.rand(self.n_data, self.feat_dim, generator=generator)
                                 .mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z", torch.full((2,), -1.0))  # Z^s, Z^t; < 0: not set yet

    def contrast(self, f_s: Tensor, f_t: Tensor, positions: Tensor, contrast_idx: Tensor | None = None) -> Tensor:
        """``NCE_s + NCE_t`` of the batch, then the banks' momentum update. ``contrast_idx`` ``(B, 1 + K)``: the
        rows to score (column 0 the positives), drawn by :func:`other_class_negatives` when not given."""
        if self.embed_s is None or self.embed_t is None:
            raise RuntimeError("the 'crd' method was not set up: its embeddings and memory banks do not exist")
        v_s, v_t = self.embed_s(f_s), self.embed_t(f_t)
        if contrast_idx is None:
            contrast_idx = torch.cat([positions[:, None], other_class_negatives(self.labels, positions, self.nce_k)], 1)
        batch, rows = contrast_idx.shape
        # the student's anchor scored against the teacher's bank, the teacher's against the student's
        out_s = torch.bmm(self.memory_t.index_select(0, contrast_idx.reshape(-1)).view(batch, rows, -1),
                          v_s.view(batch, -1, 1))
        out_t = torch.bmm(self.memory_s.index_select(0, contrast_idx.reshape(-1)).view(batch, rows, -1),
                          v_t.view(batch, -1, 1))
        out_s, out_t = torch.exp(torch.div(out_s, self.nce_t)), torch.exp(torch.div(out_t, self.nce_t))
        if self._z_set is None:  # read once (a host sync), not every step
            self._z_set = bool(self.z[0] >= 0)
        if not self._z_set:  # the first batch sets both; the mean over every process's keeps them equal
            distributed = _distributed()
            with torch.no_grad():
                means = torch.stack([out_s.mean(), out_t.mean()])
                world = torch.distributed.get_world_size() if distributed.active() else 1
                self.z.copy_(distributed.all_reduce_sum(means) / world * self.n_data)
            self._z_set = True
        loss = (nce_loss(torch.div(out_s, self.z[0]).squeeze(-1), self.n_data)
                + nce_loss(torch.div(out_t, self.z[1]).squeeze(-1), self.n_data))
        self._update_banks(positions, v_s.detach(), v_t.detach())
        return loss

    @torch.no_grad()
    def _update_banks(self, positions: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        distributed = _distributed()
        positions = distributed.all_gather_rows(positions)
        v_s, v_t = distributed.all_gather_rows(v_s), distributed.all_gather_rows(v_t)
        # a position twice (a padded shard): every copy writes its last copy's row, so the order in which
        # index_copy_ writes repeated indices (unspecified on CUDA) cannot matter; no host sync, unlike unique()
        order = torch.arange(len(positions), device=positions.device)
        last = torch.full((self.n_data,), -1, dtype=torch.long, device=positions.device)
        pick = last.scatter_reduce_(0, positions, order, "amax")[positions]
        v_s, v_t = v_s[pick], v_t[pick]
        for name, v in zip(self.bank_names, (v_s, v_t)):
            bank = getattr(self, name)
            rows = bank.index_select(0, positions)
            rows.mul_(self.nce_m)
            rows.add_(torch.mul(v, 1 - self.nce_m))
            bank.index_copy_(0, positions, rows.div(rows.pow(2).sum(1, keepdim=True).pow(0.5)))

    def forward(self, student: StudentOutput, targets: Tensor, teacher: TeacherOutput | None = None,
                positions: Tensor | None = None) -> LossOutput:
        teacher = require_teacher(self.method_name, teacher)
        if student.layers is None or teacher.layers is None or len(student.layers) != 1 or len(teacher.layers) != 1:
            raise ValueError("the 'crd' method needs one student and one teacher layer output "
                             "(StudentOutput.layers, TeacherOutput.layers)")
        if positions is None:
            raise ValueError("the 'crd' method needs the batch's training-set positions (positions=): its memory "
                             "banks have a row per training image")
        hard = ce_loss(student.logits, targets, self.label_smoothing)
        crd = self.contrast(student.layers[0].float(), teacher.layers[0].detach().float(), positions.long())
        total = self.ce_weight * hard + self.feat_weight * crd
        return LossOutput(total, {"ce": hard.detach(), self.feat_term: crd.detach()})


def _distributed():  # noqa: ANN202 - the module
    # imported when first needed: kdlib.distributed imports kdlib.features, which imports this package
    from kdlib import distributed
    return distributed
