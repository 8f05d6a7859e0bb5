"""FedPer: Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning with Personalization Layers",
2019, arXiv 1912.00818.

The model is head(body(x)): the base layers (`body.`) are shared, the personalization layers
(`head.`, the paper's K_P top layers) stay on each client.

    Client: phi_i <- phi (the received body); h_i from its own state
            head_epochs (default 0) of SGD on CE(phi_i, h_i) w.r.t. h_i only (body frozen), then
            local_epochs of SGD on CE(phi_i, h_i) w.r.t. (phi_i, h_i) JOINTLY (one optimizer, every
            mini-batch updates both; unlike FedRep, which alternates head epochs and body epochs)
            send (phi_i, n_i); h_i stays in the client's state, never in a message
    Server: phi <- sum_i n_i phi_i / sum_i n_i            (client-id order, float64)
    Eval:   client i with (phi, h_i): the global body and its own head.

Choices, and where they come from:
  * Every client's head starts from the same initial head (the server's initial model, handed over
    by init_client, not counted as traffic, as FedRep does): the paper initializes all clients from
    one model.
  * The split is the model's own (`body.` / `head.`, methods/nets): for mlp/cnn/resnet the head is
    the last Linear layer, i.e. K_P = 1 personalization layer (the paper varies K_P over the top
    layers of its ResNet/MobileNet; a deeper split is a different model split, not a config here).
  * A held-out client (never trained) trains only its head on the final body (body frozen) for
    unseen_head_epochs (default: local_epochs), then is evaluated with (phi, h). The paper has no
    new-client protocol; this is the cheapest adaptation that leaves the shared body as the
    federation learned it (FedRep's protocol, with FedPer's epoch count).
  * Buffers (BatchNorm statistics) follow their layer: body buffers are uploaded and averaged, head
    buffers stay home.

Options, each default keeping the harness's earlier numbers (the FeDEQ reference's runner,
longtanle/FeDEQ `trainers/vision/fedper_resnet.py` and `trainers/sequence/fedper_seq.py`, sets the other
values; configs/paper/*.toml do too):
  * head_epochs = 0 (default): the local update is the joint epochs alone. N > 0: N epochs of
    head-only SGD (body frozen) first, then the local_epochs joint ones, as the reference's
    `--personalized_epochs 3` head loop before its `--inner_epochs 5` joint loop
    (fedper_resnet.py lines 195-223, fedper_seq.py lines 168-190).
  * server_weights = "samples" (default): phi <- the n_i-weighted mean. "uniform": the plain mean
    over the cohort, as the reference's sequence runner (fedper_seq.py line 200,
    `model_average(..., weights=None)`); its vision runner weights by n_i (fedper_resnet.py lines
    231-232, `weights=round_weight_updates`, the training-set sizes).
  * unseen_bn = "drop" (default): the body's BatchNorm statistics a held-out client's head training
    (train mode) updates are dropped for the final body's. "keep": they are kept for its
    evaluation, as the reference's `unseen_net_states` (fedper_resnet.py lines 242-277). Models
    without BatchNorm in the body give the same numbers either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fedeq_bench.core.ranges import ranged
from fedeq_bench.methods.base import ClientTensors, LocalResult, Message, MethodConfig, State, register_method
from fedeq_bench.methods.nets import head_of
from fedeq_bench.methods.partial import PartialSharing
from fedeq_bench.methods.train import phases_loss, sgd_epochs


@dataclass(frozen=True)
class FedPerConfig(MethodConfig):
    unseen_head_epochs: int | None = ranged(None, ge=0)
    """Epochs of head-only SGD that adapt a held-out client to the final body; None: local_epochs.
    Raising it fits the new client's head closer to its data (the body never changes)."""
    head_epochs: int = ranged(0, ge=0)
    """Epochs of head-only SGD (body frozen) before the joint epochs of each local update; 0: none.
    Raising it fits the head to the received body before both move together."""
    server_weights: Literal["samples", "uniform"] = "samples"
    """Server average of the bodies weighted by n_i (`samples`) or uniform over the cohort (the FeDEQ
    reference's sequence runner)."""
    unseen_bn: Literal["drop", "keep"] = "drop"
    """A held-out client's BatchNorm statistics after its head training: dropped for the final body's
    (`drop`) or kept for its evaluation (`keep`, the FeDEQ reference)."""


@register_method("fedper")
class FedPer(PartialSharing):
    Config = FedPerConfig
    shared_part = "body"

    def local_update(self, down: Message, state: State, data: ClientTensors, rng: torch.Generator) -> LocalResult:
        if self.cfg.head_epochs == 0:
            return super().local_update(down, state, data, rng)  # the joint epochs alone
        net, cfg = self.net, self.cfg
        self.load_client(down, state)
        l_head, s_head = sgd_epochs(net, list(head_of(net).parameters()), data.train_x, data.train_y,
                                    cfg.head_epochs, cfg.batch_size, cfg.lr, rng)
        l_joint, s_joint = sgd_epochs(net, list(net.parameters()), data.train_x, data.train_y,
                                      cfg.local_epochs, cfg.batch_size, cfg.lr, rng)
        steps = s_head + s_joint
        loss = phases_loss((l_head, s_head), (l_joint, s_joint))
        return LocalResult(self.upload(data), self.personal_state(), {"loss": loss, "steps": steps})

    def personalize(self, down, state, data, rng):
        """Held-out client: its head trained on the final body (frozen) for unseen_head_epochs."""
        net = self.net
        epochs = self.cfg.unseen_head_epochs
        epochs = self.cfg.local_epochs if epochs is None else epochs
        self.load_client(down, state)
        sgd_epochs(net, list(head_of(net).parameters()), data.train_x, data.train_y,
                   epochs, self.cfg.batch_size, self.cfg.lr, rng)
        return self.personal_state(keep_stats=self.cfg.unseen_bn == "keep")
