"""LG-FedAvg: Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov, Morency, "Think Locally, Act
Globally: Federated Learning with Local and Global Representations", 2020, arXiv 2001.01523
(reference code: github.com/pliang279/LG-FedAvg, main_lg.py).

The opposite split of FedRep/FedPer: each client keeps its own local representation (the lower
layers, `body.`), and only the global layers on top (`head.`) are shared.

    Client: g_i <- g (the received head); l_i from its own state
            local_epochs of SGD on CE(l_i, g_i) w.r.t. (l_i, g_i) JOINTLY (the reference's LocalUpdate
            trains the whole local net every mini-batch)
            send (g_i, n_i); l_i stays in the client's state, never in a message
    Server: g <- sum_i n_i g_i / sum_i n_i                (client-id order, float64)
    Eval:   client i with (l_i, g): its own representation under the current global head (the
            reference copies the averaged global keys into every local model before testing).

Choices, and where they come from:
  * Server weights: the reference divides the sum of the m sampled g_i by m (uniform); here the
    harness's FedAvg step weights by n_i (the same estimator when clients are of equal size, and
    the weighting every other method of the harness uses).
  * Start: the reference initializes every local model from a FedAvg-trained global model
    (`--load_fed`); here every client starts from the same initial model w^0 (its l_i handed over by
    init_client, not counted as traffic), as every other method of the harness, so no method gets
    extra pre-training. Run fedavg for the pre-trained comparison.
  * The reference keeps each client's best-on-test local model ("local-best"); that selects on the
    test split, so it is not done here: the model after the last round is evaluated.
  * A held-out client: l <- w^0's body, one local update (local_epochs, joint) under the final g
    whose upload is dropped (the base `personalize`), then evaluated with (l, g). Its head moved in
    that update too, but as for every client the evaluation uses the current global head.
  * Buffers follow their layer: body buffers (BatchNorm statistics) are local, head buffers shared.
"""
from __future__ import annotations

from fedeq_bench.methods.base import register_method
from fedeq_bench.methods.partial import PartialSharing


@register_method("lg_fedavg")
class LGFedAvg(PartialSharing):
    shared_part = "head"  # the global head is shared; the local representation stays on the client
    # local_update: PartialSharing's joint training of both parts.
