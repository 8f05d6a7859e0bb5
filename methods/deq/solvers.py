"""Fixed-point solvers for deep equilibrium models, one signature, chosen by name.

    z, stats = solve(f, z0, solver="anderson", max_iter=20, tol=1e-3, stop_mode="rel", **solver_kw)

finds z* = f(z*) for a batch: f maps a tensor of z0's shape (batch first, any trailing shape:
(B, d), (B, C, H, W), (B, T, d)) to the same shape, and every example is its own problem (the
solvers flatten each example to a vector; mixing coefficients, Jacobian estimates and residuals
are per example).

Residual, per example b, with z_b flattened (torchdeq's two conventions, `stop_mode`):

    "abs":  residual_b = ||f(z)_b - z_b||                          (FeDEQ's reference code)
    "rel":  residual_b = ||f(z)_b - z_b|| / (||f(z)_b|| + 1e-9)    (solve()'s default)

    "batch": one residual for the whole batch, ||f(Z) - Z||_F / sqrt(numel(Z)) (the root mean
             square over every entry), solver "broyden" only (see _broyden_batch): FeDEQ's
             reference sequence DEQ stops when ||f(Z) - Z||_F < 1e-6 sqrt(numel(Z))
             (deq/solver/rootfind.py:40, broyden_2.py:113-165), which is this residual with
             tol = 1e-6, whatever the batch size; every example's stats carry the batch's values.

"rel" means the same for a 16-unit MLP state and a 64x8x8 conv state; "abs" is what the FeDEQ
reference stops on (deq/solver/anderson.py, base.py there: `error = sqrt(<g, g>)`, loop while
error > tol), two orders of magnitude tighter on DEQ-ResNet feature maps (||f(z)|| ~ 100-180).
The DEQ layer (layer.py) defaults to "abs"; solve() keeps "rel" as its default for its other
callers. Every residual in the stats, the divergence bound and the messages is in the run's mode,
and DEQDivergence's message names it ("lowest abs residual ...").
torchdeq's solvers (and "anderson" with variant="torchdeq") stop when every example's latest
residual is below `tol`, or after `max_iter` steps, and return per example the iterate with the
LOWEST residual seen (not the last one): Broyden and Anderson can overshoot late.
"anderson" with variant="reference" is FeDEQ's (see _anderson_reference): each example stops on
its own at residual <= tol, and the last iterate is returned.

Solvers (references):
  * "anderson": Anderson acceleration (D. G. Anderson, "Iterative procedures for nonlinear integral
    equations", J. ACM 1965) in the form of the DEQ papers (Bai, Kolter, Koltun, "Deep Equilibrium
    Models", NeurIPS 2019, github.com/locuslab/deq; torchdeq): history m = 5, ridge lam = 1e-4,
    mixing beta = 1.0. With G_i = f(x_i) - x_i over the last n = min(k, m) iterates,
        alpha = argmin ||sum_i alpha_i G_i||^2 + lam ||alpha||^2  s.t.  sum_i alpha_i = 1
        x_{k+1} = beta * sum_i alpha_i f(x_i) + (1 - beta) * sum_i alpha_i x_i
    Its first two steps are plain fixed-point steps (x1 = f(x0), then f(x1)). The ridge is
    absolute, as in locuslab/deq: once ||G||^2 << lam (small states, tight tol) the mix tends to a
    plain average of the last m images and the acceleration stops; on a 4-dim linear contraction
    (eigenvalues up to 0.99, tol 1e-8) it then needs more steps than fixed-point iteration, while
    lam=1e-12 converges in 7 (tests: test_anderson_default_ridge_is_absolute). Pass lam if needed.
  * "broyden": limited-memory ("good") Broyden's method (C. G. Broyden, "A class of methods for
    solving nonlinear simultaneous equations", Math. Comp. 1965) on g(z) = f(z) - z, as in the DEQ
    papers: the inverse Jacobian is -I + U V^T, one rank-one term per step (memory `memory`,
    default max_iter), step z <- z - (-I + U V^T) g(z), no line search.
  * "fixed_point": z <- f(z) (Picard iteration).

Library: the three iterations are torchdeq 0.1.0's (`torchdeq.solver.anderson_solver`,
`broyden_solver`, `fixed_point_iter`; Geng & Kolter, "TorchDEQ: A Library for Deep Equilibrium
Models", arXiv 2310.18605), wrapped behind this signature. Evidence it works here (torch 2.13 CPU,
float32 and float64, under torch.no_grad; from a probe script whose checks, with tolerances,
are tests/unit/test_deq_solvers.py):
  * cos: all three reach the Dottie number 0.7390851332151607 to < 3e-7 (tol 1e-6); a contraction
    W z + b (||W||_2 = 0.5, d = 16, float64, tol 1e-10) to < 2e-10 of torch.linalg.solve's answer;
    (B, C, H, W) states work.
  * per example: a batch of two different tanh problems, tol = 0 and 12 steps, equals solving each
    example alone to 1e-16 for all three solvers.
What this module adds, each because torchdeq 0.1.0 falls short there (shown in the tests):
  * Anderson as the FeDEQ reference runs it (variant="reference"): m = 5 plain steps before
    mixing (torchdeq: 2), each example stopping on its own (its vmap'd while_loop; torchdeq: the
    batch stops together) and the last iterate (torchdeq: the lowest-residual one). Our own code,
    batched over examples with per-example masks, no per-example Python and no host sync inside a
    step (the linear solve is solve_ex, the stats are tensors; only the early-exit test syncs, see
    _check_every); torchdeq has none of the three behaviours.
  * torchdeq's `nstep` is a float, its stats have other keys and carry -1 placeholders; we return
    the four fixed keys below.
  * torchdeq's Anderson records no residual for its first two evaluations, so with max_iter <= 2 it
    returns z0 with residual 1e8. Its first two steps ARE plain fixed-point steps, so for
    max_iter <= 2 "anderson" runs "fixed_point" (same iterates).
  * torchdeq silently ignores misspelled solver options (`**kwargs`) and never reports divergence:
    a NaN candidate even poisons the kept best iterate (its masked mixing computes 0 * nan). We
    reject unknown options and raise `DEQDivergence` on the first non-finite f(z) (see below).
  * the residual at z0 ("residual_first") is not recorded by torchdeq (its traces start with a
    1e8 placeholder); we take it from the first evaluation f(z0), which every solver makes first.

Returned iterate (torchdeq's and locuslab/deq's convention): for the step x_k with the lowest
residual, anderson and fixed_point return f(x_k), broyden returns x_k; for a contraction f(x_k) is
the closer of the two to z*.

Statistics, tensors of shape (batch,), fixed keys (STATS_KEYS):
  nstep           int64  the step at which the returned (lowest-residual) iterate was reached,
                         counted in evaluations of f (torchdeq's `nstep`); <= max_iter. An
                         example that converges early keeps iterating with the batch, so its
                         nstep is later if its residual kept falling.
  residual        float  that lowest residual
  residual_first  float  the residual at z0, ||f(z0) - z0|| / (||f(z0)|| + 1e-9)
  converged       bool   residual < tol
FeDEQ reduces them over a local update's solves into its deq/* metrics (methods/fedeq.py).

Divergence: `DEQDivergence` (a BenchError) is raised when f returns a non-finite value or a
residual is NaN/inf, or when some example's lowest residual exceeds `diverge_above` (default 1e3).
Note the relative residual of a run-away iteration stays O(1): for f(z) = 2z + 1 from z0 = 1,
z_k = 2^(k+1) - 1 and the residual is (z_k + 1) / (2 z_k + 1) -> 1/2, so such a run is reported
when it overflows (float32: f(z) = inf at the 127th evaluation), not before; an unconverged but
finite run is not an error, it shows up in deq/unconverged_frac. The bound catches iterates that
are nowhere near a fixed point at their own scale (||f(z) - z|| > 1000 ||f(z)|| at every step).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torchdeq.solver import anderson_solver, broyden_solver, fixed_point_iter
from torchdeq.solver.broyden import matvec as broyden_matvec
from torchdeq.solver.broyden import rmatvec as broyden_rmatvec

from fedeq_bench.core.errors import BenchError, Diverged
from fedeq_bench.core.registry import Registry

STATS_KEYS = ("nstep", "residual", "residual_first", "converged")
EPS = 1e-9  # the residual's denominator guard, torchdeq's value
DIVERGE_ABOVE = 1e3

Solver = Callable[..., tuple[Tensor, dict[str, Tensor]]]
SOLVERS: Registry[Solver] = Registry("solver")


class DEQDivergence(Diverged):
    """A fixed-point solve produced NaN/inf, or a residual above `diverge_above`."""


class _NonFinite(Exception):
    """Raised inside f's wrapper to abort a torchdeq solver at the first non-finite f(z)."""

    def __init__(self, residual: float, where: str):
        self.residual, self.where = residual, where


