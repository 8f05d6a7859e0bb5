"""Adjoint solvers of the implicit backward: g = J^T g + v, i.e. (I - J^T) g = v, chosen by name.

    g, stats = solve_adjoint(vjp, v, solver="gmres", max_iter=50, tol=1e-3)

vjp(u) = J^T u with J = d func / dz at z* (one torch.autograd.grad through the graph of one
application of func), v = dL/dz*, both batch first. The DEQ layer's implicit backward
(methods/deq/layer.py) calls it; dL/dtheta = g^T d func(z*, x) / dtheta.

Residual (scale-invariant, what `tol` bounds), over the whole batch:

    residual = ||v + J^T g - g|| / ||v||          (norms over every example's flattened g at once)

The adjoint is solved as ONE linear system over the batch: it splits into per-example systems only
when func treats examples independently (GroupNorm, LayerNorm, convolutions do; a BatchNorm inside
func would not), and one system is correct either way. So the statistics are the system's: the
same values repeated for each example, keeping the (batch,) shape and the keys of the forward's
(methods/deq/solvers.py STATS_KEYS: nstep, residual, residual_first, converged). From g0 = 0 the
first residual is 1 by definition.

Solvers:
  * "gmres" (default): GMRES (Saad & Schultz, "GMRES: A generalized minimal residual algorithm for
    solving nonsymmetric linear systems", SIAM J. Sci. Stat. Comput. 1986) from g0 = 0, without
    restarts: after k vector-Jacobian products it returns the g of the Krylov space
    span{v, J^T v, ..., (J^T)^(k-1) v} with the smallest residual, so its residual never rises and
    it cannot diverge on a finite J. Arnoldi by classical Gram-Schmidt (one matrix product per pass
    over the stored basis instead of a Python loop per vector), repeated once where it cancelled
    much (DGKS), which keeps the basis orthogonal to float32 rounding; the (k+1) x k Hessenberg
    least squares in float64.
    Stops when the residual is <= tol or after max_iter products; memory: one vector of the
    batch's z size per product made, up to twice that while the basis grows by doubling (at most
    max_iter + 1), against Anderson's 2 m = 10. Written here rather than taken from a library:
    scipy's gmres works on one float64 numpy vector on the host and torch has none.
  * "anderson", "broyden", "fixed_point": the fixed-point solvers of methods/deq/solvers.py on
    g -> J^T g + v from g0 = 0, per example, with their own relative residual
    ||J^T g + v - g|| / ||J^T g + v|| and options (the harness's implicit backward before GMRES:
    "anderson", absolute ridge lam = 1e-4, 20 steps; locuslab/deq and torchdeq do the same).

Why GMRES, and why tol 1e-3 (measured on 32 Fashion-MNIST test images through deq_resnet_s,
float32, at the z* of the default forward solve, against the exact adjoint there from scipy in
float64; at initialization / after 20 SGD steps of lr 0.01, batch 10):
  * Anderson, 20 steps (the old default): residual 5e-2, gradient cosine 0.967 / 0.872;
  * fixed-point iteration: 20 products 0.996, 80 products 1.0000 (Anderson 80: 0.999);
  * GMRES, tol 1e-2: 13 / 17-19 products, cosine 0.9995 / 0.9992; tol 1e-3: 22 / 25-34 products,
    cosine 1.0000 / 0.9999. Backward of batch 32 on 2 shared CPU cores: Anderson-20 0.31-0.34 s,
    GMRES 1e-2 0.24-0.38 s, 1e-3 0.37-0.73 s. 1e-2 is cheaper but thin on small batches (cosine
    0.993 on 8 images after training, tests/unit/test_deq_adjoint.py), so the default is 1e-3
    (the reference's tolerance, on a different residual); b_tol=1e-2 is the budget option.
  * products to a relative residual of 1e-2 / 1e-3 (initialization, batch 32): GMRES 13 / 22,
    BiCGStab (scipy) 14 / 26, Anderson with lam = 1e-12 15 / 30 (m = 10: 15 / 25), Anderson with
    the default absolute ridge 1e-4 ~100 / ~200, fixed-point ~50 / ~100. GMRES is fewest by
    construction (least residual over the same Krylov space); a small-ridge Anderson comes close.
The FeDEQ reference (longtanle/FeDEQ, jaxopt's implicit diff) runs CG on the normal equations
(tol 1e-3, 50 steps), which needs a Jacobian-vector product as well as a VJP per step and
converges with the squared condition number. On a block that training made expansive (spectral
radius of J above 1) GMRES still converges but needs ~150 products; the fixed-point solvers diverge;
deq/b_unconverged_frac shows it.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from fedeq_bench.core.registry import Registry
from fedeq_bench.methods.deq.solvers import DIVERGE_ABOVE, SOLVERS, DEQDivergence, _check_kw, solve

AdjointSolver = Callable[..., tuple[Tensor, dict[str, Tensor]]]
ADJOINT_SOLVERS: Registry[AdjointSolver] = Registry("solver")
VJP = Callable[[Tensor], Tensor]


def _stats(batch: int, nstep: int, res: float, tol: float, like: Tensor) -> dict[str, Tensor]:
    """The system's statistics, repeated per example (module docstring), on like's device."""
    r = torch.full((batch,), res, dtype=like.dtype, device=like.device)
    return {
        "nstep": torch.full((batch,), nstep, dtype=torch.int64, device=like.device),
        "residual": r,
        "residual_first": torch.ones(batch, dtype=like.dtype, device=like.device),
        "converged": r <= tol,
    }


@ADJOINT_SOLVERS.register("gmres")
def gmres(vjp: VJP, v: Tensor, max_iter: int = 50, tol: float = 1e-3) -> tuple[Tensor, dict[str, Tensor]]:
    """GMRES on (I - J^T) g = v from g0 = 0, one system over the batch; no options."""
    shape, batch = v.shape, v.shape[0]
    b = v.reshape(-1)
    beta = float(b.norm())
    if not torch.isfinite(b).all():
        raise DEQDivergence("backward (adjoint) gmres: dL/dz is not finite")
    if beta == 0.0:  # nothing flows back: g = 0 exactly
        return torch.zeros_like(v), _stats(batch, 0, 0.0, tol, v)
    # The Krylov basis grows by doubling, so a solve that stops early holds only what it used.
    basis = torch.empty(min(max_iter + 1, 16), b.numel(), dtype=b.dtype, device=b.device)
    basis[0] = b / beta
    H = torch.zeros(max_iter + 1, max_iter, dtype=torch.float64)  # small: on the host, in float64
    k, res = 0, 1.0
    while k < max_iter and res > tol:
        u = basis[k]
        w = u - vjp(u.view(shape)).reshape(-1)  # (I - J^T) u
        if not torch.isfinite(w).all():
            raise DEQDivergence(f"backward (adjoint) gmres solver diverged: non-finite J^T u at product {k + 1}")
        V = basis[: k + 1]
        norm_in = w.norm()
        h = V @ w
        w = w - V.T @ h
        # A second pass only when the first cancelled much of w (the DGKS test, "twice is enough":
        # ||w|| < 0.7 ||w_in||), where classical Gram-Schmidt loses orthogonality; otherwise one.
        if bool(w.norm() < 0.7 * norm_in):
            h2 = V @ w
            w = w - V.T @ h2
            h = h + h2
        h = h.double().cpu()
        H[: k + 1, k] = h
        hn = float(w.norm())
        H[k + 1, k] = hn
        k += 1
        # Residual of the k-step least squares min ||beta e1 - H y|| (exact in exact arithmetic).
        rhs = torch.zeros(k + 1, dtype=torch.float64)
        rhs[0] = beta
        y = torch.linalg.lstsq(H[: k + 1, :k], rhs[:, None], driver="gelsd").solution
        res = float((rhs - H[: k + 1, :k] @ y[:, 0]).norm()) / beta
        if hn <= 1e-12 * float(norm_in):  # happy breakdown: the Krylov space holds the exact solution
            break
        if k == basis.shape[0]:
            grown = torch.empty(min(max_iter + 1, 2 * k), b.numel(), dtype=b.dtype, device=b.device)
            grown[:k] = basis
            basis = grown
        basis[k] = w / hn
    if k == 0:  # tol >= 1: g = 0 already meets it
        return torch.zeros_like(v), _stats(batch, 0, 1.0, tol, v)
    g = (basis[:k].T @ y[:, 0].to(device=b.device, dtype=b.dtype)).view(shape)
    return g, _stats(batch, k, res, tol, v)


def _fixed_point_form(name: str) -> AdjointSolver:
    fn = SOLVERS.get(name)

    def adjoint(vjp: VJP, v: Tensor, max_iter: int = 20, tol: float = 1e-3, *, stop_mode: str = "rel",
                diverge_above: float = DIVERGE_ABOVE, **kw) -> tuple[Tensor, dict[str, Tensor]]:
        try:
            return solve(lambda g: vjp(g) + v, torch.zeros_like(v), name, max_iter, tol, stop_mode=stop_mode,
                         diverge_above=diverge_above, **kw)
        except DEQDivergence as e:
            raise DEQDivergence(f"backward (adjoint) {e}") from None

    # Its options are the fixed-point solver's (checked by name in check_options).
    adjoint.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
    adjoint.__doc__ = f"{name} on g -> J^T g + v from g0 = 0 (methods/deq/solvers.py)."
    return adjoint


for _name in ("anderson", "broyden", "fixed_point"):
    ADJOINT_SOLVERS.register(_name)(_fixed_point_form(_name))


def check_options(name: str, options: dict) -> None:
    """Reject options the named adjoint solver does not take (gmres takes none), as `solve` does."""
    _check_kw(name, ADJOINT_SOLVERS.get(name), options)


def solve_adjoint(vjp: VJP, v: Tensor, solver: str = "gmres", max_iter: int = 50, tol: float = 1e-3, *,
                  stop_mode: str = "rel", diverge_above: float = DIVERGE_ABOVE,
                  **options) -> tuple[Tensor, dict[str, Tensor]]:
    """g with g = J^T g + v (vjp(u) = J^T u); returns (g, stats) (module docstring). `stop_mode`: the
    fixed-point solvers' residual ("rel", or "batch" for broyden: the DEQ layer's stop_mode="batch").

    Runs under torch.no_grad (the products themselves call torch.autograd.grad on a graph built
    earlier, which no_grad does not stop)."""
    fn = ADJOINT_SOLVERS.get(solver)
    check_options(solver, options)
    with torch.no_grad():
        if solver == "gmres":
            return fn(vjp, v.detach(), max_iter, tol)
        return fn(vjp, v.detach(), max_iter, tol, stop_mode=stop_mode, diverge_above=diverge_above, **options)
