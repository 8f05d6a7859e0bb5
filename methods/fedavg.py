"""FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017, arXiv 1602.05629.

    Client: w_i <- w; local_epochs of SGD on CE(w_i) over D_i; send (w_i, n_i)
    Server: w <- sum_i n_i w_i / sum_i n_i            (in client-id order, float64)

Not personalized: every client is evaluated with the global w, and a held-out client gets w as is.
"""
from __future__ import annotations

import torch

from fedeq_bench.methods.base import (
    AggregateResult,
    ClientTensors,
    LocalResult,
    Message,
    Method,
    State,
    register_method,
)
from fedeq_bench.methods.train import eval_metrics, load, sgd_epochs, snapshot, weighted_average, with_num_samples


@register_method("fedavg")
class FedAvg(Method):
    def init_server(self, model, rng):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def broadcast(self, server, cid, rnd):
        return dict(server)

    def local_update(self, down: Message, state: State, data: ClientTensors, rng: torch.Generator) -> LocalResult:
        net = self.net
        load(net, down)
        loss, steps = sgd_epochs(
            net, list(net.parameters()), data.train_x, data.train_y,
            self.cfg.local_epochs, self.cfg.batch_size, self.cfg.lr, rng,
        )
        up = with_num_samples(snapshot(net, down.keys()), data.num_train)
        return LocalResult(up, state, {"loss": loss, "steps": steps})

    def aggregate(self, server: State, replies: list[tuple[int, Message]], rnd: int) -> AggregateResult:
        return AggregateResult(weighted_average(replies, server.keys()), {})

    def evaluate(self, down, state, data, rng):
        load(self.net, down)
        return eval_metrics(self.net, data)

    def personalize(self, down, state, data, rng):
        return state  # FedAvg has nothing personal: a new client uses the global model.
