"""DEQ: a weight-tied layer evaluated at its equilibrium, z* = func(z*, x).

Bai, Kolter, Koltun, "Deep Equilibrium Models", NeurIPS 2019 (arXiv 1909.01377). The forward pass
finds z* with a fixed-point solver (methods/deq/solvers.py) under torch.no_grad, so no activation
of the solver's iterations is kept; the backward pass is one of

  "implicit" (implicit function theorem; Bai et al. 2019, as in github.com/locuslab/deq and
             torchdeq): with J = d func / dz at z*, the loss gradient is
                 dL/dtheta = g^T d func(z*, x) / dtheta,   g = J^T g + dL/dz*     (adjoint fixed point)
             computed as: z = func(z*.detach(), x) with autograd (one application), and in its
             backward the incoming dL/dz is replaced by g, solved with `b_solver` (J^T g by
             torch.autograd.grad, a vector-Jacobian product on that one application's graph;
             normal_cg also needs J w, got by differentiating that VJP once more; the default
             solver and why: methods/deq/adjoint.py).
  "jfb"      (Jacobian-free backpropagation; Fung et al., "JFB: Jacobian-Free Backpropagation for
             Implicit Networks", AAAI 2022): z = func(z*.detach(), x); gradient through that step
             only, i.e. g = dL/dz (the Neumann series of (I - J)^-T cut after its first term).
  "phantom"  (phantom gradients; Geng et al., "On Training Implicit Models", NeurIPS 2021):
             k = phantom_steps damped steps from z*.detach(), with autograd,
                 z <- (1 - tau) z + tau func(z, x),   tau = phantom_tau
             the gradient of the unrolled k steps, which tends to the implicit one as k grows.

Training memory therefore does not grow with the forward solver's max_iter: the saved activations
are those of one func application (implicit, jfb) or of phantom_steps applications (phantom).

Why an autograd.Function and not a tensor hook for "implicit": the hook form of locuslab/deq and
torchdeq's `hook_ift` (z.register_hook(closure over z)) forms the cycle z -> grad_fn -> hook ->
closure -> z, which Python's GC cannot see through autograd's C++ nodes (z and its graph leak when
a batch is dropped without backward), and its autograd.grad(z, ...) fires the hook again (torchdeq
removes the hook inside itself to stop the recursion, so a second backward skips the implicit
solve). torch 2.13 shows both (a weakref to z stays alive after del + gc.collect(); the hook
recurses until the stack overflows). torchdeq's default, an autograd.Function that re-runs func in
backward, avoids both but holds a second copy of func's activations during backward; ours keeps the
forward's graph (held by the Function's ctx, upstream of the Function, so no cycle) and re-runs
nothing. We do not use torchdeq's DEQ class itself (its phantom step tau f(z) + (1 - tau) z is the
same as ours): it takes func(z) closures and an argparse-like config, returns trajectory lists, and
its stats are not ours; the three backward modes are a few lines each on top of our solve().

In eval mode (module.training False) or under torch.no_grad only the forward solve runs, and z* is
returned as is; with `second_solve`, a second solve started from f(z*) is returned instead.

`second_solve` is FeDEQ's reference sequence DEQ (longtanle/FeDEQ deq/solver/deq_seq.py:24-29): it
solves, applies f once (z1 = f(z*)), then calls `rootfind_grad` from z1, a `jax.custom_vjp` whose
primal body is a second Broyden solve (rootfind.py:49-56) but whose differentiation rule returns z1
unchanged (`dumb_fwd`, rootfind.py:59-60, 70). So where the output is differentiated through the
DEQ (the representation step) the reference's value is f(z*), what "implicit" returns here already;
everywhere else (evaluation, and the head-only step, whose loss is differentiated w.r.t. the head
alone so the custom_vjp runs its primal body) it is the second solve's answer. This layer does the
same: the second solve replaces z* exactly where z* is returned without a graph. Its statistics are
merged into `last_stats`: nstep adds both solves' steps, residual and converged are the second's.
With `stop_mode="batch"`, a Broyden adjoint (`b_solver="broyden"`) also stops on the batch residual
(b_tol), as the reference's backward Broyden does with eps = 2e-10 sqrt(z.size) (rootfind.py:26-29).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from fedeq_bench.core.errors import BenchError, unknown
from fedeq_bench.methods.deq.adjoint import ADJOINT_SOLVERS, check_options, solve_adjoint
from fedeq_bench.methods.deq.solvers import DIVERGE_ABOVE, SOLVERS, STOP_MODES, _check_kw, solve

BACKWARDS = ("implicit", "jfb", "phantom")

# Setting -> default. Documented in DEQ.__init__'s docstring.
DEFAULTS: dict[str, Any] = {
    "solver": "anderson",
    "max_iter": 20,
    "tol": 1e-3,
    "stop_mode": "abs",
    "solver_kw": {},
    "backward": "implicit",
    "b_solver": "normal_cg",
    "b_max_iter": 50,
    "b_tol": 1e-3,
    "b_solver_kw": {},
    "phantom_steps": 5,
    "phantom_tau": 0.5,
    "diverge_above": DIVERGE_ABOVE,
    "second_solve": False,
}


def _positive_int(key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise BenchError(f"DEQ setting {key} must be an int >= 1, got {v!r}")
    return v


def _real(key: str, v: Any, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo < v if lo_open else lo <= v) or v > hi:
        side = "(" if lo_open else "["
        raise BenchError(f"DEQ setting {key} must be a number in {side}{lo:g}, {hi:g}], got {v!r}")
    return float(v)


def _validate(key: str, v: Any) -> Any:
    if key == "solver":
        SOLVERS.get(v)  # raises `unknown solver 'andersen'; choose from anderson, broyden, fixed_point`
        return v
    if key == "b_solver":
        ADJOINT_SOLVERS.get(v)  # the same, with gmres among the choices
        return v
    if key == "stop_mode":
        if v not in STOP_MODES:
            raise unknown("stop_mode", v, STOP_MODES)
        return v
    if key == "backward":
        if v not in BACKWARDS:
            raise unknown("backward", v, BACKWARDS)
        return v
    if key in ("max_iter", "b_max_iter", "phantom_steps"):
        return _positive_int(key, v)
    if key in ("tol", "b_tol"):
        return _real(key, v, 0.0)
    if key == "phantom_tau":
        return _real(key, v, 0.0, 1.0, lo_open=True)
    if key == "diverge_above":
        return _real(key, v, 0.0, lo_open=True)
    if key == "second_solve":
        if not isinstance(v, bool):
            raise BenchError(f"DEQ setting second_solve must be true or false, got {v!r}")
        return v
    if key in ("solver_kw", "b_solver_kw"):
        if not isinstance(v, dict):
            raise BenchError(f"DEQ setting {key} must be a dict of solver options, got {v!r}")
        return dict(v)
    raise unknown("DEQ setting", key, DEFAULTS)


class _Adjoint:
    """What the implicit backward needs, captured at forward time (a later configure() does not
    change a graph already built)."""

    __slots__ = ("z", "z_star", "owner", "solver", "max_iter", "tol", "stop_mode", "solver_kw", "diverge_above")
    z: Tensor
    z_star: Tensor
    owner: DEQ
    solver: str
    max_iter: int
    tol: float
    stop_mode: str
    solver_kw: dict[str, Any]
    diverge_above: float


class _ImplicitBackward(torch.autograd.Function):
    """Identity on z = func(z*, x); backward: dL/dz -> g solving g = J^T g + dL/dz."""

    @staticmethod
    def forward(ctx, z: Tensor, adj: _Adjoint) -> Tensor:
        # Held as an attribute, not save_for_backward: z is upstream of this node, so ctx -> z ->
        # z.grad_fn makes no cycle; func's own saved tensors are what the meter should count.
        ctx.adj = adj
        return z.view_as(z)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        adj: _Adjoint = ctx.adj
        z, z_star = adj.z, adj.z_star

        def vjp(u: Tensor) -> Tensor:  # u -> J^T u, J = d func / dz at z*
            # retain_graph: the solver calls this many times, and the main backward then
            # continues through the same graph to the parameters and x.
            return torch.autograd.grad(z, z_star, u, retain_graph=True)[0]

        built: list[tuple[Tensor, Tensor]] = []

        def jvp(w: Tensor) -> Tensor:  # w -> J w, for normal_cg only: the double-backward trick
            # h(u0) = J^T u0 with its own graph (create_graph), built once on first use and kept for
            # the solve: h is linear in u0, so its VJP with w is (J^T)^T w = J w. Nothing re-runs
            # func (no second BatchNorm update, no fresh dropout draw).
            if not built:
                with torch.enable_grad():
                    u0 = torch.zeros_like(z, requires_grad=True)
                    built.append((u0, torch.autograd.grad(z, z_star, u0, retain_graph=True, create_graph=True)[0]))
            u0, h = built[0]
            return torch.autograd.grad(h, u0, w, retain_graph=True)[0]

        # Raises DEQDivergence("backward (adjoint) ...") on NaN/inf (methods/deq/adjoint.py).
        g, stats = solve_adjoint(vjp, grad, adj.solver, adj.max_iter, adj.tol, stop_mode=adj.stop_mode, jvp=jvp,
                                 diverge_above=adj.diverge_above, **adj.solver_kw)
        built.clear()  # the double-backward graph goes before the main backward continues
        adj.owner.last_backward_stats = stats
        for hook in adj.owner.backward_stats_hooks:
            hook(stats)
        return g, None


class DEQ(nn.Module):
    """z* = func(z*, x) as a layer: `z = layer(x, z0=None)`; `layer.last_stats` after each call.

    func: nn.Module, func(z, x) -> z of z's shape (batch first); its parameters are the DEQ weights.
    Settings (keyword arguments here, or `configure(**kw)` later):
      solver="anderson"    forward solver: anderson, broyden, fixed_point
      max_iter=20          forward steps at most; more: smaller residual, more time (not memory)
      tol=1e-3             stop when every example's residual is below it
      stop_mode="abs"      the forward residual: "abs" ||f(z) - z|| per example (FeDEQ's reference
                           and torchdeq's default), "rel" ||f(z) - z|| / ||f(z)||, "batch" the
                           whole batch's ||f(Z) - Z||_F / sqrt(numel Z), broyden only (the reference's
                           sequence DEQ; also its Broyden adjoint's rule: module docstring)
      solver_kw={}         forward solver options (anderson: m, lam, beta; broyden: memory)
      backward="implicit"  implicit, jfb, phantom (module docstring)
      b_solver="normal_cg" solver of the implicit backward's adjoint g = J^T g + dL/dz: normal_cg
                           (the default), gmres (one
                           Krylov solve over the batch, one stored vector per product), bicgstab
                           (one system over the batch, constant memory), normal_cg (the reference's
                           CG on the normal equations, per example; one VJP and one JVP per step,
                           the JVP by double backward), or anderson, broyden, fixed_point on the
                           fixed point (methods/deq/adjoint.py, which gives the measurements and the
                           rule the default follows)
      b_max_iter=50        its products at most: gmres, bicgstab VJPs; normal_cg steps (VJP + JVP);
                           the fixed-point solvers' steps
      b_tol=1e-3           its tolerance: gmres, bicgstab ||J^T g + dL/dz - g|| / ||dL/dz|| over the
                           batch (gmres: gradient cosine >= 0.9999 to the exact one on deq_resnet_s;
                           1e-2 takes ~0.6x the products, cosine down to 0.993 on 8 images);
                           normal_cg, per example, the normal residual over ||(I - J) dL/dz||;
                           the fixed-point solvers, their per-example relative residual
      b_solver_kw={}       its options (gmres, bicgstab, normal_cg: none)
      phantom_steps=5      phantom: unrolled steps; more: closer to the implicit gradient, memory
                           grows linearly (phantom_steps applications of func are kept)
      phantom_tau=0.5      phantom: damping in (0, 1]; smaller: smoother but shorter reach
      diverge_above=1e3    raise DEQDivergence when the lowest residual exceeds it
      second_solve=False   where z* is returned without a graph (eval, no_grad, nothing to
                           differentiate), return a second solve from f(z*) (module docstring)
    """

    # The settings, set from DEFAULTS in __init__ (declared here so that they are typed: nn.Module's
    # __getattr__ would make every one of them a Tensor | Module).
    solver: str
    max_iter: int
    tol: float
    stop_mode: str
    solver_kw: dict[str, Any]
    backward: str
    b_solver: str
    b_max_iter: int
    b_tol: float
    b_solver_kw: dict[str, Any]
    phantom_steps: int
    phantom_tau: float
    diverge_above: float
    second_solve: bool

    def __init__(self, func: nn.Module, **settings: Any):
        super().__init__()
        self.func = func
        self.last_stats: dict[str, Tensor] | None = None  # forward solve of the latest call
        self.last_backward_stats: dict[str, Tensor] | None = None  # adjoint solve of the latest backward
        # fn(stats) called after every adjoint solve (FeDEQ collects a round's backward statistics).
        self.backward_stats_hooks: list[Callable[[dict[str, Tensor]], Any]] = []
        for key, value in DEFAULTS.items():
            setattr(self, key, value.copy() if isinstance(value, dict) else value)
        self.configure(**settings)

    def configure(self, **kw: Any) -> DEQ:
        """Change settings; all are validated before any is applied. Returns self."""
        new = {key: _validate(key, v) for key, v in kw.items()}
        merged = {**self.settings(), **new}
        _check_kw(merged["solver"], SOLVERS.get(merged["solver"]), merged["solver_kw"])
        if merged["stop_mode"] == "batch" and merged["solver"] != "broyden":
            raise BenchError(f"DEQ stop_mode 'batch' (the FeDEQ reference's Broyden rule) needs solver 'broyden', "
                             f"got {merged['solver']!r}")
        check_options(merged["b_solver"], merged["b_solver_kw"])
        for key, v in new.items():
            setattr(self, key, v)
        return self

    def settings(self) -> dict[str, Any]:
        """The current settings (a copy)."""
        return {key: (dict(getattr(self, key)) if isinstance(DEFAULTS[key], dict) else getattr(self, key))
                for key in DEFAULTS}

    def forward(self, x: Tensor, z0: Tensor | None = None) -> Tensor:
        z0 = torch.zeros_like(x) if z0 is None else z0
        z_star, self.last_stats = self._solve(x, z0)
        if not (self.training and torch.is_grad_enabled()):
            return self._second_solve(x, z_star)
        if not (x.requires_grad or any(p.requires_grad for p in self.func.parameters())):
            # Nothing below needs a gradient (e.g. FeDEQ's head-only step with the body frozen):
            # skip the backward's extra application of func and its adjoint solve.
            return self._second_solve(x, z_star)
        if self.backward == "jfb":
            return self.func(z_star.detach(), x)
        if self.backward == "phantom":
            z, tau = z_star.detach(), self.phantom_tau
            for _ in range(self.phantom_steps):
                z = (1.0 - tau) * z + tau * self.func(z, x)
            return z
        # implicit: one application with autograd gives d func/d theta and d func/d x; the
        # Function swaps the incoming gradient for the adjoint fixed point.
        z_star = z_star.detach().requires_grad_()  # a leaf, so J^T g = grad(z, z_star, g)
        z = self.func(z_star, x)
        adj = _Adjoint()
        adj.z, adj.z_star, adj.owner = z, z_star, self
        adj.solver, adj.max_iter, adj.tol = self.b_solver, self.b_max_iter, self.b_tol
        adj.stop_mode = "batch" if self.stop_mode == "batch" and self.b_solver == "broyden" else "rel"
        adj.solver_kw, adj.diverge_above = dict(self.b_solver_kw), self.diverge_above
        return _ImplicitBackward.apply(z, adj)

    def _solve(self, x: Tensor, z0: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return solve(lambda z: self.func(z, x), z0, self.solver, self.max_iter, self.tol, stop_mode=self.stop_mode,
                     diverge_above=self.diverge_above, **self.solver_kw)

    def _second_solve(self, x: Tensor, z_star: Tensor) -> Tensor:
        """z* as it is, or with `second_solve` the solve from f(z*) (module docstring), its stats merged."""
        if not self.second_solve:
            return z_star
        with torch.no_grad():
            z1 = self.func(z_star, x)
        z2, second = self._solve(x, z1)
        first = self.last_stats
        assert first is not None  # set by forward's first solve
        self.last_stats = {**second, "nstep": first["nstep"] + second["nstep"],
                           "residual_first": first["residual_first"]}
        return z2

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
