"""Which units compute attention, and SmartFRZ stopping before the first one unless asked.

Attention here is an op that multiplies two tensors each computed from both the batch and
trained weights (q·kᵀ, then the weights·v), in any form: fused SDPA, eager matmuls, MHA's fast
path. Convolutions, MLPs, Mixers, RNNs, tied heads and graph convolutions over an input
adjacency are not attention, and none of their units may be marked."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smartfrz_fast import SmartFreezer, SmartFRZ
from smartfrz_fast.lab import zoo
from smartfrz_fast.units import discover_units

from test_smartfrz_policy import predictor_file


def first_attention(model, *args, **kwargs):
    """(name of the first unit that computes attention, the module it does so in), or None."""
    plan = discover_units(model, args, kwargs or None)
    return next(((u.name, u.attention) for u in plan.units if u.attention), None)


class Encoder(nn.Module):
    """Token and position embeddings, torch's pre-norm encoder layers, a head."""

    def __init__(self, layers=2, d=16):
        super().__init__()
        self.emb = nn.Embedding(32, d)
        self.pos = nn.Embedding(8, d)
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True,
                                                                norm_first=True) for _ in range(layers)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.emb(x) + self.pos.weight[: x.shape[1]]
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(1))


def tokens(n=4, seq=8, seed=0):
    return torch.randint(0, 32, (n, seq), generator=torch.Generator().manual_seed(seed))


