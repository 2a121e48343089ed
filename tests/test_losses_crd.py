"""CRD (``kdlib/losses/crd.py``) against the authors' code, and its memory banks: negatives, state, DDP, resume.

The reference classes below are copied verbatim from RepDistiller (HobbitLong/RepDistiller,
``crd/memory.py`` and ``crd/criterion.py`` at b84f547c5db6a35318d4671d7d5c4de74c822403; BSD 2-Clause
License, Copyright (c) 2020, Yonglong Tian; its notice follows); only their imports are shared. The
comparisons give both the same memory banks, embedding weights, features and negative indices
(``contrast_idx``) and compare, over several steps, the loss, the gradients into both features and both
embeddings, the banks after the momentum update and the normalization constants Z. Largest relative
difference of each, on CPU in float32: 0 (the same operations in the same order).

    BSD 2-Clause License

    Copyright (c) 2020, Yonglong Tian
    All rights reserved.

    Redistribution and use in source and binary forms, with or without
    modification, are permitted provided that the following conditions are met:

    1. Redistributions of source code must retain the above copyright notice, this
       list of conditions and the following disclaimer.

    2. Redistributions in binary form must reproduce the above copyright notice,
       this list of conditions and the following disclaimer in the documentation
       and/or other materials provided with the distribution.

    THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
    AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
    IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
    DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
    FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
    DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
    SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
    CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
    OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
    OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kdlib.losses import METHODS, build_objective
from kdlib.losses.base import SetupContext
from kdlib.losses.crd import other_class_negatives
from kdlib.losses.registry import StudentOutput, TeacherOutput
from kdlib.taps import LayerPlan
from test_train import Crash, CrashingLogger, ListLogger, image_dir, run_fit  # noqa: F401 - image_dir: a fixture


# ---- RepDistiller crd/memory.py (BSD-2-Clause), verbatim ---------------------------------------------------
class ContrastMemory(nn.Module):
    """
    memory buffer that supplies large amount of negative samples.
    """
    def __init__(self, inputSize, outputSize, K, T=0.07, momentum=0.5):
        super(ContrastMemory, self).__init__()
        self.nLem = outputSize
        self.unigrams = torch.ones(self.nLem)
        self.multinomial = AliasMethod(self.unigrams)
        self.multinomial.cuda()
        self.K = K

        self.register_buffer('params', torch.tensor([K, T, -1, -1, momentum]))
        stdv = 1. / math.sqrt(inputSize / 3)
        self.register_buffer('memory_v1', torch.rand(outputSize, inputSize).mul_(2 * stdv).add_(-stdv))
        self.register_buffer('memory_v2', torch.rand(outputSize, inputSize).mul_(2 * stdv).add_(-stdv))

    def forward(self, v1, v2, y, idx=None):
        K = int(self.params[0].item())
        T = self.params[1].item()
        Z_v1 = self.params[2].item()
        Z_v2 = self.params[3].item()

        momentum = self.params[4].item()
        batchSize = v1.size(0)
        outputSize = self.memory_v1.size(0)
        inputSize = self.memory_v1.size(1)

        # original score computation
        if idx is None:
            idx = self.multinomial.draw(batchSize * (self.K + 1)).view(batchSize, -1)
            idx.select(1, 0).copy_(y.data)
        # sample
        weight_v1 = torch.index_select(self.memory_v1, 0, idx.view(-1)).detach()
        weight_v1 = weight_v1.view(batchSize, K + 1, inputSize)
        out_v2 = torch.bmm(weight_v1, v2.view(batchSize, inputSize, 1))
        out_v2 = torch.exp(torch.div(out_v2, T))
        # sample
        weight_v2 = torch.index_select(self.memory_v2, 0, idx.view(-1)).detach()
        weight_v2 = weight_v2.view(batchSize, K + 1, inputSize)
        out_v1 = torch.bmm(weight_v2, v1.view(batchSize, inputSize, 1))
        out_v1 = torch.exp(torch.div(out_v1, T))

        # set Z if haven't been set yet
        if Z_v1 < 0:
            self.params[2] = out_v1.mean() * outputSize
            Z_v1 = self.params[2].clone().detach().item()
            print("normalization constant Z_v1 is set to {:.1f}".format(Z_v1))
        if Z_v2 < 0:
            self.params[3] = out_v2.mean() * outputSize
            Z_v2 = self.params[3].clone().detach().item()
            print("normalization constant Z_v2 is set to {:.1f}".format(Z_v2))

        # compute out_v1, out_v2
        out_v1 = torch.div(out_v1, Z_v1).contiguous()
        out_v2 = torch.div(out_v2, Z_v2).contiguous()

        # update memory
        with torch.no_grad():
            l_pos = torch.index_select(self.memory_v1, 0, y.view(-1))
            l_pos.mul_(momentum)
            l_pos.add_(torch.mul(v1, 1 - momentum))
            l_norm = l_pos.pow(2).sum(1, keepdim=True).pow(0.5)
            updated_v1 = l_pos.div(l_norm)
            self.memory_v1.index_copy_(0, y, updated_v1)

            ab_pos = torch.index_select(self.memory_v2, 0, y.view(-1))
            ab_pos.mul_(momentum)
            ab_pos.add_(torch.mul(v2, 1 - momentum))
            ab_norm = ab_pos.pow(2).sum(1, keepdim=True).pow(0.5)
            updated_v2 = ab_pos.div(ab_norm)
            self.memory_v2.index_copy_(0, y, updated_v2)

        return out_v1, out_v2


class AliasMethod(object):
    """
    From: https://hips.seas.harvard.edu/blog/2013/03/03/the-alias-method-efficient-sampling-with-many-discrete-outcomes/
    """
    def __init__(self, probs):

        if probs.sum() > 1:
            probs.div_(probs.sum())
        K = len(probs)
        self.prob = torch.zeros(K)
        self.alias = torch.LongTensor([0]*K)

        # Sort the data into the outcomes with probabilities
        # that are larger and smaller than 1/K.
        smaller = []
        larger = []
        for kk, prob in enumerate(probs):
            self.prob[kk] = K*prob
            if self.prob[kk] < 1.0:
                smaller.append(kk)
            else:
                larger.append(kk)

        # Loop though and create little binary mixtures that
        # appropriately allocate the larger outcomes over the
        # overall uniform mixture.
        while len(smaller) > 0 and len(larger) > 0:
            small = smaller.pop()
            large = larger.pop()

            self.alias[small] = large
            self.prob[large] = (self.prob[large] - 1.0) + self.prob[small]

            if self.prob[large] < 1.0:
                smaller.append(large)
            else:
                larger.append(large)

        for last_one in smaller+larger:
            self.prob[last_one] = 1

    def cuda(self):
        self.prob = self.prob.cuda()
        self.alias = self.alias.cuda()

    def draw(self, N):
        """ Draw N samples from multinomial """
        K = self.alias.size(0)

        kk = torch.zeros(N, dtype=torch.long, device=self.prob.device).random_(0, K)
        prob = self.prob.index_select(0, kk)
        alias = self.alias.index_select(0, kk)
        # b is whether a random number is greater than q
        b = torch.bernoulli(prob)
        oq = kk.mul(b.long())
        oj = alias.mul((1-b).long())

        return oq + oj


# ---- RepDistiller crd/criterion.py (BSD-2-Clause), verbatim ------------------------------------------------
eps = 1e-7


class CRDLoss(nn.Module):
    """CRD Loss function
    includes two symmetric parts:
    (a) using teacher as anchor, choose positive and negatives over the student side
    (b) using student as anchor, choose positive and negatives over the teacher side

    Args:
        opt.s_dim: the dimension of student's feature
        opt.t_dim: the dimension of teacher's feature
        opt.feat_dim: the dimension of the projection space
        opt.nce_k: number of negatives paired with each positive
        opt.nce_t: the temperature
        opt.nce_m: the momentum for updating the memory buffer
        opt.n_data: the number of samples in the training set, therefor the memory buffer is: opt.n_data x opt.feat_dim
    """
    def __init__(self, opt):
        super(CRDLoss, self).__init__()
        self.embed_s = Embed(opt.s_dim, opt.feat_dim)
        self.embed_t = Embed(opt.t_dim, opt.feat_dim)
        self.contrast = ContrastMemory(opt.feat_dim, opt.n_data, opt.nce_k, opt.nce_t, opt.nce_m)
        self.criterion_t = ContrastLoss(opt.n_data)
        self.criterion_s = ContrastLoss(opt.n_data)

    def forward(self, f_s, f_t, idx, contrast_idx=None):
        """
        Args:
            f_s: the feature of student network, size [batch_size, s_dim]
            f_t: the feature of teacher network, size [batch_size, t_dim]
            idx: the indices of these positive samples in the dataset, size [batch_size]
            contrast_idx: the indices of negative samples, size [batch_size, nce_k]

        Returns:
            The contrastive loss
        """
        f_s = self.embed_s(f_s)
        f_t = self.embed_t(f_t)
        out_s, out_t = self.contrast(f_s, f_t, idx, contrast_idx)
        s_loss = self.criterion_s(out_s)
        t_loss = self.criterion_t(out_t)
        loss = s_loss + t_loss
        return loss


class ContrastLoss(nn.Module):
    """
    contrastive loss, corresponding to Eq (18)
    """
    def __init__(self, n_data):
        super(ContrastLoss, self).__init__()
        self.n_data = n_data

    def forward(self, x):
        bsz = x.shape[0]
        m = x.size(1) - 1

        # noise distribution
        Pn = 1 / float(self.n_data)

        # loss for positive pair
        P_pos = x.select(1, 0)
        log_D1 = torch.div(P_pos, P_pos.add(m * Pn + eps)).log_()

        # loss for K negative pair
        P_neg = x.narrow(1, 1, m)
        log_D0 = torch.div(P_neg.clone().fill_(m * Pn), P_neg.add(m * Pn + eps)).log_()

        loss = - (log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz

        return loss


class Embed(nn.Module):
    """Embedding module"""
    def __init__(self, dim_in=1024, dim_out=128):
        super(Embed, self).__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.l2norm = Normalize(2)

    def forward(self, x):
        x = x.view(x.shape[0], -1)
        x = self.linear(x)
        x = self.l2norm(x)
        return x


class Normalize(nn.Module):
    """normalization layer"""
    def __init__(self, power=2):
        super(Normalize, self).__init__()
        self.power = power

    def forward(self, x):
        norm = x.pow(self.power).sum(1, keepdim=True).pow(1. / self.power)
        out = x.div(norm)
        return out


# ---- end of the verbatim code ------------------------------------------------------------------------------

N, CLASSES, S_DIM, T_DIM, FEAT, K, B = 60, 4, 12, 24, 16, 20, 8
PLAN = LayerPlan(("pre_logits",), ("pre_logits",), ((S_DIM,),), ((T_DIM,),))
# one tolerance for every quantity: float32 rounding of the same operations in the same order (measured: 0 on
# CPU, the original's ops are repeated one for one)
TIGHT = dict(rtol=1e-6, atol=1e-7)


def train_labels() -> torch.Tensor:
    """60 images of 4 classes, in a shuffled order, 15 each."""
    return (torch.arange(N) % CLASSES)[torch.randperm(N, generator=torch.Generator().manual_seed(7))]


def crd(labels: torch.Tensor | None = None, seed: int = 0, **knobs) -> nn.Module:
    """The registered method, set up as kdlib.distill does, on 12-wide student and 24-wide teacher features."""
    method = build_objective("crd", **{"feat_dim": FEAT, "nce_k": K, **knobs})
    labels = train_labels() if labels is None else labels
    method.setup(SetupContext(seed, nn.Identity(), lambda: torch.zeros(0), PLAN, labels))
    return method


@pytest.fixture
def reference(monkeypatch):
    """RepDistiller's CRDLoss with the method's memory banks and embedding weights. ContrastMemory moves its
    AliasMethod sampler to CUDA unconditionally; the comparisons pass contrast_idx, so the sampler is never
    drawn from and stays on the CPU of a machine without CUDA."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(AliasMethod, "cuda", lambda self: None)

    def build(method) -> CRDLoss:
        opt = SimpleNamespace(s_dim=S_DIM, t_dim=T_DIM, feat_dim=FEAT, nce_k=K, nce_t=0.07, nce_m=0.5, n_data=N)
        ref = CRDLoss(opt)
        ref.embed_s.linear.load_state_dict(method.embed_s.linear.state_dict())
        ref.embed_t.linear.load_state_dict(method.embed_t.linear.state_dict())
        ref.contrast.memory_v1.copy_(method.memory_s)
        ref.contrast.memory_v2.copy_(method.memory_t)
        return ref
    return build


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float(((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-12)).max())


