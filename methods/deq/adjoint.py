"""Adjoint solvers of the implicit backward: g = J^T g + v, i.e. (I - J^T) g = v, chosen by name.

    g, stats = solve_adjoint(vjp, v, solver="normal_cg", max_iter=50, tol=1e-3, jvp=jvp)

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
  * "gmres": GMRES (Saad & Schultz, "GMRES: A generalized minimal residual algorithm for
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
  * "normal_cg": the reference's solve (longtanle/FeDEQ `deq/solver/linear_solve.py`
    `solve_normal_cg`, called from `deq/solver/implicit_diff.py` `root_vjp` with the tol 1e-3 and
    maxiter 50 of `utils/model_utils.py` line 59): conjugate gradient (jax.scipy.sparse.linalg.cg)
    on the normal equations of K g = v, K = I - J^T,
        K^T K g = K^T v,   i.e.  (I - J)(I - J^T) g = (I - J) v,
    from g0 = 0, one VJP (K p) and one JVP (K^T (K p)) per step, plus one JVP for the right-hand
    side K^T v. jax's rule: stop once ||r||^2 <= tol^2 ||K^T v||^2, r the normal residual
    K^T v - K^T K g, or after max_iter steps. Per example, as the reference runs it under vmap:
    every example has its own step sizes and stops on its own (its iterate is then kept, as
    jax's while_loop under vmap does); the products still run over the whole batch. So its
    statistics are per example, its residual is the normal one ||r|| / ||K^T v|| that tol bounds,
    and nstep counts its steps (each one VJP and one JVP). jax also evaluates K^T K g0 = 0 once
    before the loop; we skip that product (the same iterates). Correct only for a func that treats
    examples independently (every DEQ block here); the products need jvp(w) = J w, which the layer
    gives by the double-backward trick (methods/deq/layer.py). Memory: a few batch-sized vectors,
    whatever max_iter, plus the double-backward graph of one application of func. It converges
    with the squared condition number of K, so max_iter 50 often stops it short of tol.
  * "bicgstab": BiCGStab (van der Vorst, "Bi-CGSTAB: A fast and smoothly converging variant of Bi-CG
    for the solution of nonsymmetric linear systems", SIAM J. Sci. Stat. Comput. 1992) on K g = v
    from g0 = 0, shadow residual r^_0 = v, two VJPs per step, no options. One system over the batch,
    like gmres, and for the same reason: it is correct for any func, and its residual is gmres'
    ||v + J^T g - g|| / ||v|| (per-example systems would let examples stop on their own but
    would be wrong where func couples them). Stops when the recurrence's residual is <= tol (after
    the half step where that already holds) or after max_iter products; returns the last iterate.
    Memory: 7 batch-sized vectors, whatever max_iter. Its residual is not monotone (BiCGStab is
    not a minimal-residual method) and it can break down (a zero inner product): it then returns
    the iterate it has, reported unconverged if above tol.
  * "anderson", "broyden", "fixed_point": the fixed-point solvers of methods/deq/solvers.py on
    g -> J^T g + v from g0 = 0, per example, with their own relative residual
    ||J^T g + v - g|| / ||J^T g + v|| and options (the harness's implicit backward before GMRES:
    "anderson", absolute ridge lam = 1e-4, 20 steps; locuslab/deq and torchdeq do the same).

The default is "normal_cg" (methods/deq/layer.py, FeDEQConfig), by the rule `python -m bench.perf
--adjoint` applies (bench/perf/adjoint.py pick_default; docs/performance.md, Adjoint solvers, has the
table): only solvers that cannot diverge are candidates (gmres and normal_cg: both minimize the true
residual over their Krylov spaces, so it never rises); the rows where some solver reaches gradient
cosine 0.99 to an exact float64 solve decide; among the candidates at >= 0.99 in every deciding row,
the least peak memory, ties by time. Measured on real Fashion-MNIST images (deq_mlp batch 32,
deq_resnet_s and deq_resnet_s_ref batch 10, at initialization and after 3 SGD steps): on deq_mlp
every solver reaches 1.0000 at 1.1 MB; on deq_resnet_s normal_cg 0.9996 / 0.9999 at 33.4 MB, gmres
1.0000 at 47.5 / 31.4 MB (bicgstab 25.4 MB and fixed_point 24.9 MB are lighter but can diverge); on
deq_resnet_s_ref no solver reaches 0.99 in 50 products (cosines 0.20-0.64), so those rows do not
decide. normal_cg: 69.0 MB over the deciding rows, gmres 81.1 MB.

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
On a block that training made expansive (spectral
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
JVP = Callable[[Tensor], Tensor]
# Solvers that take no options and no diverge_above (they cannot run away on a finite J).
KRYLOV = ("gmres", "bicgstab", "normal_cg")


def _stats(batch: int, nstep: int, res: float, tol: float, like: Tensor) -> dict[str, Tensor]:
    """The system's statistics, repeated per example (module docstring), on like's device."""
    r = torch.full((batch,), res, dtype=like.dtype, device=like.device)
    return {
        "nstep": torch.full((batch,), nstep, dtype=torch.int64, device=like.device),
        "residual": r,
        "residual_first": torch.ones(batch, dtype=like.dtype, device=like.device),
        "converged": r <= tol,
    }


def _rhs(name: str, v: Tensor) -> tuple[Tensor, float]:
    """v flattened into one system's right-hand side, and its norm; DEQDivergence if not finite."""
    b = v.reshape(-1)
    if not torch.isfinite(b).all():
        raise DEQDivergence(f"backward (adjoint) {name}: dL/dz is not finite")
    return b, float(b.norm())


