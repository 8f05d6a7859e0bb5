"""Ditto: Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through Personalization",
ICML 2021, arXiv 2012.04221 (reference code: github.com/litian96/ditto, flearn/trainers_MTL/ditto.py).

Two models per client: the global model w, trained exactly as in FedAvg, and a personal model v_i
that never leaves the client, pulled toward the global model by a proximal term (Algorithm 1):

    Client, receiving w (the global model at the START of the round, w^t):
        global step:    w_i <- w; local_epochs of SGD on CE(w_i) over D_i           (= FedAvg's update)
        personal step:  v_i <- w if the client has no v_i yet (the first global model it receives)
                        (personal_init = "global": v_i <- w_i, the copy the global step just trained)
                        personal_epochs of SGD on CE(v_i) + (lam/2) ||v_i - w||^2 over D_i, i.e. per batch
                        v_i <- v_i - lr * (grad CE(v_i) + lam * (v_i - w))
        send (w_i, n_i); v_i stays in the client's state (key prefix `v.`), never in a message
    Server: w <- sum_i n_i w_i / sum_i n_i                        (client-id order, float64)
    Eval:   client i with its own v_i; a client that has not trained yet with w.
    Held out: v <- final w, personal_epochs of the personal step, evaluate v
              (unseen = "global": evaluate the final w as it is).

Choices, and where they come from:
  * The proximal target is the round's received w, not the client's moving w_i (Algorithm 1 and the
    reference: `lam * (local_models[idx] - global_model)` with the global model fixed for the round).
    So the two steps do not interact within a round and running the global epochs first, then the
    personal ones, is the same computation as the reference's batch-by-batch interleaving.
  * Both steps walk the same shuffled batches (the reference feeds each mini-batch to both): the
    personal step replays the round's random stream from its start. Hence the global step is bit for
    bit FedAvg's local update, and with lam = 0 the personal step is bit for bit `local`'s update.
  * personal_epochs = None (default) means local_epochs: the reference runs the same `local_iters`
    for v_i as for w_i, with the same learning rate.
  * The penalty covers parameters only; v_i's buffers (BatchNorm statistics) follow its own forward passes.
  * personal_init = "persist" (default): v_i persists across rounds, starting from the first global
    model the client receives (the paper's Algorithm 1 keeps v_i; litian96/ditto starts it at w^0,
    the same thing for a client sampled in round 1).
    personal_init = "global": v_i restarts every round from w_i, the client's copy of the global model
    right after its global step (parameters and BatchNorm statistics), as the FeDEQ reference does:
    longtanle/FeDEQ `trainers/vision/ditto_resnet.py` lines 156-167 (and `trainers/sequence/ditto_seq.py`
    lines 145-156) run the personal loop on `params`, the just-updated global copy, not on
    `local_params[t]`, with the round's w as proximal target. A held-out client then takes one whole
    local update (global step, personal step from its w_i) and keeps that v_i.
  * unseen = "personalize" (default): a held-out client (and a training client never sampled) gets
    its v by the personal step above. unseen = "global": it is scored with the final w as it is, as
    the reference's `eval_unseen(global_params, net_state)` (ditto_resnet.py line 199, ditto_seq.py
    line 178) does; nothing is trained.
  * The reference samples clients in proportion to n_i and averages uniformly; the harness samples
    uniformly and averages by n_i (FedAvg's server step), the same estimator in expectation.
  * lam = 0.1: the paper tunes lam per dataset from a small grid (the reference's scripts use lam = 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fedeq_bench.core.ranges import ranged
from fedeq_bench.methods.base import (
    ClientTensors,
    LocalResult,
    Message,
    MethodConfig,
    State,
    register_method,
    whole_model_personal,
)
from fedeq_bench.methods.fedavg import FedAvg
from fedeq_bench.methods.train import eval_metrics, load, phases_loss, sgd_epochs, snapshot, with_num_samples

V = "v."
"""State key prefix of the personal model v_i."""


@dataclass(frozen=True)
class DittoConfig(MethodConfig):
    lam: float = ranged(0.1, ge=0)
    """Proximal weight of the personal objective; raising it pulls v_i toward w (0: purely local v_i)."""
    personal_epochs: int | None = ranged(None, ge=0)
    """Epochs of the personal step per round; None: local_epochs (the paper's equal step counts).
    Raising it fits v_i closer to the client's data."""
    personal_init: Literal["persist", "global"] = "persist"
    """Where the personal step starts each round: the client's own v_i (`persist`), or w_i, its copy of
    the global model just after the global step (`global`, the FeDEQ reference)."""
    unseen: Literal["personalize", "global"] = "personalize"
    """A client that never trained: v by the personal step from the final w (`personalize`), or the
    final w itself (`global`, the FeDEQ reference)."""


@register_method("ditto")
class Ditto(FedAvg):
    Config = DittoConfig

    def param_split(self, net):
        # Shared: w, uploaded every round. Personal: v_i, a whole second model kept on the client.
        return whole_model_personal(net)

    @property
    def personal_epochs(self) -> int:
        p = self.cfg.personal_epochs
        return self.cfg.local_epochs if p is None else p

    # -- server --------------------------------------------------------------------------------
    # -- client --------------------------------------------------------------------------------
    def _personal_step(self, v, w, data, rng):
        """personal_epochs of SGD on CE(v) + (lam/2) ||v - w||^2 from v; returns (v_new, loss, steps)."""
        cfg, net = self.cfg, self.net
        load(net, v)
        penalty = None
        if cfg.lam != 0:  # lam == 0: no penalty graph at all, so v_i trains exactly as in `local`
            own = dict(net.named_parameters())
            dev = next(net.parameters()).device
            target = {k: w[k].to(dev) for k in own}

            def penalty():
                total: torch.Tensor | float = 0.0
                for k, p in own.items():
                    total = total + (p - target[k]).pow(2).sum()
                return 0.5 * cfg.lam * total

        loss, steps = sgd_epochs(net, list(net.parameters()), data.train_x, data.train_y,
                                 self.personal_epochs, cfg.batch_size, cfg.lr, rng, penalty=penalty)
        return snapshot(net, w.keys()), loss, steps

    def local_update(self, down: Message, state: State, data: ClientTensors, rng: torch.Generator) -> LocalResult:
        cfg, net = self.cfg, self.net
        names = list(down)
        # The personal step replays the same stream: the same batches as the global step.
        personal_rng = torch.Generator()
        personal_rng.set_state(rng.get_state())

        # Global step: FedAvg's local update from the received w.
        load(net, down)
        l_w, s_w = sgd_epochs(net, list(net.parameters()), data.train_x, data.train_y,
                              cfg.local_epochs, cfg.batch_size, cfg.lr, rng)
        up = with_num_samples(snapshot(net, names), data.num_train)

        # Personal step against the received w (w^t, not w_i), from v_i, or from w_i as it is now.
        if cfg.personal_init == "global":
            v = {k: up[k] for k in names}
        else:
            v = {k: state[V + k] for k in names} if (V + names[0]) in state else down
        v_new, l_v, s_v = self._personal_step(v, down, data, personal_rng)

        steps = s_w + s_v
        loss = phases_loss((l_w, s_w), (l_v, s_v))
        return LocalResult(up, {V + k: t for k, t in v_new.items()}, {"loss": loss, "steps": steps})

    def evaluate(self, down, state, data, rng):
        has_v = bool(down) and (V + next(iter(down))) in state
        load(self.net, {k: state[V + k] for k in down} if has_v else down)
        return eval_metrics(self.net, data)

    def personalize(self, down, state, data, rng):
        """Held-out client: v <- final w, then the personal step (with personal_init = "global": one
        whole local update's v); with unseen = "global" no v at all, so it is scored with w. Nothing
        is uploaded."""
        if self.cfg.unseen == "global":
            return {}
        if self.cfg.personal_init == "global":
            return self.local_update(down, state, data, rng).state
        v_new, _, _ = self._personal_step(down, down, data, rng)
        return {V + k: t for k, t in v_new.items()}
