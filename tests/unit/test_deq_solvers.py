"""methods.deq solvers: known fixed points, per-example behaviour, fixed stats, divergence, names.

Known answers: the Dottie number z* = cos(z*) = 0.7390851332151607; for f(z) = W z + b with
||W||_2 = 0.5 the fixed point is (I - W)^-1 b (torch.linalg.solve). Error bounds from the residual
r = ||f(x) - x|| / ||f(x)|| (relative, the module's convention) are derived where used.
"""
from __future__ import annotations

import math

import pytest
import torch

from fedeq_bench.core.errors import BenchError
from fedeq_bench.methods.deq import SOLVERS, STATS_KEYS, DEQDivergence, residual, solve

ALL = ["anderson", "broyden", "fixed_point"]
DOTTIE = 0.7390851332151607
F64 = torch.float64


def _contraction(d: int, batch: int, norm: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=F64)
    W = norm * W / torch.linalg.matrix_norm(W, 2)  # spectral norm exactly `norm`
    b = torch.randn(batch, d, generator=g, dtype=F64)
    z_star = torch.linalg.solve(torch.eye(d, dtype=F64) - W, b.T).T  # (I - W) z* = b
    return (lambda z: z @ W.T + b), z_star


# --------------------------------------------------------------------------- known fixed points
@pytest.mark.parametrize("solver", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_cos_reaches_the_dottie_number(solver, dtype):
    tol = 1e-5
    z, stats = solve(torch.cos, torch.zeros(4, 1, dtype=dtype), solver, max_iter=60, tol=tol)
    assert stats["converged"].all() and (stats["residual"] < tol).all()
    # cos z - z = 0 at z*, slope -(1 + sin z*) = -1.674: |x - z*| <= r |cos x| / 1.674 <= 0.45 r,
    # and the returned point (x or cos x) is at least that close; so the error is below tol.
    assert (z - DOTTIE).abs().max() < tol


@pytest.mark.parametrize("solver", ALL)
def test_contraction_reaches_the_linear_solution(solver):
    f, z_star = _contraction(d=16, batch=3, norm=0.5)
    tol = 1e-6
    z, stats = solve(f, torch.zeros_like(z_star), solver, max_iter=80, tol=tol)
    assert stats["converged"].all()
    # ||x - z*|| <= ||f(x) - x|| / (1 - 0.5) = 2 r ||f(x)||, and ||f(x)|| = ||z*|| (1 + O(tol)).
    err = (z - z_star).norm(dim=1)
    assert (err <= 2 * tol * z_star.norm(dim=1) * 1.01).all(), err
    assert err.max() > 0  # a real iteration, not an exact copy


def test_secant_solvers_are_fast_on_an_ill_conditioned_linear_contraction():
    # Eigenvalues 0.99, -0.99, 0.9, 0.5 in d = 4: plain iteration needs ~log(1e-8)/log(0.99) ~ 1830
    # steps; Broyden solves a linear d-dim system in <= 2d = 8 steps (Gay 1979), Anderson with
    # m = 5 >= d is GMRES-like (d + 3 = 7 evaluations, the ridge switched off; see the next test).
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))
    A = Q @ torch.diag(torch.tensor([0.99, -0.99, 0.9, 0.5], dtype=F64)) @ Q.T
    b = torch.randn(3, 4, generator=g, dtype=F64)
    f = lambda z: z @ A.T + b  # noqa: E731
    z0 = torch.zeros(3, 4, dtype=F64)
    _, st = solve(f, z0, "broyden", max_iter=30, tol=1e-8)
    assert st["converged"].all() and st["nstep"].max() <= 8
    _, st = solve(f, z0, "anderson", max_iter=30, tol=1e-8, lam=1e-12)
    assert st["converged"].all() and st["nstep"].max() <= 7
    _, st = solve(f, z0, "fixed_point", max_iter=30, tol=1e-8)
    assert not st["converged"].any()  # the problem is hard for plain iteration


def test_anderson_default_ridge_is_absolute():
    # The DEQ literature's Anderson adds lam = 1e-4 to G G^T unscaled: once ||G||^2 << 1e-4 the mix
    # tends to a plain average of the last m images and acceleration stops. Same problem as above:
    # with the default lam, 30 steps do not reach 1e-8; with lam = 1e-12 seven do.
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))
    A = Q @ torch.diag(torch.tensor([0.99, -0.99, 0.9, 0.5], dtype=F64)) @ Q.T
    b = torch.randn(3, 4, generator=g, dtype=F64)
    _, st = solve(lambda z: z @ A.T + b, torch.zeros(3, 4, dtype=F64), "anderson", max_iter=30, tol=1e-8)
    assert not st["converged"].any()


