"""Character transformers of FeDEQ (Le et al., CIKM 2024, arXiv 2309.15659) for Shakespeare:
`deq_transformer` and its explicit twin `transformer8`.

Ported from the reference (utils/model_utils.py `deq_transformer`, `transformer_shakespeare` and
utils/hk_transformer.py `UTDEQBlock`, `UTBlock` of github.com/longtanle/FeDEQ). d = 64, 4 heads
(head size 16), MLP 256 (GELU, tanh form as jax.nn.gelu), dropout 0.1, vocabulary V = num_classes
(90), sequence T = input_shape[0] (80). One pre-LN layer with input injection u:

    layer(h, u) = h' + Drop(MLP(LN2(h'))),  h' = (h + u) + Drop(CausalAttn(LN1(h + u)))

`deq_transformer`:
    body:  u = E[tokens] + P                                    (token + learned position embeddings)
           z* = f(z*, u),  z0 = 0,  f(z, u) = LN_f(layer_4(... layer_1(z, u) ..., u))
           (f is one block of 4 layers with their own weights; the DEQ ties that block across its
           iterations)                                                           (shared theta)
    head:  logits = Linear(LN(layer(z*, E[tokens])))  at every position, (B, T, V)  (personal w_i)
    (BodyHead: the body hands the head the tuple (z*, injection, attention mask).)
`transformer8` (explicit): body h = layer_7(... layer_1(0, u) ..., u); head as above with
injection u (the reference's UTBlock names its last layer, final LN and classifier `player`).

The reference's personal layer after the DEQ is injected with the token embeddings alone (no
position embeddings); kept. Keys whose token id is 0 are masked (the reference's pad token).

Prediction: the head returns logits at every position, (B, T, V), as the reference: position t
predicts the character after x[t] (causal attention), so `shakespeare.targets = "all"` trains and
scores all T positions. With `shakespeare.targets = "last"` (one label per window, LEAF's next
character) the shared loss and accuracy (methods/train.py `cross_entropy`, `count_correct`) score
the last position only: the same network, the same parameters. The forward accepts float or long
token ids (the harness stores x as float32).

Dropout inside the fixed-point map must be the same at every solver iteration, or the map changes
under the solver: the reference draws one rng key per forward; here the masks are drawn once per
forward (`LockedDropout`-style) and reused by every evaluation of f, including the backward's.

Reference counts (V = 90, T = 80): deq_transformer 266,906 parameters, 55,962 personal.
transformer8: 416,730 parameters, 55,962 personal (counted from the same layout).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedeq_bench.core.errors import BenchError
from fedeq_bench.methods.nets import BodyHead, register_model
from fedeq_bench.methods.nets.common import deq_class, haiku_linear, trunc_normal_, variance_scaling_

D_MODEL, HEADS, MLP_WIDTH, DROPOUT = 64, 4, 256, 0.1
DEQ_LAYERS = 4
EXPLICIT_LAYERS = 8
PAD = 0
"""Token id of padding, masked as a key (the reference's pad_token)."""
EMBED_STD = 0.02


def _scaled_linear(d_in: int, d_out: int, init_scale: float) -> nn.Linear:
    """Linear with the reference's VarianceScaling(init_scale) weights and zero bias."""
    layer = nn.Linear(d_in, d_out)
    variance_scaling_(layer.weight, init_scale)
    nn.init.zeros_(layer.bias)
    return layer


class TransformerLayer(nn.Module):
    """Pre-LN layer with input injection: (h, u) -> h' + MLP(LN2(h')), h' = (h+u) + Attn(LN1(h+u))."""

    def __init__(self, d: int, heads: int, width: int, dropout: float, init_scale: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (_scaled_linear(d, d, init_scale) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(_scaled_linear(d, width, init_scale), nn.GELU(approximate="tanh"),
                                 _scaled_linear(width, d, init_scale))

    def attend(self, h, allowed):
        b, t, d = h.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        # -1e10, not -inf, as the reference: a query with every key masked gets a uniform row, not NaN.
        scores = scores.masked_fill(~allowed, -1e10)
        return self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))

    def forward(self, h, u, allowed, drop=None):
        """`drop`: fixed (attention, MLP) dropout masks; None draws fresh ones (explicit layers)."""
        h = h + u
        a = self.attend(self.ln1(h), allowed)
        a = a * drop[0] if drop is not None else F.dropout(a, self.dropout, self.training)
        h = h + a
        m = self.mlp(self.ln2(h))
        m = m * drop[1] if drop is not None else F.dropout(m, self.dropout, self.training)
        return h + m


class DEQTransformerBlock(nn.Module):
    """f(z, u) = LN_f(layer_L(... layer_1(z, u) ..., u)), the reference's UTDEQBlock.

    The attention mask and dropout masks of the current batch are set by the body before each solve
    (`prepare`): the DEQ calls f(z, u) with two arguments only, and every call within one forward
    (and its backward) must see the same masks.
    """

    def __init__(self, d: int, heads: int, width: int, layers: int, dropout: float):
        super().__init__()
        init_scale = 2.0 / math.sqrt(layers)
        self.dropout = dropout
        self.layers = nn.ModuleList(TransformerLayer(d, heads, width, 0.0, init_scale) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.allowed: torch.Tensor | None = None
        self.drop: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * layers

    def prepare(self, allowed: torch.Tensor, u: torch.Tensor) -> None:
        self.allowed = allowed
        p = self.dropout if self.training else 0.0
        if p == 0.0:
            self.drop = [None] * len(self.layers)
            return
        keep = lambda: u.new_empty(u.shape).bernoulli_(1.0 - p) / (1.0 - p)  # noqa: E731
        self.drop = [(keep(), keep()) for _ in self.layers]

    def forward(self, z, u):
        # The layers were built with dropout 0, so `drop=None` (eval) is no dropout, never a fresh draw.
        for layer, drop in zip(self.layers, self.drop, strict=True):
            z = layer(z, u, self.allowed, drop)
        return self.ln_f(z)


class TokenEmbedding(nn.Module):
    """u = E[tokens] + P (E ~ TruncatedNormal(0.02), as P) and the attention mask."""

    def __init__(self, vocab: int, seq_len: int, d: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d)
        trunc_normal_(self.tokens.weight, EMBED_STD)
        self.pos = nn.Parameter(torch.empty(seq_len, d))
        trunc_normal_(self.pos, EMBED_STD)

    def forward(self, x):
        ids = x.long()  # the harness hands token ids over as float32
        t = ids.shape[1]
        if t > self.pos.shape[0]:
            raise BenchError(f"sequence of {t} tokens is longer than the model's {self.pos.shape[0]}")
        causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
        allowed = causal & (ids > PAD)[:, None, None, :]  # (B, 1, T, T): query t sees keys <= t, not padding
        e = self.tokens(ids)
        return e, e + self.pos[:t], allowed


class DEQTransformerBody(nn.Module):
    """-> (z*, injection for the personal layer, attention mask)."""

    def __init__(self, vocab: int, seq_len: int):
        super().__init__()
        self.embed = TokenEmbedding(vocab, seq_len, D_MODEL)
        self.deq = deq_class("deq_transformer")(DEQTransformerBlock(D_MODEL, HEADS, MLP_WIDTH, DEQ_LAYERS, DROPOUT))

    def forward(self, x):
        e, u, allowed = self.embed(x)
        self.block().prepare(allowed, u)
        z = self.deq(u, z0=torch.zeros_like(u))  # the reference starts from h = 0
        return z, e, allowed  # the reference injects token embeddings only into the personal layer

    def block(self) -> DEQTransformerBlock:
        # Found, not stored: a second attribute would list the block's tensors twice in state_dict.
        for m in self.deq.modules():
            if isinstance(m, DEQTransformerBlock):
                return m
        raise BenchError("methods.deq.DEQ does not register its function as a submodule")


class ExplicitTransformerBody(nn.Module):
    """h = layer_{L-1}(... layer_1(0, u) ..., u); -> (h, u, mask)."""

    def __init__(self, vocab: int, seq_len: int, layers: int):
        super().__init__()
        self.embed = TokenEmbedding(vocab, seq_len, D_MODEL)
        init_scale = 2.0 / math.sqrt(layers)  # the reference's UTBlock scales by its total depth
        self.layers = nn.ModuleList(
            TransformerLayer(D_MODEL, HEADS, MLP_WIDTH, DROPOUT, init_scale) for _ in range(layers - 1))

    def forward(self, x):
        _, u, allowed = self.embed(x)
        h = torch.zeros_like(u)
        for layer in self.layers:
            h = layer(h, u, allowed)
        return h, u, allowed


class PersonalHead(nn.Module):
    """One explicit layer, LayerNorm, classifier at every position: (z, u, mask) -> (B, T, V)."""

    def __init__(self, vocab: int, init_scale: float):
        super().__init__()
        self.layer = TransformerLayer(D_MODEL, HEADS, MLP_WIDTH, DROPOUT, init_scale)
        self.ln_f = nn.LayerNorm(D_MODEL)
        self.out = haiku_linear(D_MODEL, vocab)

    def forward(self, feats):
        z, u, allowed = feats
        h = self.layer(z, u, allowed)
        return self.out(self.ln_f(h))


def _seq_shape(model: str, input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 1:
        raise BenchError(f"model {model!r} needs token sequences (T,); this dataset gives shape {input_shape}")
    return int(input_shape[0])


@register_model("deq_transformer")
def deq_transformer(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """DEQ transformer (Shakespeare). Reference count, V = 90, T = 80: 266,906 parameters:
    embeddings 90*64 + 80*64 = 10,880; DEQ block 4 * 49,984 + 128 = 200,064 (a layer: 2 LN 256,
    attention 4*(64*64 + 64) = 16,640, MLP (64*256 + 256) + (256*64 + 64) = 33,088);
    personal 49,984 + 128 + (64*90 + 90) = 55,962.
    """
    t = _seq_shape("deq_transformer", input_shape)
    # The reference's personal layer is a 1-layer UTDEQBlock: init_scale 2/sqrt(1).
    return BodyHead(DEQTransformerBody(num_classes, t), PersonalHead(num_classes, 2.0))


@register_model("transformer8")
def transformer8(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Explicit 8-layer twin (the reference's `transformer8`): 7 shared layers, 1 personal.

    V = 90, T = 80: 10,880 + 7 * 49,984 = 360,768 shared + 55,962 personal = 416,730.
    """
    t = _seq_shape("transformer8", input_shape)
    init_scale = 2.0 / math.sqrt(EXPLICIT_LAYERS)
    return BodyHead(ExplicitTransformerBody(num_classes, t, EXPLICIT_LAYERS),
                         PersonalHead(num_classes, init_scale))