class EagerAttention(nn.Module):
    """Attention written out (q @ kᵀ, softmax, @ v) as Hugging Face's eager path does."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        w = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 4.0, -1)
        return self.o(w @ self.v(x))


class Kernel(nn.Module):
    """A parameter-free module around F.scaled_dot_product_attention (timm's fused_attn style)."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class WrappedKernelAttention(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.stem = nn.Linear(6, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.kernel = Kernel()
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        q, k, v = self.qkv(self.stem(x)).chunk(3, -1)
        return self.head(self.kernel(q, k, v).mean(1))


class Perceiver(nn.Module):
    """Learned latent queries (from weights only) cross-attend to the encoded batch."""

    def __init__(self, d=16):
        super().__init__()
        self.encode = nn.Linear(6, d)
        self.latents = nn.Parameter(torch.randn(4, d))
        self.cross = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = self.encode(x)
        q = self.latents.expand(x.shape[0], -1, -1)
        return self.head(self.cross(q, h, h)[0].mean(1))


class GCN(nn.Module):
    """Graph convolution: the adjacency is the batch's, not computed from it by weights."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x, adjacency):
        return adjacency @ self.l2(F.relu(adjacency @ self.l1(x)))


class TiedGRU(nn.Module):
    """A recurrent LM whose head is the embedding, transposed (hidden @ weightᵀ)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.gru = nn.GRU(16, 16, batch_first=True)

    def forward(self, x):
        return self.gru(self.emb(x))[0] @ self.emb.weight.t()


class Seq2Seq(nn.Module):
    """An LSTM decoder started from the encoder's state (computed from the batch and weights)."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.LSTM(8, 16, batch_first=True), nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.dec(x, self.enc(x)[1])[0][:, -1])


class TwoTowers(nn.Module):
    """CLIP-style logits: the product of two towers' outputs, in the model's own forward."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(8, 16)

    def forward(self, x, y):
        return self.a(x) @ self.b(y).t()


def weight_norm_mlp():
    wn = nn.utils.parametrizations.weight_norm
    return nn.Sequential(wn(nn.Linear(8, 16)), nn.ReLU(), wn(nn.Linear(16, 4)))


def mha_model():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            h = self.embed(x)
            return self.head(self.attn(h, h, h)[0].mean(1))
    return M()


def test_transformers_built_every_way_are_found():
    img = torch.randn(2, 1, 16, 16)
    assert first_attention(zoo.TinyViT(2, 32), img) == ("blocks.0.attn.qkv", "blocks.0.attn")  # F.sdpa
    assert first_attention(zoo.TinyLM(2, 16), torch.randint(0, 256, (2, 8))) == ("blocks.0.attn.qkv", "blocks.0.attn")
    assert first_attention(Encoder(), tokens()) == ("layers.0.self_attn", "layers.0.self_attn")
    x = torch.randn(2, 5, 8)
    assert first_attention(mha_model(), x) == ("attn", "attn")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # weights cast by autocast: the same layers
        assert marked(mha_model(), x) == ["attn"]
    eager = nn.Sequential(nn.Linear(6, 16), EagerAttention(), nn.Linear(16, 2))
    # the layers that make q, k and v
    assert marked(eager, torch.randn(2, 5, 6)) == ["1.q", "1.k", "1.v"]
    assert first_attention(eager, torch.randn(2, 5, 6)) == ("1.q", "1")
    assert first_attention(WrappedKernelAttention(), torch.randn(2, 5, 6)) == ("qkv", "kernel")
    # the learned latent queries (the model's own parameter) take part, and the projections
    assert marked(Perceiver(), torch.randn(2, 5, 6)) == ["<root>", "cross"]


@pytest.mark.parametrize("build, batch", [(Encoder, tokens), (mha_model, lambda: torch.randn(2, 5, 8))])
def test_units_found_in_eval_mode_are_those_of_training(build, batch):
    # in eval mode without gradients torch runs these layers as one fused op, with no FLOP
    # formula and reading two units' weights: attention units counted as free (a freezer set up
    # after an evaluation reported 3.9 % of the step saved for 18.1 %) and looked shared
    torch.manual_seed(0)
    model, x = build(), batch()
    plans = [discover_units(model.train(mode), (x,)) for mode in (True, False)]
    assert [(u.name, u.forward_flops, u.attention) for u in plans[1].units] == \
           [(u.name, u.forward_flops, u.attention) for u in plans[0].units]
    assert all(u.forward_flops > 0 for u in plans[1].units if u.attention)
    assert [s.name for s in plans[1].shared] == [s.name for s in plans[0].shared]
    assert torch.backends.mha.get_fastpath_enabled()  # put back


def marked(model, *args):
    return [u.name for u in discover_units(model, args).units if u.attention]


class RootAttention(nn.Module):
    """Attention written in the model's own forward, no attention module."""

    def __init__(self, d=16):
        super().__init__()
        self.emb = nn.Embedding(32, d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.emb(x)
        return self.head(F.scaled_dot_product_attention(self.q(h), self.k(h), self.v(h)).mean(1))


class CachedAttention(nn.Module):
    """Meta's reference Llama style: keys and values written into a larger cache by slice
    assignment, then read back as slices of it."""

    def __init__(self, d=16, max_len=16):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.register_buffer("cache_k", torch.zeros(4, max_len, d), persistent=False)
        self.register_buffer("cache_v", torch.zeros(4, max_len, d), persistent=False)

    def forward(self, h):
        b, t, _ = h.shape
        self.cache_k[:b, :t] = self.k(h)
        self.cache_v[:b, :t] = self.v(h)
        keys, values = self.cache_k[:b, :t], self.cache_v[:b, :t]
        w = torch.softmax(self.q(h) @ keys.transpose(1, 2), -1)
        return w @ values


class AdditiveAttentionPool(nn.Module):
    """Bahdanau-style scores (no q·kᵀ product), a learned query, a softmax-weighted sum."""

    def __init__(self, d=16):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.score = nn.Linear(d, 1)

    def forward(self, h):
        w = torch.softmax(self.score(torch.tanh(self.proj(h))).squeeze(-1), -1)
        return (w.unsqueeze(1) @ h).squeeze(1)


class HardRoutedExperts(nn.Module):
    """Tokens dispatched to experts and combined by products with a one-hot mask from the
    router's argmax (indices: no gradient reaches the router through them)."""

    def __init__(self, experts=3, d=16):
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.w = nn.Parameter(torch.randn(experts, d, d) * 0.1)

    def forward(self, h):
        t = h.reshape(-1, h.shape[-1])
        mask = F.one_hot(self.router(t).argmax(-1), self.w.shape[0]).to(t.dtype)
        out = torch.bmm(torch.einsum("te,td->etd", mask, t), self.w)
        return torch.einsum("te,etd->td", mask, out).view(h.shape)


class ScaledAttention(EagerAttention):
    """Scores times a learned temperature, attention weights times a learned per-query gate:
    elementwise ops with weights, between the products."""

    def __init__(self, d=16):
        super().__init__(d)
        self.temperature = nn.Parameter(torch.ones(1))
        self.gate = nn.Parameter(torch.ones(1, 5, 1))

    def forward(self, x):
        w = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) * self.temperature, -1) * self.gate
        return self.o(w @ self.v(x))