def test_fixed_point_steps_and_residual_by_hand():
    # f(z) = z/2 + 1 from z0 = 1: z* = 2, x_k = 2 - 2^-k, f(x_k) = x_{k+1}, so evaluation n (of
    # f(x_{n-1})) sees r_{n-1} = 2^-n / (2 - 2^-n). r < 1e-3 first at n = 9 (2^-9 / (2 - 2^-9) =
    # 9.775e-4; n = 8 gives 1.957e-3). Returned: f(x_8) = x_9 = 2 - 2^-9, residual r_8 (with the
    # denominator's 1e-9 guard).
    z, st = solve(lambda z: z / 2 + 1, torch.ones(2, 1, dtype=F64), "fixed_point", max_iter=50, tol=1e-3)
    assert st["nstep"].tolist() == [9, 9]
    r8 = 2**-9 / (2 - 2**-9 + 1e-9)
    assert torch.allclose(st["residual"], torch.full((2,), r8, dtype=F64), rtol=0, atol=1e-15)
    assert torch.allclose(z, torch.full((2, 1), 2 - 2**-9, dtype=F64), rtol=0, atol=1e-15)
    # residual at z0 = 1: |f(1) - 1| / |f(1)| = 0.5 / 1.5 = 1/3 (plus the 1e-9 guard)
    assert torch.allclose(st["residual_first"], torch.full((2,), 0.5 / (1.5 + 1e-9), dtype=F64), atol=1e-15)
    assert st["converged"].all()
    # Stopped one step early: 8 evaluations, lowest r_7 = 2^-8 / (2 - 2^-8) = 1.957e-3 >= tol.
    _, st = solve(lambda z: z / 2 + 1, torch.ones(2, 1, dtype=F64), "fixed_point", max_iter=8, tol=1e-3)
    assert st["nstep"].tolist() == [8, 8]
    assert torch.allclose(st["residual"], torch.full((2,), 2**-8 / (2 - 2**-8 + 1e-9), dtype=F64), atol=1e-15)
    assert not st["converged"].any()


