"""Training and evaluation steps shared by methods: plain mini-batch SGD and accuracy."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fedeq_bench.methods.base import NUM_SAMPLES, ClientTensors, Message, Metrics, State

EVAL_CHUNK = 1024


def load(net: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into the same-named parameters/buffers of `net` (others left as they are)."""
    own = net.state_dict(keep_vars=True)
    with torch.no_grad():
        for k, v in tensors.items():
            if k in own:
                own[k].copy_(v)


def snapshot(net: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the named parameters/buffers: what goes into state or a message."""
    own = net.state_dict()
    return {k: own[k].detach().to("cpu", copy=True) for k in names}


def minibatches(x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, rng: torch.Generator):
    """`epochs` shuffled passes of (x, y) in mini-batches: one permutation per epoch, drawn from `rng`
    (CPU) when the epoch starts, so the batch order is identical on every backend and device."""
    n = int(y.shape[0])
    for _ in range(epochs):
        order = torch.randperm(n, generator=rng).to(x.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]


def sgd_epochs(
    net: nn.Module,
    params: list[nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    rng: torch.Generator,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> tuple[float, int]:
    """`epochs` passes of shuffled mini-batch SGD on CE (+ penalty) w.r.t. `params` only.

    Returns (mean training loss over all steps, number of steps). Batches come from `minibatches`.
    """
    trainable = {id(p) for p in params}
    for p in net.parameters():
        p.requires_grad_(id(p) in trainable)
    opt = torch.optim.SGD(params, lr=lr)
    net.train()
    total, steps = 0.0, 0
    for xb, yb in minibatches(x, y, epochs, batch_size, rng):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(xb), yb)
        obj = loss if penalty is None else loss + penalty()
        obj.backward()
        opt.step()
        total += float(loss.detach())
        steps += 1
    for p in net.parameters():
        p.requires_grad_(True)
    return (total / steps if steps else float("nan")), steps


@torch.no_grad()
def correct_and_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, float]:
    """(number correct, summed CE loss) over (x, y), evaluated in chunks."""
    net.eval()
    correct, loss = 0, 0.0
    for s in range(0, int(y.shape[0]), EVAL_CHUNK):
        out = net(x[s : s + EVAL_CHUNK])
        correct += int((out.argmax(1) == y[s : s + EVAL_CHUNK]).sum())
        loss += float(F.cross_entropy(out, y[s : s + EVAL_CHUNK], reduction="sum"))
    return correct, loss


def eval_metrics(net: nn.Module, data: ClientTensors) -> Metrics:
    """Test and validation accuracy of `net` as it is loaded now."""
    tc, tl = correct_and_loss(net, data.test_x, data.test_y)
    vc, _ = correct_and_loss(net, data.val_x, data.val_y)
    return metrics_from_counts(tc, tl, vc, data)


def metrics_from_counts(tc: int, tl: float, vc: int, data: ClientTensors) -> Metrics:
    """The per-client evaluation metrics the engine reduces, from test (correct, summed loss) and
    validation correct counts."""
    nt, nv = int(data.test_y.shape[0]), int(data.val_y.shape[0])
    return {
        "test_acc": tc / nt if nt else float("nan"),
        "test_n": float(nt),
        "test_loss": tl / nt if nt else float("nan"),
        "val_acc": vc / nv if nv else float("nan"),
        "val_n": float(nv),
    }


def with_num_samples(msg: Message, n: int) -> Message:
    msg[NUM_SAMPLES] = torch.tensor(int(n), dtype=torch.int64)
    return msg


def weighted_average(replies: list[tuple[int, Message]], names: Iterable[str]) -> State:
    """Sample-weighted mean of `names` over replies: sum_i n_i * x_i / sum_i n_i.

    Summed in client-id order with float64 accumulators so Serial and Ray runs are bit-identical.
    Integer entries (e.g. BatchNorm's num_batches_tracked) take the maximum instead of a mean.
    """
    replies = sorted(replies, key=lambda r: r[0])
    weights = [float(m[NUM_SAMPLES]) for _, m in replies]
    total = sum(weights)
    out: State = {}
    for k in names:
        first = replies[0][1][k]
        if not first.is_floating_point():
            out[k] = torch.stack([m[k] for _, m in replies]).max(0).values
            continue
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for w, (_, m) in zip(weights, replies):
            acc += m[k].to(torch.float64) * w
        out[k] = (acc / total).to(first.dtype)
    return out