def test_weights_read_elementwise_between_the_products_keep_q_k_and_v():
    model = nn.Sequential(nn.Linear(6, 16), ScaledAttention(), nn.Linear(16, 2))
    assert {"1.q", "1.k", "1.v"} <= set(marked(model, torch.randn(2, 5, 6)))
    assert "0" not in marked(model, torch.randn(2, 5, 6))


class TalkingHeads(nn.Module):
    """Layers over the heads before and after the softmax (Shazeer et al. 2020; CaiT), and the
    query factored into two layers with a norm between (DeepSeek's q_a / q_b, a LoRA's A and B)."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.heads = heads
        self.q_a, self.q_norm, self.q_b = nn.Linear(d, 4), nn.LayerNorm(4), nn.Linear(4, d)
        self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.pre, self.post = nn.Linear(heads, heads), nn.Linear(heads, heads)

    def forward(self, x):
        b, t, d = x.shape

        def split(y):
            return y.view(b, t, self.heads, -1).transpose(1, 2)

        s = split(self.q_b(self.q_norm(self.q_a(x)))) @ split(self.k(x)).transpose(-1, -2)
        w = self.post(torch.softmax(self.pre(s.permute(0, 2, 3, 1)), -2)).permute(0, 3, 1, 2)
        return self.o((w @ split(self.v(x))).transpose(1, 2).reshape(b, t, d))


class CacheViewAttention(nn.Module):
    """A cache split into heads by a view, written by slice assignment through that view."""

    def __init__(self, d=16, heads=2, max_len=12):
        super().__init__()
        self.heads, self.max_len = heads, max_len
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        ck = torch.zeros(b, self.max_len, d).view(b, self.max_len, self.heads, -1)
        cv = torch.zeros(b, self.max_len, d).view(b, self.max_len, self.heads, -1)
        ck[:, :t] = self.k(x).view(b, t, self.heads, -1)
        cv[:, :t] = self.v(x).view(b, t, self.heads, -1)
        q = self.q(x).view(b, t, self.heads, -1).transpose(1, 2)
        w = torch.softmax(q @ ck[:, :t].permute(0, 2, 3, 1), -1)
        return (w @ cv[:, :t].transpose(1, 2)).transpose(1, 2).reshape(b, t, d)


class MaskedStemAttention(nn.Module):
    """A conv stem, then attention with a mask made by ``h.new_ones`` (only h's shape goes in)."""

    def __init__(self, d=8):
        super().__init__()
        self.stem = nn.Conv1d(3, d, 3, padding=1)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = self.stem(x).transpose(1, 2)
        mask = h.new_ones(h.shape[:2])
        s = self.q(h) @ self.k(h).transpose(1, 2) * mask[:, None, :] + torch.zeros_like(h)[:, :, :1]
        return self.head((torch.softmax(s, -1) @ self.v(h)).mean(1))


def test_layers_over_the_heads_and_factored_projections_are_marked():
    model = nn.Sequential(nn.Linear(6, 16), TalkingHeads(), nn.Linear(16, 2))
    assert set(marked(model, torch.randn(2, 5, 6))) == {"1.q_a+1.q_norm", "1.q_b", "1.k", "1.v", "1.pre", "1.post"}


def test_a_cache_written_through_an_earlier_view_keeps_its_lineage():
    model = nn.Sequential(nn.Linear(6, 16), CacheViewAttention(), nn.Linear(16, 2))
    assert set(marked(model, torch.randn(2, 5, 6))) == {"1.q", "1.k", "1.v"}


def test_tensors_made_from_another_s_shape_carry_none_of_its_lineage():
    # the stem stays freezable: new_ones / zeros_like took only h's shape
    assert marked(MaskedStemAttention(), torch.randn(2, 3, 7)) == ["q", "k", "v"]


def test_an_rnn_cell_stepped_in_a_python_loop_keeps_the_tracer_small():
    # the cell state never passes a layer: its producers would grow with every step
    import tracemalloc

    cell = nn.LSTMCell(4, 8)

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell, self.head = cell, nn.Linear(8, 2)

        def forward(self, x):
            h = c = x.new_zeros(x.shape[0], 8)
            for t in range(x.shape[1]):
                h, c = self.cell(x[:, t], (h, c))
            return self.head(h)

    model = Loop()
    discover_units(model, (torch.randn(1, 50, 4),))  # warm-up
    peaks = []
    for steps in (500, 1500):
        tracemalloc.start()
        plan = discover_units(model, (torch.randn(1, steps, 4),))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert not any(u.attention for u in plan.units)
    assert peaks[1] < 4 * peaks[0]  # linear in the steps (it was quadratic: 9x for 3x the steps)


def test_attention_in_the_model_s_own_forward_marks_q_k_and_v():
    assert marked(RootAttention(), tokens()) == ["q", "k", "v"]


def test_a_kv_cache_filled_by_slice_assignment_keeps_its_lineage():
    model = nn.Sequential(nn.Linear(6, 16), CachedAttention(), nn.Linear(16, 2))
    assert set(marked(model, torch.randn(2, 5, 6))) == {"1.q", "1.k", "1.v"}


def test_additive_attention_and_attention_pooling_are_found():
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), AdditiveAttentionPool(), nn.Linear(16, 2))
    assert marked(model, torch.randn(2, 5, 6))[0] == "0"  # the pooled values' layer