# --------------------------------------------------------------------------- per example, shapes
@pytest.mark.parametrize("solver", ALL)
def test_each_example_is_its_own_problem(solver):
    # Two different problems in one batch, tol = 0 so both run all 12 steps: the batch solve equals
    # solving each example alone (mixing weights, Jacobian estimates, residuals are per example).
    g = torch.Generator().manual_seed(1)
    A = torch.randn(2, 8, 8, generator=g, dtype=F64)
    A = 0.9 * A / torch.linalg.matrix_norm(A, 2)[:, None, None]
    c = torch.randn(2, 8, generator=g, dtype=F64)
    both, st = solve(lambda z: torch.tanh(torch.einsum("bij,bj->bi", A, z) + c), torch.zeros(2, 8, dtype=F64),
                     solver, max_iter=12, tol=0.0)
    for i in range(2):
        alone, st_i = solve(lambda z, i=i: torch.tanh(z @ A[i].T + c[i]), torch.zeros(1, 8, dtype=F64),
                            solver, max_iter=12, tol=0.0)
        torch.testing.assert_close(both[i], alone[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(st["residual"][i], st_i["residual"][0], rtol=0, atol=1e-12)
    assert st["residual"][0] != st["residual"][1]


@pytest.mark.parametrize("solver", ALL)
@pytest.mark.parametrize("shape", [(3, 5), (3, 2, 4, 4), (3, 6, 8)], ids=["mlp", "conv", "seq"])
def test_any_batch_first_shape(solver, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    f = lambda z: 0.5 * torch.tanh(z) + x  # noqa: E731  (Lipschitz 0.5)
    z, st = solve(f, torch.zeros(shape), solver, max_iter=40, tol=1e-4)
    assert z.shape == shape
    assert all(v.shape == (3,) for v in st.values())
    assert (residual(z, f(z)) < 1e-4).all()


@pytest.mark.parametrize("solver", ALL)
def test_stats_have_fixed_keys_dtypes_and_shapes(solver):
    _, st = solve(torch.cos, torch.zeros(5, 2), solver, max_iter=10, tol=1e-3)
    assert tuple(st) == STATS_KEYS == ("nstep", "residual", "residual_first", "converged")
    assert {k: (tuple(v.shape), v.dtype) for k, v in st.items()} == {
        "nstep": ((5,), torch.int64),
        "residual": ((5,), torch.float32),
        "residual_first": ((5,), torch.float32),
        "converged": ((5,), torch.bool),
    }
    assert (st["nstep"] >= 1).all() and (st["nstep"] <= 10).all()
    # z0 = 0: |cos 0 - 0| / |cos 0| = 1 / (1 + 1e-9) per element, and the norm ratio is the same
    torch.testing.assert_close(st["residual_first"], torch.full((5,), 1.0))
    assert torch.equal(st["converged"], st["residual"] < 1e-3)


def test_solve_does_not_build_a_graph():
    w = torch.tensor(0.5, requires_grad=True)
    z, st = solve(lambda z: w * z + 1, torch.zeros(2, 3), "anderson", max_iter=10)
    assert not z.requires_grad and z.grad_fn is None
    assert not any(v.requires_grad for v in st.values())


# --------------------------------------------------------------------- where torchdeq falls short
def test_anderson_with_two_steps_is_fixed_point_iteration():
    # torchdeq's Anderson records nothing before its 3rd evaluation: raw, max_iter=2 returns z0 with
    # residual 1e8. Its first two steps are plain fixed-point steps, so ours runs fixed_point.
    from torchdeq.solver import anderson_solver

    z0 = torch.zeros(2, 1)
    raw, _, info = anderson_solver(torch.cos, z0, max_iter=2, tol=0.0, stop_mode="rel", m=5)
    assert torch.equal(raw, z0) and (info["rel_lowest"] == 1e8).all()
    z, st = solve(torch.cos, z0, "anderson", max_iter=2, tol=0.0)
    # fixed point: x0 = 0, f(x0) = 1, x1 = 1, f(x1) = cos 1 = 0.5403; residual of x1 is
    # |0.5403 - 1| / 0.5403 = 0.8508 < residual of x0 (= 1), so the result is f(x1) = cos 1.
    torch.testing.assert_close(z, torch.full((2, 1), math.cos(1.0)))
    torch.testing.assert_close(st["residual"], torch.full((2,), (1 - math.cos(1.0)) / math.cos(1.0)))
    assert st["nstep"].tolist() == [2, 2]


def test_solver_options_reach_the_solver_and_typos_are_rejected():
    f, z_star = _contraction(d=8, batch=2, norm=0.9)
    z0 = torch.zeros_like(z_star)
    a, _ = solve(f, z0, "anderson", max_iter=8, tol=0.0, m=2)
    b, _ = solve(f, z0, "anderson", max_iter=8, tol=0.0, m=5)
    assert not torch.allclose(a, b)  # m changes the iterates (torchdeq would ignore a typo silently)
    with pytest.raises(BenchError, match=r"unknown option 'lamda' for solver 'anderson'; choose from beta, lam, m"):
        solve(f, z0, "anderson", lamda=1e-3)
    with pytest.raises(BenchError, match=r"unknown option 'm' for solver 'fixed_point'; choose from none"):
        solve(f, z0, "fixed_point", m=3)


# ------------------------------------------------------------------------------- divergence, names
def test_runaway_iteration_raises_when_it_overflows():
    # f(z) = 2z + 1 from z0 = 1: x_k = 2^(k+1) - 1, so evaluation n returns 2^(n+1) - 1, which is
    # inf in float32 (max ~2^128) first at n = 127. Residual then inf/inf = nan.
    with pytest.raises(DEQDivergence, match=r"^fixed_point solver diverged: rel residual nan .* at evaluation 127$"):
        solve(lambda z: 2 * z + 1, torch.ones(2, 1), "fixed_point", max_iter=200, tol=1e-3)
    # Before it overflows the relative residual is (x_k + 1) / (2 x_k + 1) -> 1/2: not a divergence
    # by the bound (1e3), an unconverged solve (stats say so) ...
    z, st = solve(lambda z: 2 * z + 1, torch.ones(2, 1), "fixed_point", max_iter=20, tol=1e-3)
    assert not st["converged"].any() and st["residual"].min() > 0.5
    # ... which a tighter bound reports as divergence, naming the residual.
    with pytest.raises(DEQDivergence, match=r"lowest rel residual 0\.5 > diverge_above=0\.4"):
        solve(lambda z: 2 * z + 1, torch.ones(2, 1), "fixed_point", max_iter=20, diverge_above=0.4)


@pytest.mark.parametrize("solver", ALL)
def test_nan_raises(solver):
    with pytest.raises(DEQDivergence, match=rf"^{solver} solver diverged: rel residual nan .* at evaluation 1$"):
        solve(lambda z: z * float("nan"), torch.ones(2, 3), solver)
    with pytest.raises(DEQDivergence, match=rf"^{solver} solver diverged: abs residual nan .* at evaluation 1$"):
        solve(lambda z: z * float("nan"), torch.ones(2, 3), solver, stop_mode="abs")
    assert issubclass(DEQDivergence, BenchError)  # the CLI prints it as one line


def test_unknown_solver_and_bad_settings_fail_helpfully():
    with pytest.raises(BenchError, match=r"^unknown solver 'andersen'; choose from anderson, broyden, fixed_point$"):
        solve(torch.cos, torch.zeros(2), "andersen")
    assert SOLVERS.names() == ALL
    with pytest.raises(BenchError, match="max_iter must be an int >= 1"):
        solve(torch.cos, torch.zeros(2), max_iter=0)
    with pytest.raises(BenchError, match="tol must be >= 0"):
        solve(torch.cos, torch.zeros(2), tol=-1.0)
    with pytest.raises(BenchError, match=r"^unknown stop_mode 'relative'; choose from abs, rel, batch$"):
        solve(torch.cos, torch.zeros(2), stop_mode="relative")
    with pytest.raises(BenchError, match=r"^unknown anderson variant 'jax'; choose from reference, torchdeq$"):
        solve(torch.cos, torch.zeros(2), variant="jax")


# ---------------------------------------------------------------------------------------- stop_mode
@pytest.mark.parametrize("solver", ALL)
def test_stop_mode_abs_stops_on_the_unscaled_residual(solver):
    # f(z) = 0.5 z + b with ||b|| = 100 per example: z* = 2b, ||z*|| = 200. From z0 = 0 the
    # fixed-point residual is ||f(x) - x|| = ||z* - x|| / 2, and ||f(x)|| ~ 200 near z*: "rel" at
    # tol 1e-3 stops at ||f(x) - x|| <= 0.2, "abs" only at <= 1e-3, 200x tighter (2 steps' more
    # halving at least 7 more fixed-point steps: 2^7 = 128 < 200).
    b = torch.full((3, 4), 50.0, dtype=F64)  # ||b|| = sqrt(4 * 2500) = 100
    f = lambda z: 0.5 * z + b  # noqa: E731
    _, rel = solve(f, torch.zeros_like(b), solver, max_iter=100, tol=1e-3, stop_mode="rel")
    z, ab = solve(f, torch.zeros_like(b), solver, max_iter=100, tol=1e-3, stop_mode="abs")
    assert rel["converged"].all() and ab["converged"].all()
    assert (ab["residual"] <= 1e-3).all()
    # The stats are in the mode's unit: abs residual = ||f(z) - z|| at the returned step.
    if solver == "fixed_point":
        assert (ab["nstep"] >= rel["nstep"] + 7).all(), (ab["nstep"], rel["nstep"])
        # residual_first at z0 = 0: abs ||b|| = 100, rel ||b|| / ||b|| = 1.
        assert torch.allclose(ab["residual_first"], torch.full((3,), 100.0, dtype=F64))
        assert torch.allclose(rel["residual_first"], torch.ones(3, dtype=F64))
    assert (z - 2 * b).norm(dim=1).max() < 2e-3


# ------------------------------------------------------------------------------- reference Anderson
REF = {"variant": "reference"}


def test_reference_anderson_warms_up_with_m_plain_steps():
    # With m = 5 the first 5 evaluations are plain fixed-point steps: x_1..x_4 = f^k(z0), so with
    # max_iter = 5 it returns f^5(z0) (the last iterate), exactly as fixed_point does, and 5 steps.
    f, _ = _contraction(d=8, batch=2, norm=0.9)
    z0 = torch.zeros(2, 8, dtype=F64)
    z_ref, st = solve(f, z0, "anderson", max_iter=5, tol=0.0, **REF)
    z_fp = z0
    for _ in range(5):
        z_fp = f(z_fp)
    assert torch.equal(z_ref, z_fp) and st["nstep"].tolist() == [5, 5]
    # torchdeq's variant accelerates from the 3rd evaluation: its 5-step answer is not f^5(z0).
    z_td, _ = solve(f, z0, "anderson", max_iter=5, tol=0.0)
    assert not torch.allclose(z_td, z_fp)


def test_reference_anderson_step_is_the_constrained_least_squares_mix():
    # The 6th evaluation (k = m = 5) is at x_5 = sum_i alpha_i f(x_i) (beta = 1) with alpha solving
    # min ||G^T alpha||^2 + lam ||alpha||^2, sum alpha = 1, over the 5 plain iterates: by hand,
    # alpha = (G G^T + lam I)^-1 1 / (1^T (G G^T + lam I)^-1 1) (the KKT solution).
    f, _ = _contraction(d=8, batch=1, norm=0.9, seed=1)
    lam = 1e-4
    xs = [torch.zeros(1, 8, dtype=F64)]
    for _ in range(4):
        xs.append(f(xs[-1]))
    Fx = torch.cat([f(x) for x in xs])           # (5, 8)
    G = Fx - torch.cat(xs)
    A = G @ G.T + lam * torch.eye(5, dtype=F64)
    w = torch.linalg.solve(A, torch.ones(5, 1, dtype=F64))
    alpha = (w / w.sum()).T                      # (1, 5)
    x5 = alpha @ Fx
    z, st = solve(f, xs[0], "anderson", max_iter=6, tol=0.0, lam=lam, **REF)
    assert torch.allclose(z, f(x5), atol=1e-12) and st["nstep"].item() == 6


def test_reference_anderson_stops_each_example_at_its_own_step():
    # A batch of one easy (contraction 0.1) and one hard (0.9) example: each stops at its own step
    # (per example, as the reference's vmap'd while_loop), and solving either alone gives the same
    # answer and step count: the other examples never change a frozen one.
    fe, _ = _contraction(d=6, batch=1, norm=0.1, seed=2)
    fh, _ = _contraction(d=6, batch=1, norm=0.9, seed=3)
    f = lambda z: torch.cat([fe(z[:1]), fh(z[1:])])  # noqa: E731
    z0 = torch.zeros(2, 6, dtype=F64)
    z, st = solve(f, z0, "anderson", max_iter=40, tol=1e-6, stop_mode="abs", **REF)
    ze, se = solve(fe, z0[:1], "anderson", max_iter=40, tol=1e-6, stop_mode="abs", **REF)
    zh, sh = solve(fh, z0[1:], "anderson", max_iter=40, tol=1e-6, stop_mode="abs", **REF)
    assert st["nstep"][0] < st["nstep"][1]
    assert st["nstep"].tolist() == [se["nstep"].item(), sh["nstep"].item()]
    assert torch.equal(z[:1], ze) and torch.equal(z[1:], zh)
    # The stopping rule: the abs residual at the returned step is <= tol, one step earlier > tol.
    assert (st["residual"] <= 1e-6).all() and st["converged"].all()
    _, before = solve(f, z0, "anderson", max_iter=int(st["nstep"][0]) - 1, tol=1e-6, stop_mode="abs", **REF)
    assert before["residual"][0] > 1e-6


def test_reference_anderson_early_exit_test_does_not_change_the_answer(monkeypatch):
    # The early-exit test runs every step on CPU, every 4th on an accelerator; frozen examples do
    # not move, so running all max_iter steps gives the same bits.
    from fedeq_bench.methods.deq import solvers

    f, _ = _contraction(d=6, batch=3, norm=0.7, seed=4)
    z0 = torch.zeros(3, 6, dtype=F64)
    z1, s1 = solve(f, z0, "anderson", max_iter=30, tol=1e-3, stop_mode="abs", **REF)
    calls = []
    z2, s2 = solve(lambda z: calls.append(1) or f(z), z0, "anderson", max_iter=30, tol=0.0, stop_mode="abs", **REF)
    assert len(calls) == 30  # tol 0: all steps run
    # Re-run with the early-exit test only after the last step (as if every step ran): identical.
    monkeypatch.setattr(solvers, "_check_every", lambda device: 10**6)
    calls.clear()
    solve(lambda z: calls.append(1) or f(z), z0, "anderson", max_iter=30, tol=1e-3, stop_mode="abs", **REF)
    assert len(calls) == 30 > s1["nstep"].max()
    z3, s3 = solve(f, z0, "anderson", max_iter=30, tol=1e-3, stop_mode="abs", **REF)
    assert torch.equal(z1, z3) and all(torch.equal(s1[k], s3[k]) for k in STATS_KEYS)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_reference_anderson_reaches_known_fixed_points(dtype):
    z, st = solve(torch.cos, torch.zeros(4, 1, dtype=dtype), "anderson", max_iter=60, tol=1e-6, **REF)
    assert st["converged"].all() and (z - DOTTIE).abs().max() < 1e-5
    f, z_star = _contraction(d=16, batch=3, norm=0.5)
    z, st = solve(f, torch.zeros_like(z_star), "anderson", max_iter=80, tol=1e-8, stop_mode="abs", **REF)
    # ||x - z*|| <= ||f(x) - x|| / (1 - 0.5) <= 2e-8 and f(x) is closer still (0.5 contraction).
    assert st["converged"].all() and ((z - z_star).norm(dim=1) <= 1e-8).all()
    assert set(st) == set(STATS_KEYS) and st["nstep"].dtype == torch.int64
