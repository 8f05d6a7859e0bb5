"""pFedMe: Dinh, Tran, Nguyen, "Personalized Federated Learning with Moreau Envelopes", NeurIPS 2020,
arXiv 2006.08848 (reference code: github.com/CharlieDinh/pFedMe).

Each client minimizes the Moreau envelope of its loss, F_i(w_i) = min_theta f_i(theta) + (lam/2) ||theta - w_i||^2;
its personalized model theta_i is the proximal point of f_i around its copy w_i of the global model.

    Client (Algorithm 1), receiving w:  w_i <- w, theta <- w
        for each mini-batch B of local_epochs shuffled passes over D_i (one local round r):
            K inner steps on B, approximating theta = argmin_theta CE(theta; B) + (lam/2) ||theta - w_i||^2
            (+ (mu/2) ||theta||^2, the reference's L2 term):
                theta <- theta - personal_lr * (grad CE(theta; B) + lam * (theta - w_i) + mu * theta)
            outer step:  w_i <- w_i - eta * lam * (w_i - theta)
        send (w_i, n_i); theta_i (the last theta) stays in the client's state (prefix `theta.`)
    Server: w <- (1 - beta) w + beta * sum_i n_i w_i / sum_i n_i    (client-id order, float64)
    Eval:   the personalized theta_i (the paper's "pFedMe (PM)" results); a client that has not
            trained yet uses w (at the final evaluation the engine personalizes it first).
    Held out: one local update from the final w, then its theta is evaluated.

Defaults are the reference's (`main.py` defaults and its README commands, `fedoptimizer.py`):
eta = 0.005 (`--learning_rate`, every pFedMe command but the beta = 2 ones), personal_lr = 0.09
(`--personal_learning_rate` default, MNIST-DNN command; 0.01 on Synthetic and CIFAR-10, 0.1 on
MNIST-MCLR), lam = 15 (MNIST, CIFAR-10; 20 on Synthetic), K = 5, beta = 1, and mu = 1e-3: the default
of `pFedMeOptimizer`, which `UserpFedMe` never overrides, so every reference run has it. The outer step
contracts toward theta while eta * lam < 2 (the reference: 0.005 * 15 = 0.075). pFedMe has its own
two step sizes: the run's `--lr` is not used.

Choices, and where they come from:
  * theta is warm-started: from w at the start of the round, then from the previous batch's theta
    (the reference keeps theta in the model between local rounds, `UserpFedMe.train`).
  * The inner step is the reference's `pFedMeOptimizer.step` (mu on theta, weights and biases alike);
    w_i is that optimizer's state, so the memory meter counts the extra model copy pFedMe keeps
    during training.
  * The reference's `local_epochs` R counts mini-batches (R = 20); here local_epochs counts passes over
    D_i, as for every method of the harness: one pass is ceil(n_i / batch_size) local rounds.
  * Server weights: Algorithm 1 averages the sampled w_i uniformly; the reference weights them by n_i
    (`persionalized_aggregate_parameters`), as here. The reference also trains every client each round
    and aggregates only a sample; here only the round's cohort trains, as in every other method.
  * Evaluation: here the true theta_i. The reference's "personalized" evaluation
    (`test_persionalized_model`) loads `persionalized_model_bar`, a list of the model's own Parameter
    objects, which `update_parameters(local_model)` has just overwritten with w_i: it evaluates w_i
    (CharlieDinh/pFedMe issue #5). The paper's PM numbers are therefore those of w_i after local
    training; this harness reports theta_i, what the paper defines.
  * Buffers (BatchNorm statistics) are not part of the proximal problem: they follow theta's forward
    passes, are kept with theta_i and uploaded with w_i.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.ranges import ranged
from fedeq_bench.methods.base import (
    AggregateResult,
    ClientTensors,
    LocalResult,
    Message,
    Method,
    MethodConfig,
    State,
    register_method,
    whole_model_personal,
)
from fedeq_bench.methods.train import (
    cross_entropy,
    eval_metrics,
    load,
    minibatches,
    snapshot,
    weighted_average,
    with_num_samples,
)

THETA = "theta."
"""State key prefix of the personalized model theta_i."""


@dataclass(frozen=True)
class PFedMeConfig(MethodConfig):
    K: int = ranged(5, ge=1)
    """Inner steps per mini-batch solving for theta; raising it solves the proximal problem more
    exactly, at K times the compute."""
    personal_lr: float = ranged(0.09, gt=0)
    """Step size of the inner (theta) steps; raising it moves theta faster toward the batch's optimum."""
    eta: float = ranged(0.005, gt=0)
    """Outer step size: w_i <- w_i - eta * lam * (w_i - theta); raising it pulls w_i toward theta
    faster (it contracts while eta * lam < 2). pFedMe's own, not the run's --lr."""
    lam: float = ranged(15.0, gt=0)
    """Moreau-envelope weight; raising it ties theta_i closer to w_i (less personalization) and
    enlarges the outer step eta * lam."""
    mu: float = ranged(1e-3, ge=0)
    """L2 weight on theta in the inner steps (the reference's pFedMeOptimizer); raising it shrinks
    theta toward 0; 0 turns it off."""
    beta: float = ranged(1.0, gt=0, le=2)  # the paper runs 1 and 2; over-relaxing past 2 overshoots
    """Server mixing weight; 1 takes the weighted mean of the w_i, below 1 keeps part of the old w."""


