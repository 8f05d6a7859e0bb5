"""FedProx: Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
Networks", MLSys 2020, arXiv 1812.06127 (reference code: github.com/litian96/FedProx).

FedAvg with a proximal term in each client's objective, which bounds how far w_i drifts from the
round's global model w (the paper's h_k(w_i; w) = F_k(w_i) + (mu/2) ||w_i - w||^2):

    Client: w_i <- w; local_epochs of SGD on CE(w_i) + (mu/2) ||w_i - w||^2 over D_i, i.e. per batch
            w_i <- w_i - lr * (grad CE(w_i) + mu * (w_i - w))       (the reference's PerturbedGradientDescent)
            send (w_i, n_i)
    Server: w <- sum_i n_i w_i / sum_i n_i                           (client-id order, float64)
    Eval:   the global w (not personalized), as FedAvg; a held-out client uses w as is.

mu = 0 is FedAvg bit for bit: no penalty graph is built, the update is FedAvg's own code path.
The penalty covers parameters only, not buffers (BatchNorm statistics). Not modelled: the paper's
systems heterogeneity (stragglers doing fewer local epochs); every client does local_epochs.
mu = 0.01: the paper tunes mu from {0.001, 0.01, 0.1, 1} per dataset.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fedeq_bench.core.ranges import ranged
from fedeq_bench.methods.base import ClientTensors, LocalResult, Message, MethodConfig, State, register_method
from fedeq_bench.methods.fedavg import FedAvg
from fedeq_bench.methods.train import load, sgd_epochs, snapshot, with_num_samples


@dataclass(frozen=True)
class FedProxConfig(MethodConfig):
    mu: float = ranged(0.01, ge=0)
    """Proximal weight; raising it keeps each w_i closer to the round's global w (less client drift,
    slower local progress); 0 is FedAvg exactly."""


@register_method("fedprox")
class FedProx(FedAvg):
    Config = FedProxConfig

    def local_update(self, down: Message, state: State, data: ClientTensors, rng: torch.Generator) -> LocalResult:
        mu = self.cfg.mu
        if mu == 0:
            return super().local_update(down, state, data, rng)  # FedAvg's code path: the same bits
        net = self.net
        load(net, down)
        own = dict(net.named_parameters())
        dev = next(net.parameters()).device
        anchor = {k: down[k].to(dev) for k in own}  # the round's w, fixed for the whole update

        def penalty():
            total: torch.Tensor | float = 0.0
            for k, p in own.items():
                total = total + (p - anchor[k]).pow(2).sum()
            return 0.5 * mu * total

        loss, steps = sgd_epochs(net, list(net.parameters()), data.train_x, data.train_y,
                                 self.cfg.local_epochs, self.cfg.batch_size, self.cfg.lr, rng, penalty=penalty)
        up = with_num_samples(snapshot(net, down.keys()), data.num_train)
        return LocalResult(up, state, {"loss": loss, "steps": steps})
