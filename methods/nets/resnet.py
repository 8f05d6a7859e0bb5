"""Explicit ResNet baselines of FeDEQ (Le et al., CIKM 2024, arXiv 2309.15659): `resnet20` (FEMNIST)
and `resnet34` (CIFAR-10/100).

Ported from the reference's utils/resnet_femnist.py and utils/resnet_cifar{,100}.py
(github.com/longtanle/FeDEQ, Haiku ResNet v1 with basic blocks). Both end in the reference's FC
block: global mean pool, Linear 256, ReLU, Linear 128, ReLU, BatchNorm (shared), then the personal
classifier (the reference's `player_logits`, the only personal layer).

    block:  relu(BN(conv3x3(relu(BN(conv3x3/s(x))))) + shortcut(x))

`resnet20` (FEMNIST layout): stem conv3x3(32)-BN-ReLU; 4 groups of (2, 3, 2, 2) blocks with
(32, 64, 128, 256) channels and strides (1, 2, 2, 2); groups 2-4 open with a projection shortcut
(conv1x1/s + BN).

`resnet34` (CIFAR layout): stem conv3x3(64)-ReLU-BN (the reference's order); 3 groups of (5, 6, 5)
blocks (CIFAR-10) or (3, 5, 8) blocks (CIFAR-100) with (64, 128, 256) channels and strides
(1, 2, 2); parameter-free "option A" shortcuts (subsample by 2, zero-pad channels c/4 each side).
The classifier starts at zero, as the reference's CIFAR ResNets do.

Conv weights use Haiku's Conv2D default (VarianceScaling(1, fan_in, truncated normal)); linears
Haiku's Linear default; BatchNorm momentum 0.1 = Haiku decay 0.9, eps 1e-5.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from fedeq_bench.methods.nets import BodyHead, register_model
from fedeq_bench.methods.nets.common import fc_embedding, haiku_conv, haiku_linear, image_shape


class BasicBlock(nn.Module):
    """ResNet v1 basic block; shortcut: identity, 'projection' (conv1x1/s + BN) or 'pad' (option A)."""

    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: str):
        super().__init__()
        self.conv0 = haiku_conv(c_in, c_out, 3, stride)
        self.bn0 = nn.BatchNorm2d(c_out)
        self.conv1 = haiku_conv(c_out, c_out, 3, 1)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.shortcut = shortcut
        self.stride = stride
        self.pad = (c_out - c_in) // 2
        if shortcut == "projection":
            self.proj = nn.Sequential(haiku_conv(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.bn1(self.conv1(F.relu(self.bn0(self.conv0(x)))))
        if self.shortcut == "projection":
            s = self.proj(x)
        elif self.shortcut == "pad" and self.stride != 1:
            # The reference pads channels by c_out // 4 on each side: 64 -> 128 -> 256.
            s = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        else:
            s = x
        return F.relu(out + s)


class ResNetBody(nn.Module):
    def __init__(self, stem: nn.Sequential, c0: int, blocks, channels, strides, shortcut: str,
                 projection: tuple[bool, ...] | None = None):
        super().__init__()
        self.stem = stem
        groups, c_in = [], c0
        for g, (n, c, s) in enumerate(zip(blocks, channels, strides, strict=True)):
            kind = shortcut if projection is None or projection[g] else "identity"
            groups.append(nn.Sequential(*[
                BasicBlock(c_in if i == 0 else c, c, s if i == 0 else 1, kind if i == 0 else "identity")
                for i in range(n)
            ]))
            c_in = c
        self.groups = nn.Sequential(*groups)
        self.fc = fc_embedding(c_in, nn.ReLU)

    def forward(self, x):
        return self.fc(self.groups(self.stem(x)).mean((2, 3)))


@register_model("resnet20")
def resnet20(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """ResNet-20 of the reference's FEMNIST baseline (resnet_femnist.ResNet20, v1, no bottleneck).

    Reference count, 28x28x1 input, 62 classes: 2,975,390 parameters, 7,998 personal (128*62 + 62).
    """
    c, _, _ = image_shape("resnet20", input_shape)
    stem = nn.Sequential(haiku_conv(c, 32), nn.BatchNorm2d(32), nn.ReLU())
    body = ResNetBody(stem, 32, (2, 3, 2, 2), (32, 64, 128, 256), (1, 2, 2, 2), "projection",
                      projection=(False, True, True, True))
    return BodyHead(body, haiku_linear(128, num_classes))


RESNET34_BLOCKS = {10: (5, 6, 5), 100: (3, 5, 8)}
"""Blocks per group of the reference's CIFAR ResNet-34 (resnet_cifar.py, resnet_cifar100.py)."""


@register_model("resnet34")
def resnet34(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """ResNet-34 of the reference's CIFAR baselines; the block layout is chosen by `num_classes`.

    100 classes -> (3, 5, 8) blocks (resnet_cifar100.ResNet34); any other count -> (5, 6, 5)
    (resnet_cifar.ResNet34). The reference picks the CIFAR-100 file for every count but 10; here only
    100 classes get (3, 5, 8), so e.g. 62 classes get the CIFAR-10 layout (the reference's FEMNIST
    ResNet-34 is a different, 4-group net that is not ported; FEMNIST's explicit baseline is
    `resnet20`).

    Reference count, 32x32x3 input: 7,779,274 parameters with 10 classes (1,290 personal).
    With 100 classes and (3, 5, 8) blocks: 10,889,508 (12,900 personal), counted from the
    same layout (not a number quoted by the reference).
    """
    c, _, _ = image_shape("resnet34", input_shape)
    blocks = RESNET34_BLOCKS[100] if num_classes == 100 else RESNET34_BLOCKS[10]
    stem = nn.Sequential(haiku_conv(c, 64), nn.ReLU(), nn.BatchNorm2d(64))
    body = ResNetBody(stem, 64, blocks, (64, 128, 256), (1, 2, 2), "pad")
    head = haiku_linear(128, num_classes)
    nn.init.zeros_(head.weight)  # the reference's CIFAR ResNets: logits w_init = zeros
    return BodyHead(body, head)