def residual(z: Tensor, fz: Tensor, stop_mode: str = "rel") -> Tensor:
    """Per example (batch first): ||fz - z|| ("abs") or ||fz - z|| / (||fz|| + 1e-9) ("rel")."""
    z, fz = z.reshape(z.shape[0], -1), fz.reshape(fz.shape[0], -1)
    diff = (fz - z).norm(dim=1)
    return diff if stop_mode == "abs" else diff / (fz.norm(dim=1) + EPS)


class _Watched:
    """f as torchdeq sees it: counts evaluations, keeps the residual at z0, stops on NaN/inf.

    Every solver's first evaluation is f(z0) (anderson: F0 = f(x0); broyden: g(x0); fixed point:
    f(x0)), so the first (input, output) pair gives the residual at z0 for free.
    """

    def __init__(self, f: Callable[[Tensor], Tensor], stop_mode: str):
        self.f, self.stop_mode = f, stop_mode
        self.calls = 0
        self.residual_first: Tensor | None = None

    def __call__(self, z: Tensor) -> Tensor:
        fz = self.f(z)
        self.calls += 1
        if self.residual_first is None:
            self.residual_first = residual(z, fz, self.stop_mode)
        # One reduction per step, so a blow-up stops at once instead of iterating on NaN (and
        # before torchdeq's masked mixing turns the kept best iterate into NaN too).
        if not torch.isfinite(fz).all():
            r = residual(z, fz)  # inf in f(z) makes it inf/inf = nan; report the first bad one
            bad = r[~torch.isfinite(r)]
            value = float(bad[0]) if bad.numel() else float(r.max())
            raise _NonFinite(value, f"(non-finite f(z)) at evaluation {self.calls}")
        return fz


