"""FedRoD: Chen & Chao, "On Bridging Generic and Personalized Federated Learning for Image
Classification", ICLR 2022, arXiv 2107.00778 (the authors' repository github.com/hongyouc/Fed-RoD
holds no code; the update below is PFLlib's clientrod.py, checked against the paper's Algorithm 1).

Two predictors on one shared representation z = body(x):
  * the generic model (body + head, `body.` and `head.`), trained with the balanced softmax loss
    and averaged by the server: a model for the global, class-balanced task;
  * a personal head h_i (a second classifier, state keys `phead.weight`, `phead.bias`, shaped like
    the model's final Linear), never sent, trained on top of the generic prediction.

    Client, per mini-batch B of local_epochs shuffled passes over D_i (one forward feeds both steps):
        z, g = features and generic logits of (body_i, head_i) on B
        generic step:  (body_i, head_i) <- SGD on L_BSM = CE(g + log prior_i, y)
                       prior_i[c] = n_{i,c} / n_i, the client's training label frequencies
                       (log 0 = -inf: a class the client never saw gets no probability)
        personal step: h_i <- SGD on CE(g.detach() + F.linear(z.detach(), phead.weight, phead.bias), y)
        send (body_i, head_i, n_i); h_i stays in the client's state
    Server: (body, head) <- sum_i n_i (body_i, head_i) / sum_i n_i      (client-id order, float64)
    Eval:   logits = g(x) + F.linear(z(x), phead.weight, phead.bias) with the current generic model.

Choices and simplifications, and where they come from:
  * Personal head: the paper's linear personalized head (its hypernetwork variant, FedRoD(hyper),
    is not implemented). Applied to the input of the model's final Linear classifier, which is
    body(x) for mlp / cnn / resnet (head = one Linear); for a deeper head (the transformers) it is
    the feature the classifier sees. Initialized as a copy of that Linear's initial values
    (PFLlib: `copy.deepcopy(self.model.head)`), handed over by init_client, not counted as traffic.
  * Both steps use the same mini-batch and the same forward: the personal step sees the features
    and generic logits from before the generic step, detached (PFLlib: `rep.detach()`,
    `out_g.detach()`), at the same lr, so the personal head never changes the generic model.
  * BSM with the raw class prior (the paper's balanced softmax, Ren et al. 2020, exponent 1):
    adding log n_{i,c} (PFLlib) or log(n_{i,c} / n_i) is the same loss, a constant shift under
    softmax. `generic_loss = "ce"` trains the generic model with plain CE (the paper's ablation).
  * The reported training loss is the personal model's CE (the prediction FedRoD evaluates).
  * Held-out client: h <- the initial classifier; local_epochs of the personal step alone on top of
    the final generic model (frozen), then evaluated as above. The paper has no new-client protocol
    for the linear variant; this is its personal update without touching the generic model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedeq_bench.methods.base import ClientTensors, LocalResult, Message, MethodConfig, State, register_method
from fedeq_bench.methods.fedavg import FedAvg
from fedeq_bench.methods.nets import features_and_logits, final_linear
from fedeq_bench.methods.train import cross_entropy, eval_metrics, load, minibatches, snapshot, with_num_samples

PHEAD = "phead."
"""State key prefix of the personal head h_i: `phead.weight`, `phead.bias`."""


@dataclass(frozen=True)
class FedRoDConfig(MethodConfig):
    generic_loss: Literal["bsm", "ce"] = "bsm"
    """Loss of the generic model: `bsm` (balanced softmax, the paper) or `ce` (plain CE, its ablation)."""


def balanced_softmax_loss(logits: torch.Tensor, y: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """L_BSM = CE(logits + log_prior, y): the softmax reweighted by the client's label prior."""
    return cross_entropy(logits + log_prior, y)