def test_loss_gradients_banks_and_z_match_repdistiller_over_steps(reference):
    """Three steps (the embeddings stepped by SGD between them, each side on its own gradients) on the same
    positions, features and negatives: the loss, the gradients into both features and both embeddings, both
    banks after the momentum update and Z (set by the first batch, then kept) agree with the original's."""
    method = crd()
    ref = reference(method)
    gen = torch.Generator().manual_seed(1)
    worst: dict[str, float] = {}
    start_s, start_t = method.memory_s.clone(), method.memory_t.clone()
    seen = []
    for step in range(3):
        positions = torch.randperm(N, generator=gen)[:B]
        f_s, f_t = torch.randn(B, S_DIM, generator=gen) * 3, torch.randn(B, T_DIM, generator=gen) * 3
        idx = torch.cat([positions[:, None], other_class_negatives(method.labels, positions, K)], 1)
        ours_s, ours_t = f_s.clone().requires_grad_(), f_t.clone().requires_grad_()
        theirs_s, theirs_t = f_s.clone().requires_grad_(), f_t.clone().requires_grad_()
        ours = method.contrast(ours_s, ours_t, positions, idx)
        theirs = ref(theirs_s, theirs_t, positions, idx)
        ours.backward()
        theirs.backward()
        pairs = {
            "loss": (ours, theirs.reshape(())),
            "grad f_s": (ours_s.grad, theirs_s.grad), "grad f_t": (ours_t.grad, theirs_t.grad),
            "memory_s": (method.memory_s, ref.contrast.memory_v1),
            "memory_t": (method.memory_t, ref.contrast.memory_v2),
            "Z": (method.z, ref.contrast.params[2:4]),
        }
        for side in ("embed_s", "embed_t"):
            for name in ("weight", "bias"):
                pairs[f"grad {side}.{name}"] = (getattr(getattr(method, side).linear, name).grad,
                                                getattr(getattr(ref, side).linear, name).grad)
        for name, (a, b) in pairs.items():
            torch.testing.assert_close(a, b, **TIGHT, msg=lambda m, n=name, s=step: f"step {s}, {n}: {m}")
            worst[name] = max(worst.get(name, 0.0), relative(a, b))
        if step == 0:
            z_first = method.z.clone()
            assert bool((z_first > 0).all())
        assert torch.equal(method.z, z_first)  # set once, by the first batch
        seen.append(positions)
        with torch.no_grad():  # an SGD step on each side's own gradients
            for p in [*method.trainable_parameters(), *ref.parameters()]:
                p -= 0.5 * p.grad
                p.grad = None
    touched = torch.zeros(N, dtype=torch.bool)
    touched[torch.cat(seen)] = True
    for bank, start in ((method.memory_s, start_s), (method.memory_t, start_t)):
        assert torch.equal(bank[~touched], start[~touched])
        assert not torch.isclose(bank[touched], start[touched]).all(1).any()
        torch.testing.assert_close(bank[touched].norm(dim=1), torch.ones(int(touched.sum())))
    print("largest relative differences to RepDistiller:", worst)