def _torchdeq(fn, f: Callable[[Tensor], Tensor], z0: Tensor, max_iter: int, tol: float, stop_mode: str, **kw):
    """Run a torchdeq solver with the given stop rule and convert its info to our stats."""
    watched = _Watched(f, stop_mode)
    z, _, info = fn(watched, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, **kw)
    trace = info[f"{stop_mode}_trace"]
    if not torch.isfinite(trace).all():  # finite f(z), but a norm overflowed (float32 > ~1e19)
        bad = trace[~torch.isfinite(trace)]
        raise _NonFinite(float(bad[0]), f"(norm overflow) after {watched.calls} evaluations")
    res = info[f"{stop_mode}_lowest"].to(z0.dtype)
    assert watched.residual_first is not None  # every torchdeq solver evaluates f(z0) first (_Watched)
    stats = {
        "nstep": info["nstep"].round().long(),
        "residual": res,
        "residual_first": watched.residual_first.to(z0.dtype),
        "converged": res < tol,
    }
    return z, stats


@SOLVERS.register("anderson")
def anderson(f, z0: Tensor, max_iter: int = 20, tol: float = 1e-3, stop_mode: str = "rel", *, m: int = 5,
             lam: float = 1e-4, beta: float = 1.0, variant: str = "torchdeq"):
    """Anderson acceleration: m = history size (more: faster on smooth problems, more memory,
    (B, m, d) twice); lam = ridge on the mixing least squares (more: closer to averaging the
    last m images, steadier when the G_i are nearly collinear); beta = mixing (1 = use f(x_i));
    variant = "torchdeq" (2 plain steps, batch-wide stop, lowest-residual iterate) or "reference"
    (m plain steps, per-example stop, last iterate: FeDEQ's jaxopt-derived solver)."""
    if variant == "reference":
        return _anderson_reference(f, z0, max_iter, tol, stop_mode, m, lam, beta)
    if variant != "torchdeq":
        raise BenchError(f"unknown anderson variant {variant!r}; choose from reference, torchdeq")
    if max_iter <= 2:  # see module docstring: torchdeq records nothing before the 3rd evaluation
        return fixed_point(f, z0, max_iter, tol, stop_mode)
    return _torchdeq(anderson_solver, f, z0, max_iter, tol, stop_mode, m=m, lam=lam, tau=beta)


