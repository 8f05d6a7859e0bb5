"""FeDEQ: Le et al., "Federated Deep Equilibrium Learning: Harnessing Compact Global Representations to
Enhance Personalization", CIKM 2024, arXiv 2309.15659 (reference code: github.com/longtanle/FeDEQ).

The model is a shared equilibrium representation z* = f_theta(z*, x) (theta: the `body.` parameters
and normalization state) followed by explicit personal layers w_i (the `head.`). Consensus ADMM
over theta, per sampled client i and round:

    1. personal step:        personal_epochs of SGD on CE(theta_i, w_i) w.r.t. w_i only
    2. representation step:  shared_epochs of SGD w.r.t. theta_i only on the augmented Lagrangian
                             CE(theta_i, w_i) + <dual_i, theta_i - theta> + (rho/2) ||theta_i - theta||^2
    3. dual step:            dual_i <- dual_i + rho (theta_i - theta)
    4. upload theta_i (parameters and the normalization statistics the body carries) and n_i

    Server:  theta <- sum_i n_i theta_i / sum_i n_i            (aggregate = "mean", the default;
                                                                server_weights = "uniform": n_i = 1)
             theta <- sum_i n_i (theta_i + dual_i / rho) / sum_i n_i
                                                               (aggregate = "mean_plus_dual": textbook
                                                                consensus ADMM; the client uploads the
                                                                single tensor theta_i + dual_i / rho)
    dual_i (lambda_i) and w_i never leave the client; dual_i starts at dual_init (0; the reference's
    `--lam_admm`, 0.001 in its Shakespeare runner: every entry of lambda_i starts there).
    penalty_scale = "tokens" divides the penalty terms (not the dual step) by the mini-batch's token
    count, as the reference's Shakespeare loss does (`rdeq_nll_loss_fn`, utils/jax_utils.py):
        CE_per_token + (<dual_i, theta_i - theta> + rho/2 ||theta_i - theta||^2) / T_batch,
    T_batch = number of input positions with id > 0 (its mask `inputs > 0`; id 0 is padding).

Where textbook consensus ADMM and the reference code differ, the defaults follow the reference:
  * aggregate = "mean": the reference averages the theta_i alone.
  * restart = "reference": a client sampled in two consecutive rounds continues from its own theta_i;
    otherwise it restarts from the broadcast theta (reference: `if client_rounds[t] == False:
    local_shared_params[t] = shared_params`). "always" restarts every client from theta every round.
    The server tells each client with a one-byte flag (`resume`, counted in bytes/down).
Evaluation personalizes with the client's own (theta_i, w_i) (`eval_theta = "own"`, the reference's
eval_fedeq); a client that never trained uses theta. `eval_theta = "global"` evaluates (theta, w_i).
A held-out client starts from the final theta and a fresh head, trains the head for
personal_epochs, then is evaluated (the reference's unseen-client protocol).
Defaults: rho = 0.01, plain SGD, the same lr for both steps, implicit backward, and the forward
solve as the reference's (utils/model_utils.py, deq/solver/anderson.py there): Anderson, m = 5,
ridge 1e-4, 20 steps, stop when ||f(z) - z||_2 <= 1e-3 per example (stop_mode = "abs"), m = 5
plain steps before accelerating, the last iterate returned (anderson_variant = "reference").

Speed option, off by default: the personal step trains w_i with the body frozen, so z* of each
training example is the same in every epoch of that step. Where the body computes the same thing in
train mode whatever the batch (no BatchNorm, no dropout, and a per-example solver: the reference
Anderson), `cache_head_features = true` runs the body once over the client's data and trains the head
on those features: the same head update up to float rounding (tested), but the client then holds
z* of all its examples at once, which is what a device's peak memory would have to hold (on the
default task 10.6 MB against 1.5 MB per batch: it, not the adjoint, made FeDEQ's peak 16x FedRep's
there). Off (the default, as the reference): the body runs per batch, in train mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.ranges import ranged
from fedeq_bench.methods.base import (
    NUM_SAMPLES,
    AggregateResult,
    ClientTensors,
    LocalResult,
    Message,
    Method,
    MethodConfig,
    State,
    register_method,
)
from fedeq_bench.methods.nets import body_of, head_of, split_names
from fedeq_bench.methods.train import (
    draws_dropout,
    eval_metrics,
    load,
    phases_loss,
    sgd_epochs,
    snapshot,
    with_num_samples,
)

THETA, HEAD, DUAL, NORM = "theta.", "head.", "dual.", "norm."
FEATURE_CHUNK = 1024  # examples per body forward when caching the head step's features
RESUME = "resume"
LAST_COHORT = "last_cohort"


@dataclass(frozen=True)
class FeDEQConfig(MethodConfig):
    rho: float = ranged(0.01, gt=0)
    """ADMM penalty; raising it pulls each theta_i closer to the consensus theta (less personal drift)."""
    personal_epochs: int = ranged(3, ge=0)
    """Epochs of head-only SGD per round (step 1); raising it fits w_i closer to local data."""
    shared_epochs: int = ranged(5, ge=0)
    """Epochs of representation SGD on the augmented Lagrangian per round (step 2)."""
    aggregate: Literal["mean", "mean_plus_dual"] = "mean"
    """Server step: `mean` of theta_i (reference code) or `mean_plus_dual` (textbook consensus ADMM)."""
    restart: Literal["reference", "always"] = "reference"
    """`reference`: a client sampled in consecutive rounds keeps its theta_i; `always`: restart from theta."""
    eval_theta: Literal["own", "global"] = "own"
    """Evaluate with the client's own theta_i (reference) or with the global theta and its own head."""
    solver: Literal["anderson", "broyden", "fixed_point"] = "anderson"
    """Forward fixed-point solver of the DEQ layer."""
    max_iter: int = ranged(20, ge=1)
    """Forward solver steps at most; raising it lowers residuals at more compute (not more memory)."""
    tol: float = ranged(1e-3, gt=0)
    """Forward solver's residual tolerance (in stop_mode's unit); lowering it costs more steps."""
    stop_mode: Literal["abs", "rel", "batch"] = "abs"
    """Forward residual: `abs` ||f(z) - z||_2 per example (reference, vision), `rel` (/ ||f(z)||, looser on
    large states) or `batch`, the whole batch's ||f(Z) - Z||_F / sqrt(numel Z), solver=broyden only (the
    reference's sequence DEQ with tol 1e-6; a Broyden adjoint then stops on it too, at b_tol)."""
    second_solve: bool = False
    """Where the body's output is not differentiated (evaluation, the head step), return a second solve
    from f(z*) instead of z*, as the reference's sequence DEQ does (methods/deq/layer.py)."""
    anderson_variant: Literal["reference", "torchdeq"] = "reference"
    """Anderson (solver=anderson): `reference` m plain warm-up steps, per-example stop, last iterate;
    `torchdeq` 2 warm-up steps, batch-wide stop, lowest-residual iterate."""
    cache_head_features: bool = False
    """Personal step: compute z* once per round and train the head on it, where that is exact; faster,
    but holds z* of all the client's examples at once, so peak memory grows with the data (module docstring)."""
    penalty_scale: Literal["none", "tokens"] = "none"
    """`tokens`: divide the ADMM penalty by the batch's non-padding input tokens (reference, Shakespeare)."""
    dual_init: float = ranged(0.0)  # any finite value: a Lagrange multiplier has no sign
    """Initial value of every dual entry (reference `--lam_admm`; 0.001 in its Shakespeare runner)."""
    server_weights: Literal["samples", "uniform"] = "samples"
    """Server average weighted by n_i (`samples`) or uniform over the cohort (reference code)."""
    backward: Literal["implicit", "jfb", "phantom"] = "implicit"
    """Gradient: implicit differentiation, Jacobian-free (one step), or phantom (k unrolled steps)."""
    b_solver: Literal["gmres", "bicgstab", "normal_cg", "anderson", "broyden", "fixed_point"] = "normal_cg"
    """Adjoint solver of the implicit backward: `normal_cg` (the reference's CG on the normal equations,
    per example; the default by the measured rule in docs/performance.md, Adjoint solvers), `gmres`
    (Krylov, one system over the batch, one stored vector per product: the default before),
    `bicgstab` (constant memory, one system) or a fixed-point solver (methods/deq/adjoint.py)."""
    b_max_iter: int = ranged(50, ge=1)
    """Vector-Jacobian products at most in the implicit backward's adjoint solve (gmres keeps one vector each)."""
    b_tol: float = ranged(1e-3, gt=0)
    """Adjoint solve's tolerance on ||J^T g + dL/dz - g|| / ||dL/dz|| (gmres); lowering it costs more VJPs."""


