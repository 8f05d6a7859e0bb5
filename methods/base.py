"""The Method interface: six functions over explicit state (DESIGN.md), plus a registry.

    init_server(model, rng) -> ServerState
    init_client(cid, server, rng) -> ClientState          # personal params, duals: never sent
    broadcast(server, cid, rnd) -> Message                 # downlink
    local_update(down, state, data, rng) -> (Message, ClientState, Metrics)
    aggregate(server, [(cid, Message)], rnd) -> (ServerState, Metrics)
    evaluate(down, state, data, rng) -> Metrics            # personalized metrics of one client (rng: fine-tuning)
and, for clients held out of training, `personalize(down, state, data, rng) -> ClientState`
(default: one local update whose upload is dropped).

A method object holds only its immutable config, the task and a scratch network whose parameters
are overwritten from explicit state on every call: one object serves many clients (on a Ray actor,
in any order), so nothing about a client may live on it.

Randomness is an argument: every draw a method makes (batch order, initial values, fine-tuning
before an evaluation) comes from the `torch.Generator` it is handed, which the engine derives from a
stream declared in core/seeding.py. A method never seeds anything and keeps no seed in its state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fedeq_bench.core import seeding
from fedeq_bench.core.ranges import ranged
from fedeq_bench.core.registry import Registry
from fedeq_bench.core.types import ClientTensors, Message, Metrics, State, Task  # noqa: F401 - re-exported

NUM_SAMPLES = "num_samples"
"""Message key of the sender's training-set size (n_i), sent as an int64 scalar."""


@dataclass(frozen=True)
class MethodConfig:
    """Options every method has. None means: take the run's value (`--lr`, `--model`, ...)."""

    model: str | None = None
    """Network for this method; None: --model, else the dataset's pairing (DEQ for FeDEQ)."""
    lr: float | None = ranged(None, gt=0)
    """SGD learning rate; None: the run's --lr."""
    local_epochs: int | None = ranged(None, ge=0)
    """Epochs over the client's training data per round; None: the run's --local-epochs."""
    batch_size: int | None = ranged(None, ge=1)
    """Mini-batch size; None: the run's --batch-size."""


class Method:
    name: ClassVar[str] = ""
    Config: ClassVar[type] = MethodConfig
    model_kind: ClassVar[str] = "explicit"
    """Which model of the dataset's pairing this method trains unless told otherwise."""

    def __init__(self, cfg, task: Task, net: nn.Module | None = None):
        """`net`: a prebuilt scratch network (tests, notebooks), used instead of building
        `task.model` from the registry; the method loads state into it exactly as into its own."""
        self.cfg = cfg
        self.task = task
        self._net: nn.Module | None = None if net is None else net.to(task.device)

    @property
    def net(self) -> nn.Module:
        """Scratch network on the task's device (built once per process, overwritten per call)."""
        if self._net is None:
            from fedeq_bench.methods.nets import build_model

            # Its initial weights are overwritten before every use: build it in a fork of torch's
            # global generator, so that making a method draws nothing (tests/unit/test_seeding.py).
            with seeding.GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
                net = build_model(self.task.model, self.task.input_shape, self.task.num_classes)
            self._net = net.to(self.task.device)
        return self._net

    def param_split(self, net: nn.Module) -> tuple[list[str], list[str]]:
        """(shared, personal) state names; logged as params/shared and params/personal."""
        return list(net.state_dict()), []

    # -- the six functions ------------------------------------------------------------------
    def init_server(self, model: nn.Module, rng: torch.Generator) -> State:
        raise NotImplementedError

    def init_client(self, cid: int, server: State, rng: torch.Generator) -> State:
        return {}

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        raise NotImplementedError

    def local_update(self, down: Message, state: State, data: ClientTensors, rng: torch.Generator):
        raise NotImplementedError

    def aggregate(self, server: State, replies: list[tuple[int, Message]], rnd: int):
        raise NotImplementedError

    def evaluate(self, down: Message, state: State, data: ClientTensors, rng: torch.Generator) -> Metrics:
        raise NotImplementedError

    def personalize(self, down: Message, state: State, data: ClientTensors, rng: torch.Generator) -> State:
        """Adapt a client that never trained (held out) to the final model; upload dropped."""
        _, state, _ = self.local_update(down, state, data, rng)
        return state


METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str):
    """Class decorator: `@register_method("fedavg")` sets `cls.name` and registers it."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name)(cls)

    return deco