def _check_every(device: torch.device) -> int:
    """Steps between early-exit tests (each one syncs with the device: free on CPU)."""
    return 1 if device.type == "cpu" else 4


def _anderson_reference(f, z0: Tensor, max_iter: int, tol: float, stop_mode: str, m: int, lam: float,
                        beta: float):
    """FeDEQ's Anderson (deq/solver/anderson.py of longtanle/FeDEQ, from jaxopt), batched.

    The reference solves each example alone under jax.vmap; here the batch is one tensor and each
    example carries an `active` flag, which is what vmap of a while_loop computes: an example
    whose residual reached tol keeps its output, residual and step count from that step on, and
    its iterate is frozen, so its answer does not depend on the other examples of the batch.
    Per example, with x_0 = z0 and k = 0, 1, ...:
        k <  m:  x_k = f(x_{k-1})                 (plain steps; the history fills up)
        k >= m:  x_k = sum_i alpha_i x_i + beta sum_i alpha_i g_i,   g_i = f(x_i) - x_i
                 alpha = argmin ||sum alpha_i g_i||^2 + lam ||alpha||^2 s.t. sum alpha_i = 1
                 (the bordered system [[0, 1^T], [1, G G^T + lam I]] [nu; alpha] = [1; 0])
        stop when residual(x_k) = ||f(x_k) - x_k|| (abs; rel: / ||f(x_k)||) <= tol, or after
        max_iter evaluations; return f(x_k), the reference's `next_params`.
    No host sync inside the loop except the early-exit test (one bool per step on CPU, where it
    is free; every 4th step on an accelerator). Later steps never change a frozen example, so the
    test's frequency changes only the time, not the result (tested).
    """
    B, shape = z0.shape[0], z0.shape
    x = z0.reshape(B, -1)
    d, dev, dt = x.shape[1], x.device, x.dtype
    # History as images f(x_i) and residuals g_i (x_i = f(x_i) - g_i), ring buffers (slot k % m):
    # the mix sum_i alpha_i (x_i + beta g_i) = alpha^T F - (1 - beta) alpha^T G is one bmm (two if
    # beta != 1), with no (B, m, d) temporary.
    F = torch.zeros(B, m, d, dtype=dt, device=dev)
    G = torch.zeros(B, m, d, dtype=dt, device=dev)
    gram = torch.zeros(B, m, m, dtype=dt, device=dev)
    H = torch.zeros(B, m + 1, m + 1, dtype=dt, device=dev)
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    rhs = torch.zeros(B, m + 1, 1, dtype=dt, device=dev)
    rhs[:, 0] = 1
    ridge = lam * torch.eye(m, dtype=dt, device=dev)
    out = torch.zeros_like(x)
    res = torch.full((B,), float("inf"), dtype=dt, device=dev)
    res_first = torch.zeros(B, dtype=dt, device=dev)
    nstep = torch.zeros(B, dtype=torch.int64, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    bad = torch.zeros(B, dtype=torch.int64, device=dev)  # evaluation at which f(x) went non-finite
    check_every = _check_every(dev)
    for k in range(max_iter):
        if k >= m:
            torch.add(gram, ridge, out=H[:, 1:, 1:])
            alpha = torch.linalg.solve_ex(H, rhs)[0][:, 1:].transpose(1, 2)   # (B, 1, m); _ex: no sync
            mixed = torch.bmm(alpha, F)[:, 0]
            if beta != 1.0:
                mixed = mixed - (1.0 - beta) * torch.bmm(alpha, G)[:, 0]
            x = torch.where(active[:, None], mixed, x)               # frozen examples stay put
        fx = f(x.view(shape)).reshape(B, -1)
        pos = k % m
        g = torch.sub(fx, x, out=G[:, pos])
        F[:, pos] = fx
        r = g.norm(dim=1)
        if stop_mode == "rel":
            r = r / (fx.norm(dim=1) + EPS)
        # <g_i, g_k> for every slot i. Not bmm: torch's CPU bmm of (B, m, d) x (B, d, 1) takes
        # ~6x longer than this product-and-sum at d = 12544 (deq_resnet_s's state), measured.
        row = (G * g[:, None]).sum(2)
        gram[:, pos, :] = row
        gram[:, :, pos] = row
        finite = torch.isfinite(r)
        bad = torch.where(active & ~finite & (bad == 0), k + 1, bad)
        if k == 0:
            res_first = r
        torch.where(active[:, None], fx, out, out=out)
        res = torch.where(active, r, res)
        nstep = torch.where(active, k + 1, nstep)
        active = active & (r > tol) & finite
        x = torch.where(active[:, None], fx, x)                     # the next plain step's input
        if (k + 1) % check_every == 0 or k + 1 == max_iter:
            if bool((bad > 0).any()):
                i = int(torch.nonzero(bad)[0, 0])
                raise _NonFinite(float(res[i]), f"(non-finite f(z)) at evaluation {int(bad[i])}")
            if not bool(active.any()):
                break
    stats = {"nstep": nstep, "residual": res, "residual_first": res_first, "converged": res <= tol}
    return out.view(shape), stats


@SOLVERS.register("broyden")
def broyden(f, z0: Tensor, max_iter: int = 20, tol: float = 1e-3, stop_mode: str = "rel", *,
            memory: int | None = None):
    """Limited-memory Broyden: memory = rank-one updates kept (default max_iter: all of them);
    the inverse-Jacobian estimate takes 2 * B * d * memory numbers."""
    if stop_mode == "batch":
        return _broyden_batch(f, z0, max_iter, tol, memory)
    return _torchdeq(broyden_solver, f, z0, max_iter, tol, stop_mode, LBFGS_thres=memory, ls=False)


def _broyden_batch(f, z0: Tensor, max_iter: int, tol: float, memory: int | None):
    """Broyden as FeDEQ's reference runs its sequence DEQ (longtanle/FeDEQ deq/solver/broyden_2.py
    `broyden`, called from deq/solver/rootfind.py:40-46 with eps = 1e-6 sqrt(z.size)): torchdeq's
    iteration (per-example rank-one updates of the inverse Jacobian -I + U V^T, full steps, no line
    search; broyden_2.py:143-172), but
      * the batch stops together once the batch residual ||f(Z) - Z||_F / sqrt(numel(Z)) is below tol
        (broyden_2.py:113, 153, 165: `jnp.linalg.norm` of the whole batch against eps), after at
        least one step, or after max_iter steps;
      * it returns the whole batch's iterate of the lowest batch residual, z0 if no step lowered it
        (broyden_2.py:157-162, 181: `min_x`), where torchdeq picks per example;
      * NaN/inf in the update vectors become numbers (jnp.nan_to_num, broyden_2.py:73-74).
    Not reproduced: its protective breaks (a residual 1e5 * z.shape[-1] times the first, or no
    progress after more than 30 steps), which stop a run that `diverge_above` or max_iter stops here.
    """
    B, shape = z0.shape[0], z0.shape
    x = z0.reshape(B, -1)
    mem = max_iter if memory is None else memory
    root = math.sqrt(x.numel())

    def g(y: Tensor, k: int) -> tuple[Tensor, Tensor]:
        gy = f(y.view(shape)).reshape(B, -1) - y
        r = gy.norm() / root
        if not torch.isfinite(r):
            raise _NonFinite(float(r), f"(non-finite f(z) or norm) at evaluation {k}")
        return gy, r

    gx, res = g(x, 1)
    res_first = best_res = res
    best_x, best_step = x, 0
    Us = torch.zeros(B, x.shape[1], mem, dtype=x.dtype, device=x.device)
    VTs = torch.zeros(B, mem, x.shape[1], dtype=x.dtype, device=x.device)
    for k in range(1, max_iter + 1):
        dx = -broyden_matvec(Us, VTs, gx)
        x = x + dx
        gx_new, res = g(x, k + 1)
        dgx, gx = gx_new - gx, gx_new
        if res < best_res:
            best_x, best_res, best_step = x, res, k
        if res < tol:
            break
        vT = broyden_rmatvec(Us, VTs, dx)
        u = (dx - broyden_matvec(Us, VTs, dgx)) / torch.einsum("bd,bd->b", vT, dgx)[:, None]
        VTs[:, (k - 1) % mem] = torch.nan_to_num(vT)
        Us[:, :, (k - 1) % mem] = torch.nan_to_num(u)
    full = lambda v, dtype=x.dtype: torch.full((B,), v, dtype=dtype, device=x.device)  # noqa: E731
    stats = {"nstep": full(best_step, torch.int64), "residual": best_res.expand(B).clone(),
             "residual_first": res_first.expand(B).clone(), "converged": (best_res < tol).expand(B).clone()}
    return best_x.view(shape), stats


@SOLVERS.register("fixed_point")
def fixed_point(f, z0: Tensor, max_iter: int = 20, tol: float = 1e-3, stop_mode: str = "rel"):
    """z <- f(z): converges (linearly, at the rate of f's Lipschitz constant) when f contracts."""
    return _torchdeq(fixed_point_iter, f, z0, max_iter, tol, stop_mode, tau=1.0)


def _check_kw(name: str, fn: Solver, solver_kw: dict) -> None:
    params = inspect.signature(fn).parameters
    options = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    for key in solver_kw:
        if key not in options:
            raise BenchError(
                f"unknown option {key!r} for solver {name!r}; choose from {', '.join(sorted(options)) or 'none'}"
            )


STOP_MODES = ("abs", "rel", "batch")


def solve(f: Callable[[Tensor], Tensor], z0: Tensor, solver: str = "anderson", max_iter: int = 20,
          tol: float = 1e-3, *, stop_mode: str = "rel", diverge_above: float = DIVERGE_ABOVE,
          **solver_kw) -> tuple[Tensor, dict[str, Tensor]]:
    """z* = f(z*) for every example of the batch; returns (z, stats) (see the module docstring).

    Runs under torch.no_grad: the solve is never differentiated (a DEQ's gradient comes from its
    backward mode), which is what keeps training memory independent of max_iter. f may still call
    torch.autograd.grad on a graph built earlier (the adjoint solve of the implicit backward does).
    """
    fn = SOLVERS.get(solver)
    _check_kw(solver, fn, solver_kw)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise BenchError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if not tol >= 0:
        raise BenchError(f"tol must be >= 0, got {tol!r}")
    if stop_mode not in STOP_MODES:
        raise BenchError(f"unknown stop_mode {stop_mode!r}; choose from {', '.join(STOP_MODES)}")
    if stop_mode == "batch" and solver != "broyden":
        raise BenchError(f"stop_mode 'batch' (the FeDEQ reference's Broyden rule) needs solver 'broyden', "
                         f"got {solver!r}")
    if z0.dim() < 1 or z0.shape[0] == 0:
        raise BenchError(f"solve needs a batch-first z0 with at least one example, got shape {tuple(z0.shape)}")
    try:
        with torch.no_grad():
            z, stats = fn(f, z0.detach(), max_iter, tol, stop_mode, **solver_kw)
    except _NonFinite as e:
        raise DEQDivergence(
            f"{solver} solver diverged: {stop_mode} residual {e.residual:.3g} {e.where}"
        ) from None
    worst = float(stats["residual"].max())
    if worst > diverge_above:
        raise DEQDivergence(
            f"{solver} solver diverged: lowest {stop_mode} residual {worst:.3g} > "
            f"diverge_above={diverge_above:g} after {max_iter} steps"
        )
    return z, stats