class PFedMeOptimizer(torch.optim.Optimizer):
    """theta <- theta - lr * (grad + lam * (theta - w_i) + mu * theta); w_i (the anchor) is this
    optimizer's state."""

    def __init__(self, params, anchors, lr: float, lam: float, mu: float = 0.0):
        super().__init__(params, dict(lr=lr, lam=lam, mu=mu))
        params = [p for g in self.param_groups for p in g["params"]]
        for p, a in zip(params, anchors, strict=True):
            self.state[p]["w_i"] = a

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                d = group["lam"] * (p - self.state[p]["w_i"])
                if group["mu"]:
                    d = d + group["mu"] * p
                p.sub_(group["lr"] * (d if p.grad is None else p.grad + d))
        return None


@register_method("pfedme")
class PFedMe(Method):
    Config = PFedMeConfig

    def param_split(self, net):
        # Shared: w, uploaded every round. Personal: theta_i, a whole second model kept on the client.
        return whole_model_personal(net)

    # -- server --------------------------------------------------------------------------------
    def init_server(self, model, rng):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def broadcast(self, server, cid, rnd):
        return dict(server)

    def aggregate(self, server: State, replies: list[tuple[int, Message]], rnd: int) -> AggregateResult:
        mean = weighted_average(replies, server.keys())
        beta = self.cfg.beta
        if beta == 1:
            return AggregateResult(mean, {})  # (1 - 1) * w would still turn an inf in the old w into nan
        new = {}
        for k, m in mean.items():
            if not m.is_floating_point():
                new[k] = m  # integer buffers (num_batches_tracked) take the mean's max
                continue
            mixed = (1 - beta) * server[k].to(torch.float64) + beta * m.to(torch.float64)
            new[k] = mixed.to(m.dtype)
        return AggregateResult(new, {})

    # -- client --------------------------------------------------------------------------------
    def local_update(self, down: Message, state: State, data: ClientTensors, rng: torch.Generator) -> LocalResult:
        cfg, net = self.cfg, self.net
        names = list(down)
        load(net, down)  # theta <- w
        params = list(net.parameters())
        for p in params:
            p.requires_grad_(True)
        w_i = [p.detach().clone() for p in params]  # w_i <- w
        if cfg.mu < 0 or cfg.eta <= 0:
            raise BenchError(f"pfedme: mu must be >= 0 and eta > 0, got mu={cfg.mu}, eta={cfg.eta}")
        opt = PFedMeOptimizer(params, w_i, lr=cfg.personal_lr, lam=cfg.lam, mu=cfg.mu)
        outer = cfg.eta * cfg.lam
        x, y = data.train_x, data.train_y
        net.train()
        total, steps = 0.0, 0
        for xb, yb in minibatches(x, y, cfg.local_epochs, cfg.batch_size, rng):
            for _ in range(cfg.K):  # approximate the proximal point theta on this batch
                opt.zero_grad(set_to_none=True)
                loss = cross_entropy(net(xb), yb)  # per token on per-position targets (Shakespeare)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                steps += 1
            with torch.no_grad():  # outer step: w_i <- w_i - eta * lam * (w_i - theta)
                for p, a in zip(params, w_i, strict=True):
                    a.sub_(outer * (a - p))
        theta = snapshot(net, names)  # parameters and buffers of the personalized model
        param_names = [k for k, _ in net.named_parameters()]
        up = dict(theta)  # buffers follow theta's forward passes ...
        # ... parameters are w_i
        up.update({k: a.detach().to("cpu", copy=True) for k, a in zip(param_names, w_i, strict=True)})
        up = with_num_samples(up, data.num_train)
        mean_loss = total / steps if steps else float("nan")
        return LocalResult(up, {THETA + k: t for k, t in theta.items()}, {"loss": mean_loss, "steps": steps})

    def evaluate(self, down, state, data, rng):
        has_theta = bool(down) and (THETA + next(iter(down))) in state
        load(self.net, {k: state[THETA + k] for k in down} if has_theta else down)
        return eval_metrics(self.net, data)