def log_class_prior(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """log(n_c / n) per class c (float32; -inf for a class absent from y)."""
    counts = torch.bincount(y.reshape(-1), minlength=num_classes).to(torch.float32)  # per-position labels: per token
    return torch.log(counts / max(int(y.numel()), 1))


class Personalized(nn.Module):
    """The personalized predictor: generic logits + the personal head on the classifier's input."""

    def __init__(self, net: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.net = net
        self.weight, self.bias = weight, bias

    def forward(self, x):
        z, g = features_and_logits(self.net, x)
        return g + F.linear(z, self.weight, self.bias)


@register_method("fedrod")
class FedRoD(FedAvg):
    Config = FedRoDConfig

    def _classifier_names(self, net=None) -> dict[str, str]:
        """{'weight': state name, 'bias': state name} of the model's final Linear classifier."""
        net = self.net if net is None else net
        lin = final_linear(net)
        prefix = next(n for n, m in net.named_modules() if m is lin)
        return {p: f"{prefix}.{p}" for p, t in lin.named_parameters(recurse=False)}

    def param_split(self, net):
        # Shared: the whole generic model. Personal: h_i, shaped like (and named after) the classifier.
        return list(net.state_dict()), list(self._classifier_names(net).values())

    # -- server --------------------------------------------------------------------------------
    # -- client --------------------------------------------------------------------------------
    def init_client(self, cid, server, rng):
        return {PHEAD + p: server[name].clone() for p, name in self._classifier_names().items()}

    def _personal_params(self, state, dev):
        return {p: state[PHEAD + p].to(dev).clone().requires_grad_(True) for p in self._classifier_names()}

    def _train(self, data, state, rng, train_generic: bool):
        """local_epochs of (generic step if train_generic) + personal step per mini-batch."""
        cfg, net = self.cfg, self.net
        dev = next(net.parameters()).device
        x, y = data.train_x, data.train_y
        log_prior = log_class_prior(y, self.task.num_classes).to(dev)
        ph = self._personal_params(state, dev)
        for p in net.parameters():
            p.requires_grad_(train_generic)
        opt_g = torch.optim.SGD(net.parameters(), lr=cfg.lr) if train_generic else None
        opt_p = torch.optim.SGD(list(ph.values()), lr=cfg.lr)
        net.train()
        total, steps = 0.0, 0
        for xb, yb in minibatches(x, y, cfg.local_epochs, cfg.batch_size, rng):
            z, g = features_and_logits(net, xb)
            if train_generic:
                assert opt_g is not None  # made above whenever train_generic
                loss_g = (balanced_softmax_loss(g, yb, log_prior) if cfg.generic_loss == "bsm"
                          else cross_entropy(g, yb))
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
            loss_p = cross_entropy(g.detach() + F.linear(z.detach(), ph["weight"], ph.get("bias")), yb)
            opt_p.zero_grad(set_to_none=True)
            loss_p.backward()
            opt_p.step()
            total += float(loss_p.detach())
            steps += 1
        for p in net.parameters():
            p.requires_grad_(True)
        new_state = {PHEAD + p: t.detach().to("cpu", copy=True) for p, t in ph.items()}
        return new_state, (total / steps if steps else float("nan")), steps

    def local_update(self, down: Message, state: State, data: ClientTensors, rng: torch.Generator) -> LocalResult:
        net = self.net
        load(net, down)
        new_state, loss, steps = self._train(data, state, rng, train_generic=True)
        up = with_num_samples(snapshot(net, down.keys()), data.num_train)
        return LocalResult(up, new_state, {"loss": loss, "steps": steps})

    def evaluate(self, down, state, data, rng):
        net = self.net
        load(net, down)
        dev = next(net.parameters()).device
        weight = state[PHEAD + "weight"].to(dev)
        bias = state[PHEAD + "bias"].to(dev) if (PHEAD + "bias") in state else None
        return eval_metrics(Personalized(net, weight, bias), data)

    def personalize(self, down, state, data, rng):
        """Held-out client: the personal step alone on the final generic model (frozen)."""
        load(self.net, down)
        new_state, _, _ = self._train(data, state, rng, train_generic=False)
        return new_state