def test_forward_draws_negatives_from_torchs_rng_and_weights_the_terms(reference):
    """forward = ce_weight·CE + feat_weight·(the original's CRD loss), its negatives drawn from torch's global RNG
    (reseeding it draws the same ones again: what a resumed run relies on)."""
    method = crd(ce_weight=0.5, feat_weight=0.8)
    ref = reference(method)
    gen = torch.Generator().manual_seed(2)
    positions = torch.randperm(N, generator=gen)[:B]
    f_s, f_t = torch.randn(B, S_DIM, generator=gen), torch.randn(B, T_DIM, generator=gen)
    logits = torch.randn(B, CLASSES, generator=gen)
    targets = method.labels[positions]
    torch.manual_seed(11)
    idx = torch.cat([positions[:, None], other_class_negatives(method.labels, positions, K)], 1)
    theirs = ref(f_s, f_t, positions, idx).reshape(())
    torch.manual_seed(11)
    out = method(StudentOutput(logits, layers=[f_s]), targets, TeacherOutput(logits, layers=[f_t]), positions=positions)
    ce = nn.functional.cross_entropy(logits, targets)
    torch.testing.assert_close(out.terms["crd"], theirs, **TIGHT)
    torch.testing.assert_close(out.terms["ce"], ce, **TIGHT)
    torch.testing.assert_close(out.total, 0.5 * ce + 0.8 * theirs, **TIGHT)
    torch.testing.assert_close(method.memory_s, ref.contrast.memory_v1, **TIGHT)
    with pytest.raises(ValueError, match="positions"):
        method(StudentOutput(logits, layers=[f_s]), targets, TeacherOutput(logits, layers=[f_t]))