def test_attention_under_a_lora_adapter_with_frozen_base_weights_is_found():
    model = nn.Sequential(nn.Linear(6, 16), EagerAttention(), nn.Linear(16, 2))
    for layer in (model[1].q, model[1].k):
        layer.weight.requires_grad_(False)
    assert first_attention(model, torch.randn(2, 5, 6)) == ("1.q", "1")


class UnnormalisedAttention(nn.Module):
    """q·kᵀ normalised without a softmax op: sigmoid (Ramapuram et al. 2024), ReLU, a softmax
    written with exp and a sum, Reformer's exp(s - logsumexp)."""

    def __init__(self, normalise, d=16):
        super().__init__()
        self.normalise = normalise
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        s = self.q(x) @ self.k(x).transpose(1, 2) / 4.0
        if self.normalise == "sigmoid":
            w = torch.sigmoid(s - 2.0)
        elif self.normalise == "relu":
            w = torch.relu(s) / x.shape[1]
        elif self.normalise == "exp":
            e = torch.exp(s - s.amax(-1, keepdim=True))
            w = e / e.sum(-1, keepdim=True)
        else:
            w = torch.exp(s - torch.logsumexp(s, -1, keepdim=True))
        return self.o(w @ self.v(x))


class LinearAttention(nn.Module):
    """Katharopoulos et al. 2020: φ(q)·(φ(k)ᵀ·v) with φ = elu + 1; causal, in its quadratic form
    (masked φ(q)·φ(k)ᵀ, then ·v: the form chunked kernels use within a chunk); or Performer-style
    random features from a fixed projection buffer. (Causal in its recurrent form, running sums of
    k ⊗ v outer products, has a state-space scan's structure and is not recognised.)"""

    def __init__(self, form, d=16):
        super().__init__()
        self.form = form
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.register_buffer("features", torch.randn(d, 8))

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.form == "performer":
            q, k = torch.exp(q @ self.features - 1.0), torch.exp(k @ self.features - 1.0)
        else:
            q, k = F.elu(q) + 1, F.elu(k) + 1
        if self.form == "causal":
            w = (q @ k.transpose(1, 2)).tril()
            out = w @ v / w.sum(-1, keepdim=True)
        else:
            out = q @ (k.transpose(1, 2) @ v) / (q @ k.sum(1, keepdim=True).transpose(1, 2))
        return self.o(out)


