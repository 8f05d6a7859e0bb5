"""FedRep: Collins et al., "Exploiting Shared Representations for Personalized Federated
Learning", ICML 2021, arXiv 2102.07078.

The model is head(body(x)); the body phi is shared, each client keeps its own head h_i.

    Client: phi_i <- phi
            head_epochs of SGD on CE(phi_i, h_i) w.r.t. h_i   (body frozen)
            local_epochs of SGD on CE(phi_i, h_i) w.r.t. phi_i (head frozen)
            send (phi_i, n_i); h_i stays on the client
    Server: phi <- sum_i n_i phi_i / sum_i n_i
    Eval:   client i with (phi, h_i): the global body and its own head.

Every client's head starts from the same initial head (the server's initial model). A held-out
client trains only its head on the final body (head_epochs), as in the paper's new-client test.

Options, each default keeping the harness's earlier numbers:
  * server_weights = "samples" (default): phi <- the n_i-weighted mean above. "uniform": the plain
    mean over the cohort, as the FeDEQ reference does for FedRep on every task (longtanle/FeDEQ
    `trainers/vision/fedrep_resnet.py` lines 230-231 and `trainers/sequence/fedrep_seq.py` line 204:
    `model_average(..., weights=None)`, for the body and its BatchNorm statistics alike).
  * unseen_bn = "drop" (default): a held-out client's head training (train mode) updates the body's
    BatchNorm statistics, and they are dropped: it is evaluated with the final body's statistics.
    "keep": it is evaluated with the statistics its head training left, as the reference's
    `unseen_net_states` (fedrep_resnet.py lines 243-273) and FeDEQ's held-out clients. Models without
    BatchNorm in the body (mlp, transformers) give the same numbers either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fedeq_bench.core.ranges import ranged
from fedeq_bench.methods.base import ClientTensors, LocalResult, Message, MethodConfig, State, register_method
from fedeq_bench.methods.nets import body_of, head_of
from fedeq_bench.methods.partial import PartialSharing
from fedeq_bench.methods.train import phases_loss, sgd_epochs


@dataclass(frozen=True)
class FedRepConfig(MethodConfig):
    head_epochs: int = ranged(10, ge=0)
    """Epochs of head-only SGD before the body epochs; raising it fits heads closer to local data."""
    server_weights: Literal["samples", "uniform"] = "samples"
    """Server average of the bodies weighted by n_i (`samples`) or uniform over the cohort (the FeDEQ
    reference's code)."""
    unseen_bn: Literal["drop", "keep"] = "drop"
    """A held-out client's BatchNorm statistics after its head training: dropped for the final body's
    (`drop`) or kept for its evaluation (`keep`, the FeDEQ reference)."""


@register_method("fedrep")
class FedRep(PartialSharing):
    Config = FedRepConfig
    shared_part = "body"

    def _train_head(self, net, data, rng):
        head_params = list(head_of(net).parameters())
        return sgd_epochs(net, head_params, data.train_x, data.train_y,
                          self.cfg.head_epochs, self.cfg.batch_size, self.cfg.lr, rng)

    def local_update(self, down: Message, state: State, data: ClientTensors, rng: torch.Generator) -> LocalResult:
        net = self.net
        self.load_client(down, state)
        l_head, s_head = self._train_head(net, data, rng)
        l_body, s_body = sgd_epochs(net, list(body_of(net).parameters()), data.train_x, data.train_y,
                                    self.cfg.local_epochs, self.cfg.batch_size, self.cfg.lr, rng)
        steps = s_head + s_body
        loss = phases_loss((l_head, s_head), (l_body, s_body))
        return LocalResult(self.upload(data), self.personal_state(), {"loss": loss, "steps": steps})

    def personalize(self, down, state, data, rng):
        self.load_client(down, state)
        self._train_head(self.net, data, rng)
        return self.personal_state(keep_stats=self.cfg.unseen_bn == "keep")
