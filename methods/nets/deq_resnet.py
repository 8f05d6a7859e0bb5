"""DEQ-ResNet of FeDEQ (Le et al., CIKM 2024, arXiv 2309.15659): `deq_resnet_s` (FEMNIST) and
`deq_resnet_m` (CIFAR-10/100).

Ported from the reference `DEQ_Resnet_Softplus` / `ResnetBlock_Softplus` (utils/model_utils.py of
github.com/longtanle/FeDEQ):

    stem:  x = maxpool3x3/2(BN(softplus(conv3x3(input))))                     (c1 channels)
    DEQ:   z* = f(z*, x),  z0 = x,
           f(z, x) = GN(softplus(z + GN(x + conv_b(GN(softplus(conv_a(z)))))))
           conv_a: c1 -> c2, conv_b: c2 -> c1, 3x3, no bias; GroupNorm with 8 groups
    body:  maxpool3x3/2, flatten, Linear 256, softplus, Linear 128, softplus, BN    (shared theta)
    head:  Linear(128, classes)                                                 (personal w_i)

The personal part is only the classifier, as in the reference, whose personal layers are the
modules named `player*` (there: `player_logits`); the FC block and its BatchNorm are shared.
Every conv, the stem's included, starts from N(0, 0.01) weights: the reference notes the small
scale keeps the fixed-point iteration from diverging. Linear layers use Haiku's default init.

Two forms, the same parameters (names and counts):

* `deq_resnet_s`, `deq_resnet_m` (`norm="group"`, `pool="torch"`): standard GroupNorm over
  (C/G, H, W) per example and group, PyTorch's MaxPool2d(3, 2, padding=1).
* `deq_resnet_s_ref`, `deq_resnet_m_ref` (`norm="reference"`, `pool="tf_same"`): the reference's
  arithmetic. Its DEQ block runs per example under `jax.vmap` (`DEQFixedPointRA`), so each
  hk.GroupNorm sees one (H, W, C) image and, taking the leading axis for the batch, normalizes each
  image row h separately over (W, C/G) per group (`RowGroupNorm`). Its max-pools are Haiku's 'SAME'
  3x3/2, which pad as TensorFlow: out = ceil(H/2), total padding (out - 1) * 2 + 3 - H split as
  (floor, ceil) before/after, i.e. (0, 1) for every even size, and padded cells never win
  (`tf_same_max_pool`). PyTorch's padding=1 gives the same output size with windows shifted one
  pixel up/left. The paper presets (configs/paper/) use these.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from fedeq_bench.core.errors import BenchError
from fedeq_bench.methods.nets import BodyHead, register_model
from fedeq_bench.methods.nets.common import deq_class, fc_embedding, haiku_conv, haiku_linear, image_shape

CONV_STD = 0.01
GROUPS = 8


NORMS = ("group", "reference")
POOLS = ("torch", "tf_same")


class RowGroupNorm(nn.GroupNorm):
    """hk.GroupNorm applied to one unbatched (H, W, C) image, as under the reference's vmap: each row
    h of each example is normalized on its own, over (W, C/G) per group; per-channel scale and
    offset as nn.GroupNorm (same parameters, same names)."""

    def forward(self, x):
        b, c, h, w = x.shape
        rows = x.permute(0, 2, 1, 3).reshape(b * h, c, w)  # (B*H, C, W): one "example" per row
        y = F.group_norm(rows, self.num_groups, self.weight, self.bias, self.eps)
        return y.reshape(b, h, c, w).permute(0, 2, 1, 3)


def _ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for positive ints, in integer arithmetic."""
    return -(-a // b)


def _tf_same_pads(n: int, k: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) of one spatial axis of size n."""
    out = -(-n // stride)
    total = max((out - 1) * stride + k - n, 0)
    return total // 2, total - total // 2


def tf_same_max_pool(x, k: int = 3, stride: int = 2):
    """hk.MaxPool(window k, stride, 'SAME'): TF padding, padded cells -inf (never the max)."""
    top, bottom = _tf_same_pads(x.shape[-2], k, stride)
    left, right = _tf_same_pads(x.shape[-1], k, stride)
    return F.max_pool2d(F.pad(x, (left, right, top, bottom), value=float("-inf")), k, stride)


class TFSameMaxPool(nn.Module):
    """Module form of `tf_same_max_pool` (3x3, stride 2)."""

    def forward(self, x):
        return tf_same_max_pool(x, 3, 2)


def _norm(kind: str, groups: int, channels: int) -> nn.GroupNorm:
    return RowGroupNorm(groups, channels) if kind == "reference" else nn.GroupNorm(groups, channels)


def _pool(kind: str) -> nn.Module:
    return TFSameMaxPool() if kind == "tf_same" else nn.MaxPool2d(3, 2, padding=1)


class DEQResBlock(nn.Module):
    """f(z, x) = GN3(softplus(z + GN2(x + conv_b(GN1(softplus(conv_a(z)))))))."""

    def __init__(self, c1: int, c2: int, groups: int = GROUPS, norm: str = "group"):
        super().__init__()
        self.conv_a = haiku_conv(c1, c2, std=CONV_STD)
        self.norm1 = _norm(norm, groups, c2)
        self.conv_b = haiku_conv(c2, c1, std=CONV_STD)
        self.norm2 = _norm(norm, groups, c1)
        self.norm3 = _norm(norm, groups, c1)

    def forward(self, z, x):
        y = self.norm1(F.softplus(self.conv_a(z)))
        y = self.norm2(x + self.conv_b(y))
        return self.norm3(F.softplus(z + y))


class DEQResNetBody(nn.Module):
    """stem -> DEQ(f, z0 = stem output) -> FC embedding; `self.deq` is the FeDEQ-configurable layer."""

    def __init__(self, model: str, input_shape: tuple[int, int, int], c1: int, c2: int,
                 norm: str = "group", pool: str = "torch"):
        super().__init__()
        if norm not in NORMS or pool not in POOLS:
            raise BenchError(f"{model}: norm must be one of {NORMS} and pool one of {POOLS}, got {norm!r}, {pool!r}")
        c, h, w = input_shape
        self.stem = nn.Sequential(haiku_conv(c, c1, std=CONV_STD), nn.Softplus(), nn.BatchNorm2d(c1), _pool(pool))
        self.deq = deq_class(model)(DEQResBlock(c1, c2, norm=norm))
        # Two 3x3/2 pools, either form: H -> ceil(H/2) -> ceil(ceil(H/2)/2); 28 -> 7, 32 -> 8.
        fh, fw = _ceil_div(_ceil_div(h, 2), 2), _ceil_div(_ceil_div(w, 2), 2)
        self.pool = _pool(pool)
        self.fc = fc_embedding(c1 * fh * fw, nn.Softplus)

    def forward(self, x):
        x = self.stem(x)
        z = self.deq(x, z0=x)  # the reference starts the solver at the injection (z0 = x)
        return self.fc(self.pool(z).flatten(1))


def _deq_resnet(model: str, input_shape, num_classes: int, c1: int, c2: int,
                norm: str = "group", pool: str = "torch") -> nn.Module:
    body = DEQResNetBody(model, image_shape(model, input_shape), c1, c2, norm, pool)
    return BodyHead(body, haiku_linear(128, num_classes))


@register_model("deq_resnet_s")
def deq_resnet_s(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """DEQ-ResNet-S (FEMNIST), (c1, c2) = (64, 128).

    Reference count, 28x28x1 input, 62 classes: 992,894 parameters, 7,998 personal (128*62 + 62):
    stem 9*64 + 2*64 = 704; DEQ block 2*9*64*128 + 2*128 + 2*2*64 = 147,968;
    FC (64*7*7*256 + 256) + (256*128 + 128) + 2*128 = 836,224; 704 + 147,968 + 836,224 + 7,998.
    """
    return _deq_resnet("deq_resnet_s", input_shape, num_classes, 64, 128)


@register_model("deq_resnet_m")
def deq_resnet_m(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """DEQ-ResNet-M (CIFAR-10/100), (c1, c2) = (128, 256).

    Reference count, 32x32x3 input: 2,726,410 parameters with 10 classes, 2,738,020 with 100
    (the difference is the classifier: 90 * (128 + 1) = 11,610).
    """
    return _deq_resnet("deq_resnet_m", input_shape, num_classes, 128, 256)


@register_model("deq_resnet_s_ref")
def deq_resnet_s_ref(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """DEQ-ResNet-S in the reference's arithmetic: per-row GroupNorm, TF-SAME max-pools (module
    docstring); parameters as `deq_resnet_s`."""
    return _deq_resnet("deq_resnet_s_ref", input_shape, num_classes, 64, 128, "reference", "tf_same")


@register_model("deq_resnet_m_ref")
def deq_resnet_m_ref(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """DEQ-ResNet-M in the reference's arithmetic (module docstring); parameters as `deq_resnet_m`."""
    return _deq_resnet("deq_resnet_m_ref", input_shape, num_classes, 128, 256, "reference", "tf_same")
