"""The vocabulary methods, datasets and the harness share: messages, state, client tensors, the task,
and the spec that rebuilds a method on a worker."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

Message = dict[str, torch.Tensor]
"""What crosses the (simulated) network: a flat name -> tensor dict, encoded by bench/loop/wire.py."""
State = dict[str, torch.Tensor]
"""A server's or one client's explicit state (a client's never leaves the engine's client store)."""
Metrics = dict[str, float]


@dataclass(frozen=True)
class Task:
    """What a method needs to know about the problem, resolved by the engine."""

    model: str
    """Registered model name (methods/nets)."""
    input_shape: tuple[int, ...]
    num_classes: int
    device: str = "cpu"
    cpu_memory: str = "live"
    """How the worker meters a local update's memory on CPU (`--cpu-memory`); methods ignore it."""
    drop_last: bool = False
    """Local SGD drops each epoch's last partial mini-batch (`--drop-last`); the worker applies it to
    every job (methods/train.py `job_options`), so methods need not read it."""
    eval_dropout: bool = False
    """Evaluations run with dropout on (`--eval-dropout`); applied by the worker like `drop_last`."""


@dataclass
class ClientTensors:
    """One client's splits as tensors on the training device."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])


class MethodClass(Protocol):
    """What a MethodSpec rebuilds from: a method class (`fedeq_bench.methods.base.Method`'s subclasses),
    seen from core, which imports nothing of the project (docs/architecture.md, Layout and layers)."""

    name: str

    def __call__(self, cfg: Any, task: Task) -> Any: ...


@dataclass(frozen=True)
class MethodSpec:
    """Enough to rebuild a method anywhere: its class, resolved config and task.

    The class pickles by reference (module and name), so a Ray worker that unpickles a spec imports
    the method's module itself; nothing here needs to know which methods exist. Frozen and
    hashable: a worker caches the method it builds per spec.
    """

    method: MethodClass
    cfg: Any
    task: Task

    @property
    def name(self) -> str:
        return self.method.name

    def build(self) -> Any:
        return self.method(self.cfg, self.task)