def test_negatives_are_distinct_images_of_other_classes_and_cover_them():
    """Uneven classes (sizes 10, 20, 30): each row's nce_k negatives are distinct, never of the anchor's class, and
    over repeated draws every other-class image turns up; nce_k may equal the fewest other-class images."""
    shuffle = torch.randperm(60, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 30)[shuffle]
    positions = torch.arange(60)
    torch.manual_seed(0)
    drawn = torch.stack([other_class_negatives(labels, positions, 12) for _ in range(60)])  # (draws, 60, 12)
    assert drawn.shape == (60, 60, 12)
    assert not (labels[drawn] == labels[positions][None, :, None]).any()
    assert all(len(set(row.tolist())) == 12 for row in drawn.reshape(-1, 12))
    for anchor in (int((labels == c).nonzero()[0]) for c in range(3)):
        assert set(drawn[:, anchor].flatten().tolist()) == set((labels != labels[anchor]).nonzero().flatten().tolist())
    full = other_class_negatives(labels, positions, 30)  # class 2's anchors: exactly the 30 others
    for anchor in (labels == 2).nonzero().flatten():
        assert sorted(full[anchor].tolist()) == (labels != 2).nonzero().flatten().tolist()
    crd(labels, nce_k=30)


def test_bad_knobs_too_many_negatives_multilabel_and_layer_pairs_are_refused():
    for knob, value, message in [("feat_dim", 0, "feat_dim must be an integer >= 1, got 0"),
                                 ("nce_k", 2.5, "nce_k must be an integer >= 1, got 2.5"),
                                 ("nce_t", 0.0, "nce_t must be a finite number > 0, got 0.0"),
                                 ("nce_m", 1.0, "nce_m must be in \\[0, 1\\)"),
                                 ("nce_m", -0.1, "nce_m must be in \\[0, 1\\], got -0.1"),
                                 ("feat_weight", -1.0, "feat_weight must be a finite number >= 0")]:
        with pytest.raises(ValueError, match=message):
            build_objective("crd", **{knob: value})
    limit = r"nce_k = 46 .* the 45 training images outside class .*; expected nce_k <= 45"
    with pytest.raises(ValueError, match=limit):
        crd(nce_k=46)  # 60 images, 15 a class: 45 of other classes
    crd(nce_k=45)
    assert not METHODS.get("crd").fits("multilabel")
    with pytest.raises(ValueError, match="single-label"):
        build_objective("crd").setup(SetupContext(0, nn.Identity(), lambda: torch.zeros(0), PLAN, None))
    two = LayerPlan(("layer1", "layer2"), ("layer1", "layer2"), ((4, 2, 2), (8, 1, 1)), ((4, 2, 2), (8, 1, 1)))
    assert "one layer each" in build_objective("crd").layer_problem(two)
    with pytest.raises(RuntimeError, match="not set up"):
        build_objective("crd").contrast(torch.zeros(2, 3), torch.zeros(2, 3), torch.arange(2))