@ADJOINT_SOLVERS.register("gmres")
def gmres(vjp: VJP, v: Tensor, max_iter: int = 50, tol: float = 1e-3) -> tuple[Tensor, dict[str, Tensor]]:
    """GMRES on (I - J^T) g = v from g0 = 0, one system over the batch; no options."""
    shape, batch = v.shape, v.shape[0]
    b, beta = _rhs("gmres", v)
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


def _per_example(a: Tensor, b: Tensor) -> Tensor:
    """<a_i, b_i> for every example i of the batch: shape (batch,)."""
    return (a * b).flatten(1).sum(1)


@ADJOINT_SOLVERS.register("normal_cg")
def normal_cg(vjp: VJP, v: Tensor, max_iter: int = 50, tol: float = 1e-3,
              jvp: JVP | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """CG on the normal equations (I - J)(I - J^T) g = (I - J) v, per example, as the reference
    (module docstring); no options. jvp(w) = J w is required (the layer passes it)."""
    if jvp is None:
        raise TypeError("normal_cg needs jvp(w) = J w beside vjp(u) = J^T u")
    batch = v.shape[0]
    if not torch.isfinite(v).all():
        raise DEQDivergence("backward (adjoint) normal_cg: dL/dz is not finite")

    def col(s: Tensor) -> Tensor:  # (batch,) -> broadcastable against v
        return s.view(-1, *([1] * (v.dim() - 1)))

    b = v - jvp(v)  # the normal right-hand side (I - J) v: one JVP
    if not torch.isfinite(b).all():
        raise DEQDivergence("backward (adjoint) normal_cg solver diverged: non-finite J v")
    bs = _per_example(b, b)
    atol2 = tol**2 * bs  # jax's cg: stop once ||r||^2 <= max(tol^2 ||b||^2, atol^2), atol = 0
    x, r, p, gamma = torch.zeros_like(v), b, b, bs  # x0 = 0: r0 = b - A x0 = b (A x0 = 0 not evaluated)
    k = torch.zeros(batch, dtype=torch.int64, device=v.device)
    broke = torch.zeros(batch, dtype=torch.bool, device=v.device)
    active = (gamma > atol2) & (k < max_iter)
    while bool(active.any()):
        q = p - vjp(p)  # (I - J^T) p: one VJP
        Ap = q - jvp(q)  # (I - J) q: one JVP
        if not torch.isfinite(Ap).all():
            raise DEQDivergence("backward (adjoint) normal_cg solver diverged: "
                                f"non-finite product at step {int(k.max()) + 1}")
        pAp = _per_example(p, Ap)
        # p^T A p of 0 (underflowed, with a tol below float32's precision) is CG's breakdown: the
        # example stops where it is, as converged as float32 allows, instead of dividing by 0.
        broke = broke | (active & ~(pAp > 0))
        active = active & ~broke
        alpha = gamma / torch.where(active, pAp, 1.0)
        x_new = x + col(alpha) * p
        r_new = r - col(alpha) * Ap
        gamma_new = _per_example(r_new, r_new)
        p_new = r_new + col(gamma_new / gamma) * p
        # An example that has stopped keeps its iterate (jax's while_loop under vmap selects).
        m = col(active)
        x, r, p = torch.where(m, x_new, x), torch.where(m, r_new, r), torch.where(m, p_new, p)
        gamma = torch.where(active, gamma_new, gamma)
        k = k + active
        active = (gamma > atol2) & (k < max_iter) & ~broke
    res = torch.where(bs > 0, (gamma / torch.where(bs > 0, bs, 1.0)).sqrt(), 0.0)
    return x, {"nstep": k, "residual": res, "residual_first": torch.ones_like(res), "converged": res <= tol}


@ADJOINT_SOLVERS.register("bicgstab")
def bicgstab(vjp: VJP, v: Tensor, max_iter: int = 50, tol: float = 1e-3) -> tuple[Tensor, dict[str, Tensor]]:
    """BiCGStab on (I - J^T) g = v from g0 = 0, one system over the batch; no options."""
    shape, batch = v.shape, v.shape[0]
    b, beta0 = _rhs("bicgstab", v)
    if beta0 == 0.0:
        return torch.zeros_like(v), _stats(batch, 0, 0.0, tol, v)
    k = 0

    def K(u: Tensor) -> Tensor:  # (I - J^T) u, counted
        nonlocal k
        k += 1
        w = u - vjp(u.view(shape)).reshape(-1)
        if not torch.isfinite(w).all():
            raise DEQDivergence(f"backward (adjoint) bicgstab solver diverged: non-finite J^T u at product {k}")
        return w

    x, r = torch.zeros_like(b), b.clone()
    r_hat = b  # the shadow residual r^_0 = r_0 (never written)
    p, q = torch.zeros_like(b), torch.zeros_like(b)  # q: van der Vorst's v_i = A p_i
    rho = alpha = omega = 1.0
    res = 1.0
    while k < max_iter and res > tol:
        rho_new = float(r_hat @ r)
        if rho_new == 0.0:  # breakdown: r orthogonal to the shadow residual
            break
        p = r + (rho_new / rho) * (alpha / omega) * (p - omega * q)
        q = K(p)
        denom = float(r_hat @ q)
        if denom == 0.0:
            break
        alpha = rho_new / denom
        x = x + alpha * p
        r = r - alpha * q  # s
        res = float(r.norm()) / beta0
        if res <= tol or k >= max_iter:
            break
        t = K(r)
        tt = float(t @ t)
        if tt == 0.0:  # (I - J^T) s = 0 with s != 0: singular; x stays at the half step
            break
        omega = float(t @ r) / tt
        x = x + omega * r
        r = r - omega * t
        res = float(r.norm()) / beta0
        rho = rho_new
        if omega == 0.0:  # stagnation: the next step would divide by it
            break
    return x.view(shape), _stats(batch, k, res, tol, v)


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
    """Reject options the named adjoint solver does not take (gmres, bicgstab, normal_cg take none), as
    `solve` does."""
    _check_kw(name, ADJOINT_SOLVERS.get(name), options)


def solve_adjoint(vjp: VJP, v: Tensor, solver: str = "gmres", max_iter: int = 50, tol: float = 1e-3, *,
                  stop_mode: str = "rel", jvp: JVP | None = None, diverge_above: float = DIVERGE_ABOVE,
                  **options) -> tuple[Tensor, dict[str, Tensor]]:
    """g with g = J^T g + v (vjp(u) = J^T u); returns (g, stats) (module docstring). `stop_mode`: the
    fixed-point solvers' residual ("rel", or "batch" for broyden: the DEQ layer's stop_mode="batch").
    jvp(w) = J w is called by normal_cg only.

    Runs under torch.no_grad (the products themselves call torch.autograd.grad on a graph built
    earlier, which no_grad does not stop)."""
    fn = ADJOINT_SOLVERS.get(solver)
    check_options(solver, options)
    with torch.no_grad():
        if solver == "normal_cg":
            return fn(vjp, v.detach(), max_iter, tol, jvp)
        if solver in KRYLOV:
            return fn(vjp, v.detach(), max_iter, tol)
        return fn(vjp, v.detach(), max_iter, tol, stop_mode=stop_mode, diverge_above=diverge_above, **options)
