"""Local training: every client trains its own model on its own data and never communicates.

The no-collaboration baseline of personalized FL (e.g. "Local" in Ditto, arXiv 2012.04221, and in
FeDEQ, arXiv 2309.15659): what a client gets from its own data alone, at zero bytes.

    Client: own_i <- w^0 (the initial model, the same for every client and every method at this seed)
            each round it trains: local_epochs of SGD on CE(own_i) over D_i
            send nothing
    Server: nothing; it keeps w^0 only to hand every new client the same starting model
    Eval:   own_i.   Held out: own <- w^0, one round of local training (local_epochs), evaluate.

Both messages are empty dicts, and bench/loop/wire.py does not send an empty message (0 bytes), so
`bytes/up`, `bytes/down` and `bytes/cumulative` are exactly 0.

Option `participation` (which clients train in a round; the method's `cohort`, which the engine reads):
  * "sampled" (default): only the round's cohort from the shared schedule, so a client does the same
    amount of local work as in every other method.
  * "all": every training client, every round, as the reference does (longtanle/FeDEQ
    `trainers/vision/local_resnet.py` line 85 and `trainers/sequence/local_seq.py` line 85:
    `selected_clients = list(range(self.num_clients))`): about 1 / fraction times the local training
    of "sampled". Bytes stay 0; each client's first update is metered as usual (all in round 1), and
    no training client is ever "never trained".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fedeq_bench.methods.base import (
    AggregateResult,
    ClientTensors,
    LocalResult,
    Message,
    Method,
    MethodConfig,
    State,
    register_method,
    whole_model_personal,
)
from fedeq_bench.methods.train import eval_metrics, load, sgd_epochs, snapshot

OWN = "own."
"""State key prefix of the client's own model."""


@dataclass(frozen=True)
class LocalConfig(MethodConfig):
    participation: Literal["sampled", "all"] = "sampled"
    """Clients that train in a round: the schedule's cohort (`sampled`, equal work with the other methods)
    or every training client (`all`, the reference's runners)."""


@register_method("local")
class Local(Method):
    Config = LocalConfig

    def cohort(self, sampled, clients):
        return sorted(clients) if self.cfg.participation == "all" else sampled

    def param_split(self, net):
        return whole_model_personal(net, shared=False)  # nothing is uploaded; the whole model is personal

    def _names(self):
        return list(self.net.state_dict())

    def init_server(self, model, rng):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def init_client(self, cid, server, rng):
        # The client cannot get w^0 from a message (nothing is sent): it starts with its own copy.
        return {OWN + k: v.clone() for k, v in server.items()}

    def broadcast(self, server, cid, rnd):
        return {}

    def local_update(self, down: Message, state: State, data: ClientTensors, rng: torch.Generator) -> LocalResult:
        net, names = self.net, self._names()
        load(net, {k: state[OWN + k] for k in names})
        loss, steps = sgd_epochs(net, list(net.parameters()), data.train_x, data.train_y,
                                 self.cfg.local_epochs, self.cfg.batch_size, self.cfg.lr, rng)
        return LocalResult({}, {OWN + k: t for k, t in snapshot(net, names).items()}, {"loss": loss, "steps": steps})

    def aggregate(self, server: State, replies: list[tuple[int, Message]], rnd: int) -> AggregateResult:
        return AggregateResult(server, {})

    def evaluate(self, down, state, data, rng):
        load(self.net, {k: state[OWN + k] for k in self._names()})
        return eval_metrics(self.net, data)