@pytest.mark.parametrize("normalise", ["sigmoid", "relu", "exp", "logsumexp"])
def test_attention_normalised_without_a_softmax_op_is_found(normalise):
    model = nn.Sequential(nn.Linear(6, 16), UnnormalisedAttention(normalise), nn.Linear(16, 2))
    assert set(marked(model, torch.randn(2, 5, 6))) == {"1.q", "1.k", "1.v"}


def test_attention_scores_on_the_meta_device_are_found():
    # every meta tensor's address is 0: q and kᵀ looked like one tensor's values (a Gram matrix)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 16), UnnormalisedAttention("sigmoid"), nn.Linear(16, 2))
    assert set(marked(model, torch.randn(2, 5, 6, device="meta"))) == {"1.q", "1.k", "1.v"}


@pytest.mark.parametrize("form", ["elu", "causal", "performer"])
def test_linear_attention_is_found(form):
    model = nn.Sequential(nn.Linear(6, 16), LinearAttention(form), nn.Linear(16, 2))
    assert set(marked(model, torch.randn(2, 5, 6))) == {"1.q", "1.k", "1.v"}


class GramPooling(nn.Module):
    """Bilinear (second-order) pooling of conv features: xᵀ·x, a signed square root, a classifier."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        f = self.conv2(torch.relu(self.conv1(x))).flatten(2)
        g = f @ f.transpose(1, 2) / f.shape[-1]
        return self.head(F.normalize(torch.sign(g) * g.abs().sqrt(), dim=-1).flatten(1))


class PairwiseInteractions(nn.Module):
    """DLRM: the dot products of every pair of feature embeddings, then an MLP over them; and a
    hypernetwork's per-example weights applied by a product, twice, a layer between."""

    def __init__(self, d=8):
        super().__init__()
        self.emb = nn.ModuleList([nn.Embedding(10, d) for _ in range(4)])
        self.top = nn.Linear(16, 8)
        self.hyper1, self.hyper2 = nn.Linear(8, 64), nn.Linear(8, 64)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, ids):
        t = torch.stack([e(ids[:, i]) for i, e in enumerate(self.emb)], 1)
        h = torch.relu(self.top((t @ t.transpose(1, 2)).flatten(1)))
        h = torch.relu(self.mid((h.unsqueeze(1) @ self.hyper1(h).view(-1, 8, 8)).squeeze(1)))
        h = (h.unsqueeze(1) @ self.hyper2(h).view(-1, 8, 8)).squeeze(1)
        return self.head(h)


