"""The Method interface: six functions over explicit state (docs/architecture.md, Method interface),
plus a registry.

    init_server(model, rng) -> State                       # the server's state
    init_client(cid, server, rng) -> State                 # a client's personal params, duals: never sent
    broadcast(server, cid, rnd) -> Message                 # downlink
    local_update(down, state, data, rng) -> LocalResult(message, state, metrics)
    aggregate(server, [(cid, Message)], rnd) -> AggregateResult(server, metrics)
    evaluate(down, state, data, rng) -> Metrics            # personalized metrics of one client (rng: fine-tuning)
and, for clients held out of training, `personalize(down, state, data, rng) -> State`
(default: one local update whose upload is dropped), and `cohort(sampled, clients)`, the clients that
train in a round (default: the schedule's sample).

`Method` is an abstract base: `init_server`, `broadcast`, `local_update`, `aggregate` and `evaluate`
have no default, and `register_method` refuses a class that leaves any of them undefined, when the
class is defined, rather than when the engine first calls the missing function mid-run.

A method object holds only its immutable config, the task and a scratch network whose parameters
are overwritten from explicit state on every call: one object serves many clients (on a Ray actor,
in any order), so nothing about a client may live on it.

Randomness is an argument: every draw a method makes (batch order, initial values, fine-tuning
before an evaluation) comes from the `torch.Generator` it is handed, which the engine derives from a
stream declared in core/seeding.py. A method never seeds anything and keeps no seed in its state.
"""
from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple, TypeVar

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
    local_epochs: int | None = ranged(None, ge=1)
    """Epochs over the client's training data per round, at least 1 (as --local-epochs); None: the
    run's --local-epochs."""
    batch_size: int | None = ranged(None, ge=1)
    """Mini-batch size; None: the run's --batch-size."""
    wire: Literal["fp32", "fp16", "bf16", "int8", "topk"] | None = None
    """Wire format of this method's messages (bench/loop/wire.py); None: the run's --wire."""
    wire_rounding: Literal["nearest", "stochastic"] | None = None
    """int8's rounding for this method; None: the run's --wire-rounding."""
    wire_topk: float | None = ranged(None, gt=0, le=1)
    """topk's fraction for this method; None: the run's --wire-topk."""
    wire_feedback: bool | None = None
    """topk's error feedback for this method; None: the run's --wire-feedback."""


class LocalResult(NamedTuple):
    """What `local_update` returns. A tuple, so `up, state, metrics = method.local_update(...)` works."""

    message: Message
    """The upload (empty: nothing is sent)."""
    state: State
    """The client's new personal state, kept by the engine's client store."""
    metrics: Metrics
    """`loss` and `steps` are read by the engine; namespaced keys are reduced over the cohort
    (docs/architecture.md, Method interface)."""


class AggregateResult(NamedTuple):
    """What `aggregate` returns. A tuple, so `server, metrics = method.aggregate(...)` works."""

    server: State
    """The server's new state."""
    metrics: Metrics
    """Logged as they are."""


class Method(abc.ABC):
    name: ClassVar[str] = ""
    Config: ClassVar[type] = MethodConfig
    model_kind: ClassVar[str] = "explicit"
    """Which model of the dataset's pairing this method trains unless told otherwise."""

    def __init__(self, cfg: Any, task: Task, net: nn.Module | None = None):
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

    def cohort(self, sampled: list[int], clients: list[int]) -> list[int]:
        """The clients that train this round, in client-id order: by default the schedule's sample
        `sampled` (the same for every method). `clients`: every training client. A method whose
        protocol trains more (`local` with participation = "all") returns more; the engine sends,
        meters and aggregates exactly these."""
        return sampled

    def param_split(self, net: nn.Module) -> tuple[list[str], list[str]]:
        """(shared, personal) state names; logged as params/shared and params/personal.
        Default: the whole model is shared and nothing is personal (FedAvg)."""
        return list(net.state_dict()), []

    # -- the six functions ------------------------------------------------------------------
    @abc.abstractmethod
    def init_server(self, model: nn.Module, rng: torch.Generator) -> State:
        """The server's initial state from the initial network `model`."""

    def init_client(self, cid: int, server: State, rng: torch.Generator) -> State:
        return {}

    @abc.abstractmethod
    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        """The downlink to client `cid` in round `rnd`."""

    @abc.abstractmethod
    def local_update(self, down: Message, state: State, data: ClientTensors, rng: torch.Generator) -> LocalResult:
        """One client's training in a round: its upload, new state and metrics."""

    @abc.abstractmethod
    def aggregate(self, server: State, replies: list[tuple[int, Message]], rnd: int) -> AggregateResult:
        """The server's new state from the round's uploads (client-id order) and its metrics."""

    @abc.abstractmethod
    def evaluate(self, down: Message, state: State, data: ClientTensors, rng: torch.Generator) -> Metrics:
        """One client's personalized metrics (`rng`: e.g. fine-tuning before testing)."""

    def personalize(self, down: Message, state: State, data: ClientTensors, rng: torch.Generator) -> State:
        """Adapt a client that never trained (held out) to the final model; upload dropped."""
        return self.local_update(down, state, data, rng).state


def whole_model_personal(net: nn.Module, shared: bool = True) -> tuple[list[str], list[str]]:
    """The `param_split` of a method whose client keeps a whole model of its own (every state name is
    personal): with `shared`, a global model of the same names is also uploaded every round (Ditto's
    v_i, APFL's v_i, pFedMe's theta_i, FedAvg-FT's fine-tuned copy next to the global w); without,
    nothing is shared (`local`). Both lists are fresh, so a caller may change one."""
    names = list(net.state_dict())
    return (list(names) if shared else []), names


METHODS: Registry[type[Method]] = Registry("method")

M = TypeVar("M", bound=type[Method])


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: `@register_method("fedavg")` sets `cls.name` and registers it.

    A class that is not a concrete `Method` (one of the abstract functions left undefined) is
    refused here with a TypeError naming what is missing, and is not registered."""

    def deco(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"method {name!r} ({cls!r}) is not a subclass of Method")
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        if missing:
            raise TypeError(f"method {name!r} ({cls.__name__}) does not define {', '.join(missing)}")
        cls.name = name
        METHODS.register(name)(cls)
        return cls

    return deco
