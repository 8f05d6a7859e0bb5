"""Pieces shared by the FeDEQ paper's models (Le et al., CIKM 2024, arXiv 2309.15659).

The reference implementation (github.com/longtanle/FeDEQ, JAX/Haiku) is the ground truth for
layouts and initialisation; these helpers reproduce Haiku's default initialisers in PyTorch so the
ported models start where the reference's do.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fedeq_bench.core.errors import BenchError

# Haiku's VarianceScaling("truncated_normal") divides the target stddev by the stddev of a unit
# normal truncated to [-2, 2], so the truncated draw has the variance asked for.
_TRUNC_STD = 0.87962566103423978


# P(Z < -2) for Z ~ N(0, 1): the truncated draw is Phi^-1 of a uniform on [P, 1 - P].
_CDF_MINUS_2 = 0.5 * (1.0 + math.erf(-2.0 / math.sqrt(2.0)))


@torch.no_grad()
def trunc_normal_(w, std: float) -> None:
    """hk.initializers.TruncatedNormal(stddev=std): N(0, std^2) restricted to [-2 std, 2 std].

    Inverse-CDF sampling in place (3 passes over w) rather than nn.init.trunc_normal_, whose
    rejection loop redraws the whole tensor several times: seconds for ResNet-34 on 2 CPU cores.
    """
    w.uniform_(2.0 * _CDF_MINUS_2 - 1.0, 1.0 - 2.0 * _CDF_MINUS_2)
    w.erfinv_().mul_(std * math.sqrt(2.0)).clamp_(-2.0 * std, 2.0 * std)


def variance_scaling_(w, scale: float = 1.0) -> None:
    """hk.initializers.VarianceScaling(scale, "fan_in", "truncated_normal"); Haiku's Conv2D default."""
    fan_in = w[0].numel()  # Linear (out, in) -> in; Conv (out, in, kh, kw) -> in * kh * kw
    trunc_normal_(w, math.sqrt(scale / fan_in) / _TRUNC_STD)


def haiku_linear(d_in: int, d_out: int, bias: bool = True) -> nn.Linear:
    """nn.Linear initialised like hk.Linear: W ~ TruncatedNormal(1/sqrt(d_in)), b = 0."""
    layer = nn.Linear(d_in, d_out, bias=bias)
    trunc_normal_(layer.weight, 1.0 / math.sqrt(d_in))
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def haiku_conv(c_in: int, c_out: int, k: int = 3, stride: int = 1, std: float | None = None) -> nn.Conv2d:
    """Bias-free 'SAME' conv; W ~ Haiku's Conv2D default, or N(0, std^2) when `std` is given."""
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False)
    if std is None:
        variance_scaling_(conv.weight)
    else:
        nn.init.normal_(conv.weight, 0.0, std)
    return conv


def fc_embedding(d_in: int, act: type[nn.Module]) -> nn.Sequential:
    """The reference's shared FC block before the classifier: Linear 256, act, Linear 128, act, BN.

    Parameters: (d_in*256 + 256) + (256*128 + 128) + 2*128 (BN scale and shift).
    """
    return nn.Sequential(haiku_linear(d_in, 256), act(), haiku_linear(256, 128), act(), nn.BatchNorm1d(128))


def image_shape(model: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise BenchError(f"model {model!r} needs image input (C, H, W); this dataset gives shape {input_shape}")
    c, h, w = input_shape
    return int(c), int(h), int(w)


def deq_class(model: str):
    """`methods.deq.DEQ`, looked up at build time (so a DEQ model fails helpfully if it is missing)."""
    try:
        from fedeq_bench.methods.deq import DEQ
    except ImportError as e:
        raise BenchError(f"model {model!r} needs methods.deq.DEQ, which is not available: {e}") from None
    return DEQ