class GramOfGrams(nn.Module):
    """Style features: the Gram matrices of two conv layers' outputs, multiplied together."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
        self.head = nn.Linear(64, 2)

    def forward(self, x):
        f1 = torch.relu(self.conv1(x))
        f2 = torch.relu(self.conv2(f1))
        g1 = f1.flatten(2) @ f1.flatten(2).transpose(1, 2)
        g2 = f2.flatten(2) @ f2.flatten(2).transpose(1, 2)
        return self.head((g1 @ g2).flatten(1))


def test_single_products_of_two_computed_tensors_are_not_attention():
    assert first_attention(GramPooling(), torch.randn(2, 1, 6, 6)) is None
    assert first_attention(PairwiseInteractions(), torch.randint(0, 10, (3, 4))) is None
    # a Gram matrix x·xᵀ is no attention scores, and neither is a product of two of them
    assert first_attention(GramOfGrams(), torch.randn(2, 3, 8, 8)) is None


@pytest.mark.parametrize("name, build, inputs", [
    ("mixer", lambda: zoo.Mixer(2, 16), lambda: (torch.randn(2, 1, 16, 16),)),
    ("resnet", lambda: zoo.ResNet(1, 8), lambda: (torch.randn(2, 1, 16, 16),)),
    ("separable cnn", lambda: zoo.SeparableCNN(2, 8), lambda: (torch.randn(2, 1, 16, 16),)),
    ("row gru", lambda: zoo.RowGRU(2, 16), lambda: (torch.randn(2, 1, 16, 16),)),
    ("gcn, dense adjacency", GCN, lambda: (torch.randn(6, 8), torch.rand(6, 6))),
    ("gcn, sparse adjacency", GCN, lambda: (torch.randn(6, 8), torch.rand(6, 6).to_sparse())),
    ("weight norm", weight_norm_mlp, lambda: (torch.randn(3, 8),)),
    ("tied gru lm", TiedGRU, lambda: (torch.randint(0, 50, (2, 7)),)),
    ("seq2seq lstm", Seq2Seq, lambda: (torch.randn(2, 5, 8),)),
])
def test_no_attention_in_models_without_it(name, build, inputs):
    assert first_attention(build(), *inputs()) is None


def test_products_without_softmax_weights_are_not_attention():
    # CLIP-style logits of two towers, bare or inside a wrapper (a LightningModule holding it)
    assert first_attention(TwoTowers(), torch.randn(3, 8), torch.randn(3, 8)) is None
    wrapper = nn.Module()
    wrapper.model = TwoTowers()
    wrapper.forward = lambda x, y: wrapper.model(x, y)
    assert first_attention(wrapper, torch.randn(3, 8), torch.randn(3, 8)) is None
    # experts routed by an argmax one-hot mask
    model = nn.Sequential(nn.Linear(6, 16), HardRoutedExperts(), nn.Linear(16, 2))
    assert first_attention(model, torch.randn(2, 5, 6)) is None


def test_state_space_models_are_not_attention():
    transformers = pytest.importorskip("transformers")
    model = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=40, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4))
    assert first_attention(model, torch.randint(0, 40, (2, 6))) is None


def test_hugging_face_attention_is_found_in_eager_and_sdpa():
    transformers = pytest.importorskip("transformers")
    for impl in ("eager", "sdpa"):
        config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32, attn_implementation=impl)
        model = transformers.BertForSequenceClassification(config)
        unit, where = first_attention(model, input_ids=torch.randint(0, 40, (2, 6)))
        assert (unit, where) == ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self")


# ---------------------------------------------------------------- SmartFRZ stops before it
def confident_run(tmp_path, **kwargs):
    """An encoder trained with a predictor that calls every unit freezable."""
    torch.manual_seed(0)
    model = Encoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    policy = SmartFRZ(settle_ratio=None, min_flops_share=0.0, weights=predictor_file(tmp_path / "p.pt", 20.0),
                      evaluate_every=2, **kwargs)
    freezer = SmartFreezer(model, opt, policy, example_inputs=tokens(), window=4, sample_size=16, sample_every=2)
    for step in range(12):
        x = tokens(seed=step)
        F.cross_entropy(model(x), x[:, 0] % 3).backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    return freezer


def test_smartfrz_freezes_no_attention_unit_by_default(tmp_path):
    freezer = confident_run(tmp_path)
    stop = next(u.index for u in freezer.units if u.attention)
    assert freezer.units[stop].name == "layers.0.self_attn"
    assert freezer.timeline and freezer.num_frozen == stop
    assert all(p.requires_grad for u in freezer.units[stop:] for p in u.parameters)
    report = freezer.report()
    assert "freeze_attention=False" in report and "'layers.0.self_attn', the first that takes part in attention" in report
    # the settings line is the unbound policy's (a checkpoint and the lab's rebuild compare it)
    assert freezer.policy.describe() == SmartFRZ(settle_ratio=None, min_flops_share=0.0, evaluate_every=2,
                                                 weights=predictor_file(tmp_path / "q.pt", 20.0)).describe()


def test_freeze_attention_lets_them_freeze(tmp_path):
    freezer = confident_run(tmp_path, freeze_attention=True)
    assert freezer.num_frozen == len(freezer.units) - 1  # all but the kept head
    assert "takes part in attention" not in freezer.report()


def test_a_model_without_attention_is_not_held(tmp_path):
    policy = SmartFRZ(weights=predictor_file(tmp_path / "p.pt"))
    model = zoo.Mixer(2, 16)
    SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), policy, example_inputs=torch.randn(2, 1, 16, 16),
                 window=4, sample_size=16, total_steps=100)
    assert policy.attention_stop is None and not any("attention" in line for line in policy.report_lines())


@pytest.mark.parametrize("value", [1, "yes", None])
def test_bad_freeze_attention(tmp_path, value):
    with pytest.raises(ValueError, match="freeze_attention is True or False"):
        SmartFRZ(freeze_attention=value, weights=predictor_file(tmp_path / "p.pt"))


def test_a_transformer_with_nothing_freezable_before_its_attention_is_told_at_construction(tmp_path):
    # the encoder's units before its first attention layer are embeddings: no FLOPs to save
    model = Encoder()
    with pytest.warns(UserWarning, match=r"will freeze nothing on this model: .*'layers.0.self_attn'.*0.0% of the "
                                         r"FLOPs.*freeze_attention=True") as caught:
        SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), SmartFRZ(weights=predictor_file(tmp_path / "p.pt")),
                     example_inputs=tokens(), window=4, sample_size=16, total_steps=100)
    assert caught[0].filename == __file__  # points at the user's line
    # set up at the first forward pass (no example inputs): the warning points at that call
    model = Encoder()
    SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), SmartFRZ(weights=predictor_file(tmp_path / "p.pt")),
                 window=4, sample_size=16, total_steps=100)
    with pytest.warns(UserWarning, match="will freeze nothing") as caught:
        model(tokens())
    assert [w.filename for w in caught if "will freeze nothing" in str(w.message)] == [__file__]
    # a ViT's patch embedding holds enough to freeze: no warning
    vit = zoo.TinyViT(1, 32)  # (at depth 2 its patch embedding holds 1.9 % once attention is counted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SmartFreezer(vit, torch.optim.SGD(vit.parameters(), lr=0.1), SmartFRZ(weights=predictor_file(tmp_path / "p.pt")),
                     example_inputs=torch.randn(2, 1, 16, 16), window=4, sample_size=16, total_steps=100)
    # nor with freeze_attention=True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                     SmartFRZ(weights=predictor_file(tmp_path / "p.pt"), freeze_attention=True),
                     example_inputs=tokens(), window=4, sample_size=16, total_steps=100)


def test_flex_attention_is_traced_and_found():
    # a higher-order op that compiles itself when called eagerly: the traced pass failed on it
    flex = pytest.importorskip("torch.nn.attention.flex_attention")

    class FlexBlock(nn.Module):
        def __init__(self, d=16, heads=2):
            super().__init__()
            self.heads = heads
            self.emb = nn.Embedding(50, d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

        def forward(self, ids):
            h = self.emb(ids)
            b, t, d = h.shape
            q, k, v = (f(h).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))

            def causal(score, batch, head, q_index, k_index):
                return torch.where(q_index >= k_index, score, -float("inf"))

            return self.o(flex.flex_attention(q, k, v, score_mod=causal).transpose(1, 2).reshape(b, t, d))

    debug = flex._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG
    assert marked(FlexBlock(), tokens()) == ["q", "k", "v"]
    assert flex._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG == debug  # the user's switch as it was
