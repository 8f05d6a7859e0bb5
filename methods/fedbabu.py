"""FedBABU: Oh, Kim, Yun, "FedBABU: Towards Enhanced Representation for Federated Image
Classification", ICLR 2022, arXiv 2106.06042 (reference code: github.com/jhoon-oh/FedBABU,
read in its copy junhyeog/FedBABU).

Body Aggregation and Body Update: during federated training the head h (`head.`) stays FROZEN at its
random initial values h^0 for every client; only the body phi (`body.`) is trained and aggregated.
Personalization happens only at evaluation, by fine-tuning.

    Client: phi_i <- phi; head = h^0 (identical on every client, never trained in a round)
            local_epochs of SGD on CE(phi_i, h^0) w.r.t. phi_i only
            send (phi_i, n_i)
    Server: phi <- sum_i n_i phi_i / sum_i n_i            (client-id order, float64)
    Eval:   u_i <- (phi, h^0); finetune_epochs of SGD on CE(u_i) w.r.t. ALL of u_i (body and head)
            over the client's training split; evaluate u_i; throw u_i away (nothing persists).

Choices, and where they come from:
  * finetune_epochs = 5, the whole model (body and head), at the training lr and batch size: the
    paper's evaluation protocol (tau_f = 5; reference code `--ft_ep` default 5, its LocalUpdate
    trains body and head with their own learning rates, head_lr = 0 during federated training;
    Flower's FedBABU baseline also fine-tunes the whole net for 5 epochs). The reference's SGD
    momentum (0.5 or 0.9) is not used: every method of the harness runs plain SGD.
    `finetune_head_only = True` fine-tunes the head alone (the paper's head-only ablation).
  * h^0 reaches each client through init_client (like FedRep's initial head), not in a message:
    the head never changes, so re-sending it every round would only inflate bytes/down. Messages
    carry the body only, both ways.
  * Evaluation fine-tuning shuffles with the generator evaluate() is handed (the engine's `eval`
    stream of (seed, round, client)), so its batch order is the same on every backend and nothing
    about it is kept in the client's state (as fedavg_ft does).
  * A head whose classifier weight is all zeros (resnet34 zero-initializes it, as the FeDEQ
    reference's CIFAR ResNets do) is redrawn at random by init_server with nn.Linear's default
    initialization, from the generator init_server is handed (the `server_init` stream): FedBABU
    needs a RANDOM head (a frozen zero head passes no gradient to the body, which would never
    train). Every other model keeps its initial head.
  * A held-out client needs nothing: its evaluation fine-tunes the final (phi, h^0) like any other.
  * Buffers follow their layer: body buffers (BatchNorm statistics) are uploaded and averaged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedeq_bench.core.ranges import ranged
from fedeq_bench.methods.base import ClientTensors, LocalResult, Message, MethodConfig, State, register_method
from fedeq_bench.methods.nets import body_of, head_of
from fedeq_bench.methods.partial import PartialSharing
from fedeq_bench.methods.train import eval_metrics, sgd_epochs


@dataclass(frozen=True)
class FedBABUConfig(MethodConfig):
    finetune_epochs: int = ranged(5, ge=0)
    """Epochs of fine-tuning a throwaway copy before each evaluation (the paper's tau_f); raising
    it personalizes more (and may overfit small clients); 0 evaluates (phi, h^0) as trained."""
    finetune_head_only: bool = False
    """Fine-tune only the head at evaluation (the paper's ablation); default: the whole model."""


@register_method("fedbabu")
class FedBABU(PartialSharing):
    # Shared: the body. Personal: the head, kept on the client (frozen in training, fine-tuned only in
    # throwaway evaluation copies).
    Config = FedBABUConfig
    shared_part = "body"

    # -- server --------------------------------------------------------------------------------
    def init_server(self, model, rng):
        server = super().init_server(model, rng)
        # A frozen all-zero classifier passes no gradient to the body (dCE/dz = W^T (p - y) = 0), so
        # the body could never train: redraw it at random (resnet34 zero-initializes its head).
        for name, mod in head_of(model).named_modules():
            key = f"head.{name}.weight" if name else "head.weight"
            if isinstance(mod, nn.Linear) and not bool(server[key].any()):
                w = torch.empty_like(server[key])
                nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=rng)  # nn.Linear's default init
                server[key] = w
        return server

    # -- client --------------------------------------------------------------------------------
    def local_update(self, down: Message, state: State, data: ClientTensors, rng: torch.Generator) -> LocalResult:
        net = self.net
        self.load_client(down, state)
        # Body Update: only the body's parameters are optimized; the head is never stepped.
        loss, steps = sgd_epochs(net, list(body_of(net).parameters()), data.train_x, data.train_y,
                                 self.cfg.local_epochs, self.cfg.batch_size, self.cfg.lr, rng)
        return LocalResult(self.upload(data), state, {"loss": loss, "steps": steps})

    def evaluate(self, down, state, data, rng):
        net = self.net
        self.load_client(down, state)
        # Fine-tune a throwaway copy: the scratch net is overwritten by the next call, and neither
        # `down` nor `state` is written to, so nothing of the fine-tuning persists.
        params = list(head_of(net).parameters()) if self.cfg.finetune_head_only else list(net.parameters())
        sgd_epochs(net, params, data.train_x, data.train_y,
                   self.cfg.finetune_epochs, self.cfg.batch_size, self.cfg.lr, rng)
        return eval_metrics(net, data)

    def personalize(self, down, state, data, rng):
        return state  # evaluation fine-tunes the final model for every client alike