def test_state_round_trip_trainable_embeddings_and_a_repeated_position():
    """The banks, Z and the embeddings are the method's state: loaded into a method set up from another seed,
    the next step is the same bit for bit. The embeddings are its trainable parameters, not the banks. Of a
    position twice in one update the last copy writes its row: normalize(m·M + (1 − m)·v_last)."""
    method, other = crd(seed=0), crd(seed=1)
    assert [tuple(p.shape) for p in method.trainable_parameters()] == [(FEAT, S_DIM), (FEAT,), (FEAT, T_DIM), (FEAT,)]
    assert {"memory_s", "memory_t", "z"} <= set(method.state_dict()) and "labels" not in method.state_dict()
    assert not torch.equal(method.memory_s, other.memory_s)
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        method.contrast(torch.randn(B, S_DIM, generator=gen), torch.randn(B, T_DIM, generator=gen),
                        torch.randperm(N, generator=gen)[:B])
    other.load_state_dict(copy.deepcopy(method.state_dict()))
    f_s, f_t = torch.randn(B, S_DIM, generator=gen), torch.randn(B, T_DIM, generator=gen)
    positions = torch.randperm(N, generator=gen)[:B]
    idx = torch.cat([positions[:, None], other_class_negatives(method.labels, positions, K)], 1)
    assert torch.equal(method.contrast(f_s, f_t, positions, idx), other.contrast(f_s, f_t, positions, idx))
    for name, value in method.state_dict().items():
        assert torch.equal(other.state_dict()[name], value), name

    method.load_state_dict(crd(seed=2).state_dict())  # a state whose Z is not set yet: the next batch sets it
    assert torch.equal(method.z, torch.full((2,), -1.0))
    method.contrast(f_s, f_t, positions, idx)
    assert bool((method.z > 0).all())

    before = method.memory_s[3].clone()
    v_s = torch.nn.functional.normalize(torch.randn(3, FEAT, generator=gen), dim=1)
    method._update_banks(torch.tensor([3, 5, 3]), v_s, v_s)
    expected = 0.5 * before + 0.5 * v_s[2]
    torch.testing.assert_close(method.memory_s[3], expected / expected.norm())


