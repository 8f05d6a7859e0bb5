"""Partial sharing: methods whose model is head(body(x)) and which send one part and keep the other.

FedRep, FedPer and FedBABU share the body and keep the head; LG-FedAvg shares its global top layers
and keeps the lower ones (its own `param_split`). They differ only in how a client trains (and
evaluates); the plumbing is here:

    Server:  keeps the whole initial model: the shared part is updated as
             shared <- sum_i n_i shared_i / sum_i n_i   (client-id order, float64),
             or the plain mean over the cohort where the method's config has server_weights = "uniform"
             the personal part is only the common starting point handed to every new client
    Down:    the shared part.          Up: the shared part and n_i.
    State:   the personal part (never sent); a held-out client personalized with its shared part's
             statistics kept (FedRep's and FedPer's unseen_bn = "keep") also holds those buffers,
             under the prefix `unseen_bn.`.
    Eval:    the received shared part with the client's own personal part (and kept statistics).
    Local:   by default both parts trained jointly, one optimizer over every parameter (FedPer,
             LG-FedAvg); FedRep and FedBABU override it.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch

from fedeq_bench.methods.base import (
    NUM_SAMPLES,
    AggregateResult,
    ClientTensors,
    LocalResult,
    Message,
    Method,
    State,
)
from fedeq_bench.methods.nets import split_names
from fedeq_bench.methods.train import eval_metrics, load, sgd_epochs, snapshot, weighted_average, with_num_samples

KEPT_STATS = "unseen_bn."
"""State key prefix of the shared part's buffers (BatchNorm statistics) that a held-out client's head
training updated and that it keeps for its evaluation (unseen_bn = "keep")."""


def uniform_weights(replies: list[tuple[int, Message]]) -> list[tuple[int, Message]]:
    """The replies with n_i = 1 each: `weighted_average` of them is the plain mean over the cohort (the
    FeDEQ reference's `model_average(..., weights=None)`)."""
    one = torch.tensor(1, dtype=torch.int64)
    return [(cid, {**m, NUM_SAMPLES: one}) for cid, m in replies]


class PartialSharing(Method):
    shared_part: ClassVar[Literal["body", "head"]] = "body"
    """Which part of the model crosses the network; the other stays on the client."""

    def param_split(self, net):
        body, head = split_names(net)
        return (body, head) if self.shared_part == "body" else (head, body)

    def _parts(self) -> tuple[list[str], list[str]]:
        """(shared names, personal names) of the scratch network."""
        return self.param_split(self.net)

    # -- server --------------------------------------------------------------------------------
    def init_server(self, model, rng):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def broadcast(self, server, cid, rnd):
        shared, _ = self._parts()
        return {k: server[k] for k in shared}

    def aggregate(self, server: State, replies: list[tuple[int, Message]], rnd: int) -> AggregateResult:
        shared, _ = self._parts()
        new = dict(server)
        if getattr(self.cfg, "server_weights", "samples") == "uniform":  # FedRep's, FedPer's option
            replies = uniform_weights(replies)
        new.update(weighted_average(replies, shared))
        return AggregateResult(new, {})

    # -- client --------------------------------------------------------------------------------
    def init_client(self, cid, server, rng):
        _, personal = self._parts()
        return {k: server[k].clone() for k in personal}

    def load_client(self, down, state) -> None:
        """The scratch network with the received shared part and the client's personal part, and the
        shared part's statistics the client kept, if any (KEPT_STATS)."""
        _, personal = self._parts()
        load(self.net, down)
        load(self.net, {k: state[k] for k in personal})
        load(self.net, {k[len(KEPT_STATS):]: v for k, v in state.items() if k.startswith(KEPT_STATS)})

    def upload(self, data) -> dict:
        """The shared part as trained now, with n_i."""
        shared, _ = self._parts()
        return with_num_samples(snapshot(self.net, shared), data.num_train)

    def personal_state(self, keep_stats: bool = False) -> dict:
        """The personal part as trained now; with `keep_stats`, also the shared part's buffers (its
        BatchNorm statistics) under KEPT_STATS, for a held-out client (unseen_bn = "keep")."""
        shared, personal = self._parts()
        out = snapshot(self.net, personal)
        if keep_stats:
            params = dict(self.net.named_parameters())
            out.update({KEPT_STATS + k: t for k, t in snapshot(self.net, [k for k in shared if k not in params]).items()})
        return out

    def local_update(self, down: Message, state: State, data: ClientTensors, rng: torch.Generator) -> LocalResult:
        net = self.net
        self.load_client(down, state)
        # One optimizer over every parameter: both parts move together on each mini-batch.
        loss, steps = sgd_epochs(net, list(net.parameters()), data.train_x, data.train_y,
                                 self.cfg.local_epochs, self.cfg.batch_size, self.cfg.lr, rng)
        return LocalResult(self.upload(data), self.personal_state(), {"loss": loss, "steps": steps})

    def evaluate(self, down, state, data, rng):
        self.load_client(down, state)
        return eval_metrics(self.net, data)
