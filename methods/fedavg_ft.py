"""FedAvg-FT: FedAvg, then each client fine-tunes its own copy of the global model ("FedAvg + local
fine-tuning", the FedAvg-FT baseline of the FeDEQ paper, Le et al., CIKM 2024, arXiv 2309.15659;
FedAvg: McMahan et al., AISTATS 2017, arXiv 1602.05629).

    Training rounds (every round when switch_round is None, else rounds < switch_round): FedAvg exactly
        Client: w_i <- w; local_epochs of SGD on CE(w_i) over D_i; send (w_i, n_i)
        Server: w <- sum_i n_i w_i / sum_i n_i                  (client-id order, float64)
    Eval:   u_i <- w; finetune_epochs of SGD on CE(u_i) over the client's training split; evaluate u_i.
            u_i is thrown away: nothing persists, w is untouched (finetune_epochs = 0 is FedAvg's eval).
    Fine-tuning rounds (rnd >= switch_round, when set): the server stops aggregating; w is frozen.
        The first time a client is in a cohort from then on, it receives the final w and a one-byte
        `finetune` flag, starts its own copy u_i <- w (state, prefix `own.`) and trains it
        local_epochs per round. In its later rounds nothing is sent either way; it keeps training u_i.
        Eval: u_i for a client that has one; otherwise the thrown-away fine-tuned copy above.
    Held out: the thrown-away fine-tuned copy of the final w.

Why the client learns its phase from the message's content, not from a `round` entry: the server
already knows the round (broadcast gets it), and all the client needs to know is what to do: (w)
= a FedAvg round, (w, finetune) = start fine-tuning from w, nothing = keep fine-tuning. So training
rounds cost exactly FedAvg's bytes (without switch_round this method *is* FedAvg plus evaluation
fine-tuning), the switch costs the flag's 21 bytes once per client, and every later round 0 bytes.
The server remembers who already has the final w (`ft_clients`, never sent).

Evaluation fine-tuning shuffles with the generator evaluate() is handed (the engine's `eval` stream
of (seed, round, client)): its batch order is the same on every backend and device, differs from
round to round like any other draw, and nothing about it is kept in the client's state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fedeq_bench.core.ranges import ranged
from fedeq_bench.methods.base import (
    AggregateResult,
    ClientTensors,
    LocalResult,
    Message,
    MethodConfig,
    State,
    register_method,
    whole_model_personal,
)
from fedeq_bench.methods.fedavg import FedAvg
from fedeq_bench.methods.train import eval_metrics, load, sgd_epochs, snapshot, weighted_average

OWN = "own."
"""State key prefix of the client's persistent fine-tuned copy u_i (fine-tuning rounds only)."""
FINETUNE = "finetune"
"""Broadcast flag: start your own copy from this w and fine-tune it from now on."""
FT_CLIENTS = "ft_clients"
"""Server key: ids of the clients that already received the final w (sorted int64)."""


@dataclass(frozen=True)
class FedAvgFTConfig(MethodConfig):
    finetune_epochs: int = ranged(1, ge=0)
    """Epochs of fine-tuning a throwaway copy of w before each evaluation; raising it personalizes
    more (and may overfit small clients); 0 evaluates w itself, as FedAvg."""
    switch_round: int | None = ranged(None, ge=1)
    """From this round on, stop aggregating: each client fine-tunes its own persistent copy of the
    final w (local_epochs per round, 0 bytes). None: FedAvg every round."""


@register_method("fedavg_ft")
class FedAvgFT(FedAvg):
    Config = FedAvgFTConfig

    def param_split(self, net):
        # Shared: w, uploaded in training rounds. Personal: the fine-tuned copy, a whole model.
        return whole_model_personal(net)

    def _names(self):
        return list(self.net.state_dict())

    def _finetuning(self, rnd: int) -> bool:
        return self.cfg.switch_round is not None and rnd >= self.cfg.switch_round

    # -- server --------------------------------------------------------------------------------
    def init_server(self, model, rng):
        server = super().init_server(model, rng)
        server[FT_CLIENTS] = torch.zeros(0, dtype=torch.int64)
        return server

    def broadcast(self, server, cid, rnd):
        model = {k: server[k] for k in self._names()}
        if not self._finetuning(rnd):
            return model  # exactly FedAvg's downlink
        if bool((server[FT_CLIENTS] == cid).any()):
            return {}  # it already fine-tunes its own copy: nothing to send
        model[FINETUNE] = torch.tensor(True)
        return model

    def aggregate(self, server: State, replies: list[tuple[int, Message]], rnd: int) -> AggregateResult:
        new = dict(server)
        if self._finetuning(rnd):  # no aggregation; remember who got the final w
            got = set(server[FT_CLIENTS].tolist()) | {cid for cid, _ in replies}
            new[FT_CLIENTS] = torch.tensor(sorted(got), dtype=torch.int64)
            return AggregateResult(new, {})
        new.update(weighted_average(replies, self._names()))
        return AggregateResult(new, {})

    # -- client --------------------------------------------------------------------------------
    def local_update(self, down: Message, state: State, data: ClientTensors, rng: torch.Generator) -> LocalResult:
        if down and FINETUNE not in down:
            return super().local_update(down, state, data, rng)  # a FedAvg round
        net, names = self.net, self._names()
        start = {k: down[k] for k in names} if down else {k: state[OWN + k] for k in names}
        load(net, start)
        loss, steps = sgd_epochs(net, list(net.parameters()), data.train_x, data.train_y,
                                 self.cfg.local_epochs, self.cfg.batch_size, self.cfg.lr, rng)
        return LocalResult({}, {OWN + k: t for k, t in snapshot(net, names).items()}, {"loss": loss, "steps": steps})

    def evaluate(self, down, state, data, rng):
        net, names = self.net, self._names()
        if (OWN + names[0]) in state:
            load(net, {k: state[OWN + k] for k in names})
            return eval_metrics(net, data)
        # Fine-tune a throwaway copy of w; the scratch net is overwritten by the next call anyway.
        load(net, {k: down[k] for k in names})
        sgd_epochs(net, list(net.parameters()), data.train_x, data.train_y,
                   self.cfg.finetune_epochs, self.cfg.batch_size, self.cfg.lr, rng)
        return eval_metrics(net, data)
