"""Models, registered by name. Each names its parts: parameters under `body.` are the shared
representation, parameters under `head.` the personal classifier (FedRep, FeDEQ, ...)."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
register_model = MODELS.register


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return MODELS.get(name)(tuple(input_shape), int(num_classes))


def probe(name: str, input_shape: tuple[int, ...], num_classes: int, x: torch.Tensor) -> None:
    """Build model `name` and run a real batch `x` (a client's first samples, as training will see
    them) through it, in a fork of torch's global generator: a model that cannot take this data (a
    transformer fed float features, a shape the layers do not fit) fails here with one BenchError
    line, before anything is recorded, instead of in round 1. The output must end in num_classes."""
    from fedeq_bench.core import seeding

    with seeding.GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        net = build_model(name, input_shape, num_classes)
        net.eval()
        try:
            with torch.no_grad():
                out = net(x)
        except Exception as e:  # any library error here means: this model does not fit this data
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise BenchError(f"model {name!r} cannot take this dataset's samples (shape {tuple(x.shape[1:])}, "
                             f"dtype {x.dtype}): {type(e).__name__}: {first}") from None
    if not isinstance(out, torch.Tensor) or out.ndim < 2 or out.shape[0] != x.shape[0] or out.shape[-1] != num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BenchError(f"model {name!r} gives output {shape} for {x.shape[0]} samples; "
                         f"expected (samples, ..., {num_classes}) for this dataset's {num_classes} classes")


class BodyHead(nn.Module):
    """`head(body(x))`: the split every personalized method relies on."""

    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x):
        return self.head(self.body(x))


def body_of(net: nn.Module) -> nn.Module:
    """`net.body`, the shared representation, typed as a module (an attribute of an nn.Module reads as
    Tensor | Module to a type checker)."""
    return net.get_submodule("body")


def head_of(net: nn.Module) -> nn.Module:
    """`net.head`, the classifier on top of the body, typed as a module (see body_of)."""
    return net.get_submodule("head")


def split_names(net: nn.Module) -> tuple[list[str], list[str]]:
    """(body names, head names) over the state dict (parameters and buffers)."""
    names = list(net.state_dict())
    return [n for n in names if n.startswith("body.")], [n for n in names if n.startswith("head.")]


def final_linear(net: nn.Module) -> nn.Linear:
    """The model's classifier: the last nn.Linear of `net.head` (the head itself for mlp/cnn/resnet)."""
    head = getattr(net, "head", None)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if head is not None else []
    if not linears:
        raise BenchError(f"{type(net).__name__} has no Linear classifier under `head`; "
                         "kNN-Per and FedRoD need a model whose head ends in a Linear layer")
    return linears[-1]


def embedding_norm(net: nn.Module) -> nn.Module | None:
    """The body's last BatchNorm, None if it has none: on resnet20 / resnet34 the BatchNorm1d(128) of
    the reference's FC block, whose input is the reference's CIFAR `embedding` (the 128-d ReLU output
    before `linear_batchnorm`, longtanle/FeDEQ utils/resnet_cifar.py lines 241-245) and whose output
    feeds the classifier."""
    body = getattr(net, "body", None)
    norms = [m for m in body.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if body is not None else []
    return norms[-1] if norms else None


def features_and_logits(net: nn.Module, x: torch.Tensor, at: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input of the module `at`, logits) from one forward of `net` (with autograd); `at` defaults to
    the final Linear classifier, so the features are the classifier's input."""
    seen: list[torch.Tensor] = []
    layer = final_linear(net) if at is None else at
    hook = layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        logits = net(x)
    finally:
        hook.remove()
    return seen[-1], logits


@register_model("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """McMahan et al.'s 2NN (AISTATS 2017): two hidden layers of 200 ReLU units; head = last layer."""
    d = math.prod(input_shape)
    body = nn.Sequential(nn.Flatten(), nn.Linear(d, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU())
    return BodyHead(body, nn.Linear(200, num_classes))


@register_model("cnn")
def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A small CNN for (C, H, W) images: conv5x5(32)-pool-conv5x5(64)-pool-FC(512); head = last layer.

    The CNN of McMahan et al. (AISTATS 2017) with 'same' padding so any H, W >= 4 works.
    """
    if len(input_shape) != 3:
        raise BenchError(f"model 'cnn' needs image input (C, H, W); this dataset gives shape {input_shape}: use 'mlp'")
    c, h, w = input_shape
    feat = 64 * (h // 4) * (w // 4)
    body = nn.Sequential(
        nn.Conv2d(c, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(feat, 512), nn.ReLU(),
    )
    return BodyHead(body, nn.Linear(512, num_classes))


# The FeDEQ paper's models, registered on import (kept last: they import from this module).
from fedeq_bench.methods.nets import deq_mlp, deq_resnet, resnet, transformer  # noqa: E402,F401
