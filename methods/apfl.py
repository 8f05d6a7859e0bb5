"""APFL: Deng, Kamani, Mahdavi, "Adaptive Personalized Federated Learning", 2020, arXiv 2003.13461
(reference code: github.com/MLOPTPSU/FedTorch, fedtorch/comms/trainings/federated/apfl.py).

Each client keeps a local model v_i and a mixing weight alpha_i; its personalized model is the
PARAMETER-space mixture v_bar_i = alpha_i v_i + (1 - alpha_i) w_i. This file follows the paper's
Algorithm 1 with its adaptive-alpha update, per mini-batch B of local_epochs shuffled passes over
D_i, all three updates from the values before the step (simultaneous, as Algorithm 1 writes them):

    g_w   = grad CE(w_i; B)
    g_mix = grad CE(v_bar_i; B) evaluated at v_bar_i = alpha_i v_i + (1 - alpha_i) w_i
    w_i     <- w_i - lr * g_w
    v_i     <- v_i - lr * alpha_i * g_mix                 (grad of CE(v_bar_i) w.r.t. v_i)
    alpha_i <- clip(alpha_i - alpha_lr * <v_i - w_i, g_mix>, 0, 1)   (if adaptive_alpha; the sum
                                                          runs over every parameter tensor)
    send (w_i, n_i); v_i (prefix `v.`) and alpha_i (`alpha`) stay in the client's state
    Server: w <- sum_i n_i w_i / sum_i n_i                 (client-id order, float64)
    Eval:   the mixture v_bar_i = alpha_i v_i + (1 - alpha_i) w with the current global w.

Where other implementations differ, and why this one does not:
  * The reference (FedTorch `inference_personal`) and several harnesses mix OUTPUTS,
    alpha * f(x; v) + (1 - alpha) * f(x; w); the paper mixes PARAMETERS (its personalized model
    v_bar = alpha v + (1 - alpha) w in Algorithm 1). Parameters are mixed here; the two agree only
    when f is linear in its parameters.
  * The reference updates alpha once per round (first batch) with an extra 0.02 * alpha term; here
    alpha moves every step with the paper's gradient <v - w, grad f(v_bar)>, no extra term. Some
    harnesses never update alpha at all; `adaptive_alpha = False` gives that fixed-alpha variant
    on purpose (the paper also reports APFL at fixed alpha values).

Choices, and where they come from:
  * alpha_lr = None means lr: Algorithm 1 uses the same step size eta_t for w, v and alpha.
  * alpha starts at 0.5 for every client (the midpoint between global and local; the adaptive
    update moves it from there).
  * v_i starts from w^0, the initial model every client shares (so v_bar also starts at w^0),
    handed over by init_client, not counted as traffic.
  * The global step is exactly FedAvg's local update (same batches, same SGD).
  * The reported training loss is the mixture's CE (the personalized model APFL evaluates); the
    update also reports `apfl/alpha`, the client's alpha after the round (the cohort's mean reaches
    MLflow every round).
  * Buffers (BatchNorm statistics) are not mixed: the mixture's forward passes update v_i's buffers,
    so v_bar is evaluated with v_i's buffers (statistics of the mixture's own activations); w_i's
    buffers follow w_i's forward passes and are uploaded with it.
  * A held-out client: v <- w^0, alpha <- alpha_init, one local update from the final w (upload
    dropped: the base `personalize`), then evaluated as above.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from fedeq_bench.core.ranges import ranged
from fedeq_bench.methods.base import (
    ClientTensors,
    LocalResult,
    Message,
    Method,
    MethodConfig,
    State,
    register_method,
    whole_model_personal,
)
from fedeq_bench.methods.fedavg import FedAvg
from fedeq_bench.methods.train import cross_entropy, eval_metrics, load, minibatches, snapshot, with_num_samples

V = "v."
"""State key prefix of the local model v_i."""
ALPHA = "alpha"
"""State key of the mixing weight alpha_i (float64 scalar)."""


@dataclass(frozen=True)
class APFLConfig(MethodConfig):
    alpha: float = ranged(0.5, ge=0, le=1)
    """Initial mixing weight of the local model v_i in v_bar_i (0: the global model, 1: purely local)."""
    adaptive_alpha: bool = True
    """Learn alpha_i per client by SGD on the mixture's loss (the paper's adaptive APFL); False keeps it fixed."""
    alpha_lr: float | None = ranged(None, gt=0)
    """Step size of the alpha update; None: lr (Algorithm 1's single eta_t). Raising it moves alpha faster."""


@register_method("apfl")
class APFL(FedAvg):
    Config = APFLConfig

    def __init__(self, cfg, task, net=None):
        super().__init__(cfg, task, net)
        self._mix = None  # a second scratch network holding v_bar_i during training

    def param_split(self, net):
        # Shared: w, uploaded every round. Personal: v_i, a whole second model (and alpha_i).
        return whole_model_personal(net)

    @property
    def mix_net(self):
        if self._mix is None:
            # Same architecture as the scratch net (a copy when one was given prebuilt).
            self._mix = copy.deepcopy(self.net)
        return self._mix

    def _names(self):
        net = self.net
        params = [n for n, _ in net.named_parameters()]
        return list(net.state_dict()), params

    @property
    def alpha_lr(self) -> float:
        return self.cfg.lr if self.cfg.alpha_lr is None else self.cfg.alpha_lr

    # -- server --------------------------------------------------------------------------------
    # -- client --------------------------------------------------------------------------------
    def init_client(self, cid, server, rng):
        state = {V + k: v.clone() for k, v in server.items()}
        state[ALPHA] = torch.tensor(float(self.cfg.alpha), dtype=torch.float64)
        return state

    @staticmethod
    def _load_mixture(mix_net, v, w, alpha: float, param_names, buffers):
        """mix_net <- (alpha v + (1 - alpha) w) for parameters, v's values for buffers."""
        own = mix_net.state_dict(keep_vars=True)
        with torch.no_grad():
            for k in param_names:
                own[k].copy_(alpha * v[k] + (1.0 - alpha) * w[k])
            for k in buffers:
                own[k].copy_(v[k])

    def local_update(self, down: Message, state: State, data: ClientTensors, rng: torch.Generator) -> LocalResult:
        cfg, net, mix_net = self.cfg, self.net, self.mix_net
        names, param_names = self._names()
        buffers = [k for k in names if k not in set(param_names)]
        load(net, down)                                   # w_i <- w
        load(mix_net, {k: state[V + k] for k in buffers})  # the mixture runs on v_i's buffers
        dev = next(net.parameters()).device
        w_params = dict(net.named_parameters())
        # v_i as trainable leaf tensors with their own optimizer (so the memory meter sees v's
        # gradients and the step is plain SGD, as for w_i).
        v_params = {k: state[V + k].to(dev).clone().requires_grad_(True) for k in param_names}
        mix_params = dict(mix_net.named_parameters())
        alpha = float(state[ALPHA])
        opt_w = torch.optim.SGD(list(w_params.values()), lr=cfg.lr)
        opt_v = torch.optim.SGD(list(v_params.values()), lr=cfg.lr)
        for p in net.parameters():
            p.requires_grad_(True)
        for p in mix_net.parameters():
            p.requires_grad_(True)
        net.train()
        mix_net.train()

        x, y = data.train_x, data.train_y
        total, steps = 0.0, 0
        for xb, yb in minibatches(x, y, cfg.local_epochs, cfg.batch_size, rng):
            # v_bar from the values before this step (Algorithm 1 updates all three simultaneously).
            self._load_mixture(mix_net, v_params, w_params, alpha, param_names, [])
            opt_w.zero_grad(set_to_none=True)
            opt_v.zero_grad(set_to_none=True)
            mix_net.zero_grad(set_to_none=True)
            loss_w = cross_entropy(net(xb), yb)
            loss_w.backward()
            loss_mix = cross_entropy(mix_net(xb), yb)
            loss_mix.backward()
            with torch.no_grad():
                # d CE(v_bar) / d alpha = <v - w, g_mix>, accumulated over tensors in float64
                # (one device sync per step); d CE(v_bar) / d v = alpha * g_mix.
                grad_alpha_t = torch.zeros((), dtype=torch.float64, device=dev)
                for k in param_names:
                    g_mix = mix_params[k].grad
                    assert g_mix is not None  # every parameter of mix_net is in loss_mix's graph
                    grad_alpha_t += ((v_params[k] - w_params[k]).double() * g_mix.double()).sum()
                    v_params[k].grad = g_mix * alpha
                grad_alpha = float(grad_alpha_t)
            opt_w.step()
            opt_v.step()
            if cfg.adaptive_alpha:
                alpha = min(1.0, max(0.0, alpha - self.alpha_lr * grad_alpha))
            # The reported loss is the personalized model's (v_bar), the one APFL evaluates.
            total += float(loss_mix.detach())
            steps += 1

        up = with_num_samples(snapshot(net, names), data.num_train)
        new_state = {V + k: v_params[k].detach().to("cpu", copy=True) for k in param_names}
        new_state.update({V + k: t for k, t in snapshot(mix_net, buffers).items()})
        new_state[ALPHA] = torch.tensor(alpha, dtype=torch.float64)
        loss = total / steps if steps else float("nan")
        return LocalResult(up, new_state, {"loss": loss, "steps": steps, "apfl/alpha": alpha})

    personalize = Method.personalize  # not FedAvg's: a held-out client trains v and alpha

    def evaluate(self, down, state, data, rng):
        mix_net = self.mix_net
        names, param_names = self._names()
        buffers = [k for k in names if k not in set(param_names)]
        v = {k: state[V + k] for k in names}
        self._load_mixture(mix_net, v, down, float(state[ALPHA]), param_names, buffers)
        return eval_metrics(mix_net, data)
