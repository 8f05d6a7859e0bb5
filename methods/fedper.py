"""FedPer: Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning with Personalization Layers",
2019, arXiv 1912.00818.

The model is head(body(x)): the base layers (`body.`) are shared, the personalization layers
(`head.`, the paper's K_P top layers) stay on each client.

    Client: phi_i <- phi (the received body); h_i from its own state
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
"""
from __future__ import annotations

from dataclasses import dataclass

from fedeq_bench.core.ranges import ranged
from fedeq_bench.methods.base import MethodConfig, register_method
from fedeq_bench.methods.nets import head_of
from fedeq_bench.methods.partial import PartialSharing
from fedeq_bench.methods.train import sgd_epochs


@dataclass(frozen=True)
class FedPerConfig(MethodConfig):
    unseen_head_epochs: int | None = ranged(None, ge=0)
    """Epochs of head-only SGD that adapt a held-out client to the final body; None: local_epochs.
    Raising it fits the new client's head closer to its data (the body never changes)."""


@register_method("fedper")
class FedPer(PartialSharing):
    Config = FedPerConfig
    shared_part = "body"

    def personalize(self, down, state, data, rng):
        """Held-out client: its head trained on the final body (frozen) for unseen_head_epochs."""
        net = self.net
        epochs = self.cfg.unseen_head_epochs
        epochs = self.cfg.local_epochs if epochs is None else epochs
        self.load_client(down, state)
        sgd_epochs(net, list(head_of(net).parameters()), data.train_x, data.train_y,
                   epochs, self.cfg.batch_size, self.cfg.lr, rng)
        return self.personal_state()