def _global_batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Three global batches (positions, student and teacher features); the last has 7 rows, position 2 twice."""
    gen = torch.Generator().manual_seed(5)
    batches = []
    for rows in (B, B, 7):
        positions = torch.randperm(N, generator=gen)[:rows]
        if rows == 7:
            positions[6] = positions[1]
        batches.append((positions, torch.randn(rows, S_DIM, generator=gen), torch.randn(rows, T_DIM, generator=gen)))
    return batches


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from kdlib import distributed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # each process its own embedding init (fit broadcasts rank 0's) and negatives
        method = crd()
        distributed.broadcast_parameters(method.trainable_parameters())
        for positions, f_s, f_t in _global_batches():  # rank 0 the first 4 rows, rank 1 the rest
            mine = slice(0, 4) if rank == 0 else slice(4, None)
            method.contrast(f_s[mine], f_t[mine], positions[mine]).backward()
        torch.save({k: v for k, v in method.state_dict().items()}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_keep_identical_banks_equal_to_one_process_on_the_global_batch(tmp_path: Path):
    """2 gloo processes, each on its half of every global batch (the last uneven, 4 and 3 rows, one image in
    both halves): after three steps both hold the same banks and Z, bit for bit, and the banks are one
    process's on the whole global batches (the gathered rows in rank order, the repeated image's last copy)."""
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    zero, one = (torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1))
    for name in zero:
        assert torch.equal(zero[name], one[name]), name
    torch.manual_seed(0)
    alone = crd()  # rank 0's embeddings
    for positions, f_s, f_t in _global_batches():
        alone.contrast(f_s, f_t, positions)
    for name in ("memory_s", "memory_t"):
        torch.testing.assert_close(zero[name], alone.state_dict()[name], rtol=1e-5, atol=1e-6)
    assert bool((zero["z"] > 0).all())


def crd_run(image_dir, out: Path, epochs: int = 4, logger=None, resume=None):
    """CRD from a cnn_small teacher (seed 3) into a cnn_small student (seed 0) on test_train's 24 images of 3
    classes (16 of other classes per image: nce_k 12), set up as kdlib.distill does, trained by fit."""
    from kdlib.distill import plan_layers
    from kdlib.models import build_model
    from kdlib.runtime import seed_everything
    from kdlib.teacher import OnlineTeacher

    torch.manual_seed(3)
    teacher = OnlineTeacher(build_model("cnn_small", 3, 1))
    seed_everything(0)
    student = build_model("cnn_small", 3, 1)
    method = build_objective("crd", nce_k=12, feat_dim=16)
    plan = plan_layers(method, student, teacher.model, (1, 16), (1, 16))
    teacher.tap(plan.teacher)
    labels = torch.tensor([r.label for r in image_dir[1] if r.split == "train"])
    method.setup(SetupContext(0, teacher.model, lambda: torch.zeros(0), plan, labels))
    start = copy.deepcopy(method.state_dict())
    run_fit(image_dir, out, epochs=epochs, objective=method, teacher=teacher, logger=logger, resume=resume,
            model=student)
    return method, start


def test_crd_trains_through_fit_and_a_crashed_run_resumes_to_the_same_bytes(image_dir, tmp_path):
    """Through kdlib.train.fit: the crd term is logged, the embeddings train, every bank row is written (each
    image is seen every epoch) and Z is set; a run crashed at epoch 3 resumes (banks, Z, embeddings and torch's
    RNG from the resume state: the same negatives) to the same method state and checkpoint bytes."""
    from kdlib.resume import ResumeStore

    method, start = crd_run(image_dir, tmp_path / "whole", logger=(log := ListLogger()))
    assert len([row["train/crd"] for row in log.rows if "train/crd" in row]) == 4
    assert not torch.equal(method.embed_s.linear.weight, start["embed_s.linear.weight"])
    assert not torch.isclose(method.memory_t, start["memory_t"]).all(1).any() and bool((method.z > 0).all())

    store = ResumeStore(tmp_path / "state", "run key")
    with pytest.raises(Crash):
        crd_run(image_dir, tmp_path / "first", logger=CrashingLogger(at=3), resume=store)
    resumed, _ = crd_run(image_dir, tmp_path / "second", resume=store)
    for name, value in method.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    for name in ("best.pt", "last.pt"):
        assert (tmp_path / "second" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