@register_method("fedeq")
class FeDEQ(Method):
    Config = FeDEQConfig
    model_kind = "deq"

    def __init__(self, cfg, task, net=None):
        if cfg.stop_mode == "batch" and cfg.solver != "broyden":
            raise BenchError(f"fedeq.stop_mode=batch (the reference's Broyden rule) needs fedeq.solver=broyden, "
                             f"got {cfg.solver!r}")
        super().__init__(cfg, task, net)
        self._solves: list[dict[str, torch.Tensor]] = []  # solver stats of the current call only
        self._b_solves: list[dict[str, torch.Tensor]] = []  # adjoint solves (implicit backward), the same
        self._configured = False  # the scratch net's DEQ layers carry this config and report stats

    @property
    def net(self) -> torch.nn.Module:
        net = super().net
        if not self._configured:
            self._configured = True
            from fedeq_bench.methods.deq import DEQ

            for m in net.modules():
                if isinstance(m, DEQ):
                    kw = {"variant": self.cfg.anderson_variant} if self.cfg.solver == "anderson" else {}
                    m.configure(solver=self.cfg.solver, max_iter=self.cfg.max_iter, tol=self.cfg.tol,
                                stop_mode=self.cfg.stop_mode, second_solve=self.cfg.second_solve, solver_kw=kw,
                                backward=self.cfg.backward, b_max_iter=self.cfg.b_max_iter, b_tol=self.cfg.b_tol,
                                b_solver=self.cfg.b_solver)
                    m.backward_stats_hooks.append(lambda stats: self._b_solves.append(stats))
                    m.register_forward_hook(lambda mod, args, out: self._solves.append(mod.last_stats))
        return net

    def param_split(self, net):
        return split_names(net)

    def _names(self):
        """(shared state names, shared trainable parameter names, personal names)."""
        net = self.net
        body, head = split_names(net)
        params = {n for n, _ in net.named_parameters()}
        return body, [n for n in body if n in params], head

    # -- server --------------------------------------------------------------------------------
    def init_server(self, model, rng):
        # The initial head stays on the server only to give every new client the same starting w_i.
        server = {k: v.detach().clone() for k, v in model.state_dict().items()}
        server[LAST_COHORT] = torch.zeros(0, dtype=torch.int64)
        return server

    def broadcast(self, server, cid, rnd):
        body, _, _ = self._names()
        down = {k: server[k] for k in body}
        resume = self.cfg.restart == "reference" and bool((server[LAST_COHORT] == cid).any())
        down[RESUME] = torch.tensor(resume)
        return down

    def aggregate(self, server: State, replies: list[tuple[int, Message]], rnd: int) -> AggregateResult:
        from fedeq_bench.methods.train import weighted_average

        body, _, _ = self._names()
        new = dict(server)
        if self.cfg.server_weights == "uniform":  # the reference's model_average(..., weights=None)
            replies = [(cid, {**m, NUM_SAMPLES: torch.tensor(1, dtype=torch.int64)}) for cid, m in replies]
        new.update(weighted_average(replies, body))
        new[LAST_COHORT] = torch.tensor(sorted(cid for cid, _ in replies), dtype=torch.int64)
        return AggregateResult(new, {})

    # -- client --------------------------------------------------------------------------------
    def init_client(self, cid, server, rng):
        _, _, head = self._names()
        return {HEAD + k: server[k].clone() for k in head}  # theta_i and dual_i appear on first training

    def local_update(self, down: Message, state: State, data: ClientTensors, rng: torch.Generator) -> LocalResult:
        cfg, net = self.cfg, self.net
        body, trainable, head = self._names()
        theta = {k: down[k] for k in body}  # the consensus theta this round
        resume = bool(down[RESUME]) and (THETA + body[0]) in state
        start = {k: state[THETA + k] for k in body} if resume else theta
        load(net, start)
        load(net, {k: state[HEAD + k] for k in head})
        dual = {k: state.get(DUAL + k, torch.full_like(theta[k], cfg.dual_init)) for k in trainable}
        self._solves = []

        # 1. personal step: w_i only.
        l_head, s_head = self._head_step(net, data, cfg.personal_epochs, rng)
        # 2. representation step: theta_i only, on CE + <dual, theta_i - theta> + rho/2 ||theta_i - theta||^2.
        own = dict(net.named_parameters())
        dev = next(net.parameters()).device
        theta_t = {k: theta[k].to(dev) for k in trainable}
        dual_t = {k: dual[k].to(dev) for k in trainable}

        batch_x: list[torch.Tensor] = []  # the current mini-batch's input (penalty_scale = "tokens")

        def penalty():
            total: torch.Tensor | float = 0.0
            for k in trainable:
                diff = own[k] - theta_t[k]
                total = total + (dual_t[k] * diff).sum() + 0.5 * cfg.rho * diff.pow(2).sum()
            if cfg.penalty_scale == "tokens":
                total = total / _tokens(batch_x[-1])
            return total

        # sgd_epochs calls net(xb) and then penalty(): a pre-hook hands the batch to the penalty.
        hook = net.register_forward_pre_hook(lambda mod, args: batch_x.append(args[0])) \
            if cfg.penalty_scale == "tokens" else None
        try:
            l_body, s_body = sgd_epochs(net, list(body_of(net).parameters()), data.train_x, data.train_y,
                                        cfg.shared_epochs, cfg.batch_size, cfg.lr, rng, penalty=penalty)
        finally:
            if hook is not None:
                hook.remove()
        # 3. dual step.
        new_theta = snapshot(net, body)
        new_dual = {k: dual[k] + cfg.rho * (new_theta[k] - theta[k]) for k in trainable}
        # 4. upload theta_i (or theta_i + dual_i / rho for the textbook server step).
        up = dict(new_theta)
        if cfg.aggregate == "mean_plus_dual":
            for k in trainable:
                up[k] = new_theta[k] + new_dual[k] / cfg.rho
        up = with_num_samples(up, data.num_train)
        new_state = {HEAD + k: v for k, v in snapshot(net, head).items()}
        new_state.update({THETA + k: v for k, v in new_theta.items()})
        new_state.update({DUAL + k: v for k, v in new_dual.items()})
        steps = s_head + s_body
        metrics = {"loss": phases_loss((l_head, s_head), (l_body, s_body)), "steps": steps}
        metrics.update(self._solver_metrics())
        return LocalResult(up, new_state, metrics)

    def _solver_metrics(self) -> dict[str, float]:
        """Solver statistics over every example of every training forward (deq/...) and every
        implicit backward's adjoint solve (deq/b_...) of this call."""
        out: dict[str, float] = {}
        for prefix, log in (("deq/", self._solves), ("deq/b_", self._b_solves)):
            solves = [s for s in log if s is not None]
            if not solves:
                continue
            nstep = torch.cat([s["nstep"].double().flatten() for s in solves])
            res = torch.cat([s["residual"].double().flatten() for s in solves])
            conv = torch.cat([s["converged"].flatten() for s in solves])
            out.update({f"{prefix}nstep_mean": float(nstep.mean()), f"{prefix}residual_max": float(res.max()),
                        f"{prefix}unconverged_frac": float((~conv).double().mean())})
        self._solves, self._b_solves = [], []
        return out

    def _head_step(self, net, data, epochs: int, rng) -> tuple[float, int]:
        """personal_epochs of head-only SGD; on cached body features where that is exact."""
        head_params = list(head_of(net).parameters())
        if not (self.cfg.cache_head_features and epochs > 0 and self._body_is_batch_free(net)):
            return sgd_epochs(net, head_params, data.train_x, data.train_y, epochs, self.cfg.batch_size,
                              self.cfg.lr, rng)
        # The body in train mode, without a graph: what each mini-batch forward of the head step
        # would compute for these examples (train mode changes nothing in a batch-free body).
        net.train()
        with torch.no_grad():
            feats = torch.cat([body_of(net)(data.train_x[s : s + FEATURE_CHUNK])
                               for s in range(0, int(data.train_y.shape[0]), FEATURE_CHUNK)])
        # Same batches (same rng draws), same loss, same SGD on the head alone.
        return sgd_epochs(head_of(net), head_params, feats, data.train_y, epochs, self.cfg.batch_size,
                          self.cfg.lr, rng)

    def _body_is_batch_free(self, net) -> bool:
        """True when the body's train-mode output for an example does not depend on the rest of its
        batch or on randomness: no batch norm, no active dropout, and a per-example DEQ solver."""
        from fedeq_bench.methods.deq import DEQ

        for m in body_of(net).modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                return False
            if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
                return False
            if draws_dropout(m):  # nn.Dropout, attention dropout, F.dropout at the module's rate
                return False
            if isinstance(m, DEQ) and not (m.solver == "anderson" and m.solver_kw.get("variant") == "reference"):
                return False  # torchdeq's solvers stop batch-wide: an example's z* depends on its batch
        return True

    def _load_for_eval(self, down, state):
        body, _, head = self._names()
        own = self.cfg.eval_theta == "own" and (THETA + body[0]) in state
        load(self.net, {k: state[THETA + k] for k in body} if own else {k: down[k] for k in body})
        load(self.net, {k: state[HEAD + k] for k in head})
        # A held-out client's normalization statistics, updated while its head trained (personalize).
        load(self.net, {k[len(NORM):]: v for k, v in state.items() if k.startswith(NORM)})

    def evaluate(self, down, state, data, rng):
        self._load_for_eval(down, state)
        metrics = eval_metrics(self.net, data)
        self._solves = []  # evaluation solves are not training statistics
        return metrics

    def personalize(self, down, state, data, rng):
        """Unseen client: final theta, fresh head, personal_epochs of head-only SGD; the body's
        normalization statistics (BatchNorm running mean/var) keep updating during those epochs
        and are kept for its evaluation, as the reference keeps `unseen_net_states`."""
        net = self.net
        body, trainable, head = self._names()
        load(net, {k: down[k] for k in body})
        load(net, {k: state[HEAD + k] for k in head})
        self._head_step(net, data, self.cfg.personal_epochs, rng)
        self._solves = []
        new = {HEAD + k: v for k, v in snapshot(net, head).items()}
        buffers = [k for k in body if k not in set(trainable)]
        new.update({NORM + k: v for k, v in snapshot(net, buffers).items()})
        return new


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """Non-padding input positions (id > 0) of a token-id batch (N, T): the reference's `sum(mask)`."""
    if x.dim() != 2:
        raise BenchError(f"fedeq.penalty_scale=tokens needs token-id inputs (N, T); this batch has shape "
                         f"{tuple(x.shape)}; use fedeq.penalty_scale=none")
    return (x > 0).sum().clamp_min(1)
