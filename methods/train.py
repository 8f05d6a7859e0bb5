"""Training and evaluation steps shared by methods: plain mini-batch SGD, the loss and accuracy.

Targets come in two shapes, and every method handles both through `cross_entropy` and
`count_correct` (the only places logits meet labels):

* one label per example: labels (N,), logits (N, V) (images, next-character Shakespeare);
* one label per position: labels (N, T), logits (N, T, V) (Shakespeare with
  `shakespeare.targets = "all"`, as the FeDEQ reference trains its transformers). The loss is the
  mean cross-entropy over all N * T tokens and accuracy counts correct tokens, as the reference's
  `per_nll_loss_fn` / `seq_pred_fn` (utils/jax_utils.py of github.com/longtanle/FeDEQ).

A per-position model given one label per example (logits (N, T, V), labels (N,)) is scored on its
last position: the next-character-only form, from the same network.

Per-client metrics: `test_acc` = correct tokens / tokens and `test_loss` = mean CE per token;
`test_n` counts examples. Every Shakespeare window has the same T tokens, so the engine's
example-weighted `acc/weighted` equals the token micro-average the reference reports.

Two run options change these steps for every method (`[run] drop_last`, `[run] eval_dropout`,
bench/config.py). The worker sets them around each client job from the method's Task
(`job_options`), so that no method has to pass them on and none can forget to:
  * drop_last: `minibatches` drops each epoch's last partial batch, and a client with fewer samples
    than the batch size trains on all of them as one batch (the FeDEQ reference's
    `epoch_generator`, utils/data_utils.py:243-250, with trainers/base.py:96's
    batch size min(n, B)).
  * eval_dropout: `eval_mode` (every evaluation forward) leaves the modules that apply dropout in
    training mode, and only those (BatchNorm keeps its running statistics): the reference evaluates
    Shakespeare through `seq_pred_fn` (utils/jax_utils.py:362), whose `model.apply` keeps the
    models' default `is_training=True` (utils/model_utils.py:1182, 1236). The masks come from
    torch's global generator, which the worker seeds per job from the `global` stream.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from fedeq_bench.core.errors import BenchError
from fedeq_bench.methods.base import NUM_SAMPLES, ClientTensors, Message, Metrics, State, Task

EVAL_CHUNK = 1024
_DROP_LAST: ContextVar[bool] = ContextVar("drop_last", default=False)
_EVAL_DROPOUT: ContextVar[bool] = ContextVar("eval_dropout", default=False)
LOAD_NAMES_SHOWN = 8
"""How many unknown and valid names a refused `load` lists (a ResNet has hundreds)."""


def load(net: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into the same-named parameters/buffers of `net` (others left as they are).

    Every name must be one of `net`'s state names. A name the network does not have (a message flag
    such as FeDEQ's `resume`, a state key still carrying its prefix) means the caller did not pick
    the entries it meant to load; it is refused with a ValueError, before anything is copied, rather
    than skipped, which would leave the network silently holding what it held before."""
    own = net.state_dict(keep_vars=True)
    unknown = [k for k in tensors if k not in own]
    if unknown:
        raise ValueError(f"load: {type(net).__name__} has no state named {_some(unknown)}; "
                         f"its names are {_some(list(own))}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)


def _some(names: list[str]) -> str:
    """The first LOAD_NAMES_SHOWN names, comma-separated, and how many there are in all if more."""
    shown = ", ".join(names[:LOAD_NAMES_SHOWN])
    return shown if len(names) <= LOAD_NAMES_SHOWN else f"{shown}, ... ({len(names)} in all)"


def snapshot(net: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the named parameters/buffers: what goes into state or a message."""
    own = net.state_dict()
    return {k: own[k].detach().to("cpu", copy=True) for k in names}


def as_rows(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (M, V), labels (M,)): one row per scored token (see the module docstring)."""
    if logits.dim() == y.dim() + 2:  # per-position logits, one label per example: the last position
        logits = logits[:, -1]
    if logits.shape[:-1] != y.shape:
        raise BenchError(f"the model's logits {tuple(logits.shape)} do not match labels {tuple(y.shape)}: labels "
                         "per position need a model with per-position logits (transformer8, deq_transformer), "
                         "or set shakespeare.targets=last")
    return logits.reshape(-1, logits.shape[-1]), y.reshape(-1)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """CE over every scored token: mean (default) or sum over N (per-example) or N * T tokens."""
    rows, labels = as_rows(logits, y)
    return F.cross_entropy(rows, labels, reduction=reduction)


def count_correct(logits: torch.Tensor, y: torch.Tensor) -> int:
    """Tokens whose argmax is the label (examples when there is one label per example)."""
    rows, labels = as_rows(logits, y)
    return int((rows.argmax(-1) == labels).sum())


def num_tokens(y: torch.Tensor) -> int:
    """Scored tokens of labels `y`: N for (N,), N * T for (N, T)."""
    return int(y.numel())


@contextlib.contextmanager
def job_options(task: Task):
    """The run options of `task` (drop_last, eval_dropout) for the steps below, within the block:
    the worker wraps every client job in it (bench/loop/backends.py). Outside one, both are off."""
    drop, dropout = _DROP_LAST.set(task.drop_last), _EVAL_DROPOUT.set(task.eval_dropout)
    try:
        yield
    finally:
        _EVAL_DROPOUT.reset(dropout)
        _DROP_LAST.reset(drop)


def minibatches(x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, rng: torch.Generator):
    """`epochs` shuffled passes of (x, y) in mini-batches: one permutation per epoch, drawn from `rng`
    (CPU) when the epoch starts, so the batch order is identical on every backend and device.
    With the run's drop_last, batches of min(n, batch_size) only (module docstring)."""
    n = int(y.shape[0])
    drop_last = _DROP_LAST.get()
    if drop_last:
        batch_size = max(1, min(n, batch_size))  # max: a client with no samples has no batches
    for _ in range(epochs):
        order = torch.randperm(n, generator=rng).to(x.device)
        for start in range(0, n, batch_size):
            if drop_last and start + batch_size > n:
                break
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
        loss = cross_entropy(net(xb), yb)
        obj = loss if penalty is None else loss + penalty()
        obj.backward()
        opt.step()
        total += float(loss.detach())
        steps += 1
    for p in net.parameters():
        p.requires_grad_(True)
    return (total / steps if steps else float("nan")), steps


def phases_loss(*phases: tuple[float, int]) -> float:
    """The mean training loss over every step of a local update made of phases `(mean loss, steps)`,
    as `sgd_epochs` returns them (a head phase, then a body phase): a phase of 0 steps (0 epochs, which
    `fedrep.head_epochs=0` and the like allow) adds nothing, where its NaN mean times 0 would make the
    whole NaN (read as divergence); NaN only when no phase took a step. Equal, bit for bit, to
    `(l1 * s1 + l2 * s2) / (s1 + s2)` when every phase took one."""
    steps = sum(s for _, s in phases)
    return sum(loss * s for loss, s in phases if s) / steps if steps else float("nan")


def draws_dropout(m: nn.Module) -> bool:
    """Whether module `m` itself applies dropout in training mode: an nn.Dropout, or a module with a
    float `dropout` rate above 0 (nn.MultiheadAttention; the transformers' layers, which call F.dropout)."""
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p > 0
    rate = getattr(m, "dropout", None)
    return isinstance(rate, float) and rate > 0


def eval_mode(net: nn.Module) -> None:
    """`net.eval()`; with the run's eval_dropout, the modules that apply dropout (`draws_dropout`)
    are put back in training mode, each alone (not its children: a BatchNorm stays in eval mode)."""
    net.eval()
    if _EVAL_DROPOUT.get():
        for m in net.modules():
            if draws_dropout(m):
                m.training = True


@torch.no_grad()
def correct_and_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, float]:
    """(number correct, summed CE loss) over (x, y), evaluated in chunks; counted in tokens where
    `y` has one label per position."""
    eval_mode(net)
    correct, loss = 0, 0.0
    for s in range(0, int(y.shape[0]), EVAL_CHUNK):
        out, yb = net(x[s : s + EVAL_CHUNK]), y[s : s + EVAL_CHUNK]
        correct += count_correct(out, yb)
        loss += float(cross_entropy(out, yb, reduction="sum"))
    return correct, loss


def eval_metrics(net: nn.Module, data: ClientTensors) -> Metrics:
    """Test and validation accuracy of `net` as it is loaded now."""
    tc, tl = correct_and_loss(net, data.test_x, data.test_y)
    vc, _ = correct_and_loss(net, data.val_x, data.val_y)
    return metrics_from_counts(tc, tl, vc, data)


def metrics_from_counts(tc: int, tl: float, vc: int, data: ClientTensors) -> Metrics:
    """The per-client evaluation metrics the engine reduces, from test (correct, summed loss) and
    validation correct counts, in tokens (= examples with one label per example). `test_n` and
    `val_n` count examples: the engine's weights (see the module docstring)."""
    nt, nv = int(data.test_y.shape[0]), int(data.val_y.shape[0])
    tt, tv = num_tokens(data.test_y), num_tokens(data.val_y)
    return {
        "test_acc": tc / tt if tt else float("nan"),
        "test_n": float(nt),
        "test_loss": tl / tt if tt else float("nan"),
        "val_acc": vc / tv if tv else float("nan"),
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
        for w, (_, m) in zip(weights, replies, strict=True):
            acc += m[k].to(torch.float64) * w
        out[k] = (acc / total).to(first.dtype)
    return out
