"""DEQ-MLP of FeDEQ (Le et al., CIKM 2024, arXiv 2309.15659), for vectors and small images on CPU
(synthetic, Fashion-MNIST).

Ported from the reference `DEQ_MLP_RA_V1` / `MLPBlock_V1` (utils/model_utils.py of
github.com/longtanle/FeDEQ), with softplus in place of the reference's ReLU:

    body:  x = U flatten(input)                   U: d -> hidden, no bias   (the input injection)
           z* = f(z*, x),  z0 = x,  f(z, x) = softplus(W z + x)   W: hidden -> hidden, no bias
           e = softplus(Linear(z*, 128))                                   (shared theta)
    head:  Linear(128, classes)                                            (personal w_i)

Deviations from the reference, none of which changes a parameter count:
  * activation softplus (this project's choice; the reference runs this model with ReLU). Softplus is
    smooth, so the implicit backward's Jacobian exists everywhere.
  * W starts from N(0, 0.01^2) (the scale the reference uses for its DEQ-ResNet convs and names as
    what keeps fixed-point iteration from diverging), not Haiku's default TruncatedNormal(1/sqrt(h)):
    ||W||_2 ~ 0.01 * 2 sqrt(128) ~ 0.23 < 1 and softplus' <= 1, so f starts as a contraction.
  * no bias b in f: the reference has none (U x already shifts the pre-activation per sample).
hidden = 128, the reference class's default (its FEMNIST runs use 512): small enough for CPU.
"""
from __future__ import annotations

import math

from torch import nn

from fedeq_bench.methods.nets import BodyHead, register_model
from fedeq_bench.methods.nets.common import deq_class, haiku_linear

HIDDEN = 128
W_STD = 0.01


class DEQMLPBlock(nn.Module):
    """f(z, x) = softplus(W z + x): the reference's MLPBlock_V1 with softplus."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear_z = nn.Linear(hidden, hidden, bias=False)
        nn.init.normal_(self.linear_z.weight, 0.0, W_STD)
        self.act = nn.Softplus()

    def forward(self, z, x):
        return self.act(self.linear_z(z) + x)


class DEQMLPBody(nn.Module):
    def __init__(self, d_in: int, hidden: int):
        super().__init__()
        self.linear_x = haiku_linear(d_in, hidden, bias=False)
        self.deq = deq_class("deq_mlp")(DEQMLPBlock(hidden))
        self.embed = nn.Sequential(haiku_linear(hidden, 128), nn.Softplus())

    def forward(self, x):
        x = self.linear_x(x.flatten(1))
        z = self.deq(x, z0=x)  # the reference starts the solver at the injection (z0 = x)
        return self.embed(z)


@register_model("deq_mlp")
def deq_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """DEQ-MLP, hidden 128. No reference count (the reference builds it only for FEMNIST/CIFAR with
    hidden 512/1024); parameters = d*128 + 128*128 + (128*128 + 128) + (128*C + C), e.g.
    Fashion-MNIST (d = 784, C = 10): 100,352 + 16,384 + 16,512 + 1,290 = 134,538, 1,290 personal.
    """
    d = math.prod(input_shape)
    return BodyHead(DEQMLPBody(d, HIDDEN), haiku_linear(128, num_classes))
