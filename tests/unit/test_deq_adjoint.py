"""methods.deq.adjoint: the implicit backward's adjoint solve g = J^T g + v.

Ground truths: torch.linalg.solve on explicit matrices, and (real images through deq_resnet_s)
scipy.sparse.linalg's BiCGStab (GMRES as a fallback) in float64 on vector-Jacobian products, an
independent implementation, to a relative residual of 1e-10.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedeq_bench.core import seeding
from fedeq_bench.core.errors import BenchError
from fedeq_bench.methods.base import ClientTensors, Task
from fedeq_bench.methods.deq import DEQ, STATS_KEYS, DEQDivergence
from fedeq_bench.methods.deq.adjoint import ADJOINT_SOLVERS, solve_adjoint
from fedeq_bench.methods.nets import build_model

F64 = torch.float64


def _linear(M: torch.Tensor, shape):
    """vjp(u) = J^T u for a J over the flattened batch: J^T = M (a (N, N) matrix)."""
    return lambda u: (M @ u.reshape(-1)).view(shape)


def _contraction(n: int, norm: float, seed: int) -> torch.Tensor:
    M = torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return M * (norm / torch.linalg.matrix_norm(M, 2))


# --------------------------------------------------------------------------------------- gmres
def test_gmres_solves_a_linear_adjoint_exactly_within_its_dimension():
    # (I - M) g = v with N = 3 * 4 = 12 unknowns: GMRES is exact after at most N products.
    shape = (3, 4)
    M = _contraction(12, 0.9, 0)
    v = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    g, st = solve_adjoint(_linear(M, shape), v, "gmres", max_iter=12, tol=1e-12)
    expected = torch.linalg.solve(torch.eye(12, dtype=F64) - M, v.reshape(-1)).view(shape)
    torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12)
    assert set(st) == set(STATS_KEYS) and st["residual"].shape == (3,)
    assert st["converged"].all() and int(st["nstep"][0]) <= 12
    assert torch.equal(st["residual_first"], torch.ones(3, dtype=F64))  # g0 = 0: ||v|| / ||v||


def test_gmres_reports_the_true_relative_residual_and_stops_at_tol():
    shape = (4, 25)
    M = _contraction(100, 0.95, 2)
    v = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    for tol in (1e-2, 1e-5):
        g, st = solve_adjoint(_linear(M, shape), v, "gmres", max_iter=100, tol=tol)
        true = float((_linear(M, shape)(g) + v - g).norm() / v.norm())
        assert true == pytest.approx(float(st["residual"][0]), rel=1e-6)
        assert true <= tol and st["converged"].all()
        # It stopped at the first step under tol: one step fewer is above it.
        k = int(st["nstep"][0])
        _, before = solve_adjoint(_linear(M, shape), v, "gmres", max_iter=k - 1, tol=tol)
        assert float(before["residual"][0]) > tol and not before["converged"].any()
    # A budget too small: unconverged, reported as such, residual below the start's 1.
    _, st = solve_adjoint(_linear(M, shape), v, "gmres", max_iter=2, tol=1e-8)
    assert int(st["nstep"][0]) == 2 and not st["converged"].any() and 0 < float(st["residual"][0]) < 1


def test_gmres_is_scale_invariant():
    # dL/dz scaled by 1e6 (or 1e-6): the same steps and residual, g scaled alike (the tolerance is
    # relative to ||v||; Anderson's absolute ridge of 1e-4 makes the old default scale-dependent).
    shape = (2, 30)
    M = _contraction(60, 0.9, 4)
    v = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    g, st = solve_adjoint(_linear(M, shape), v, "gmres", max_iter=60, tol=1e-6)
    for s in (1e6, 1e-6):
        gs, sts = solve_adjoint(_linear(M, shape), s * v, "gmres", max_iter=60, tol=1e-6)
        assert torch.equal(sts["nstep"], st["nstep"])
        torch.testing.assert_close(gs, s * g, rtol=1e-9, atol=0)


def test_gmres_solves_one_system_over_a_coupled_batch():
    # J couples the examples (as a BatchNorm inside func would): per-example solves would be wrong,
    # one system over the batch is right. M below mixes example 0 into example 1.
    shape = (2, 3)
    M = torch.zeros(6, 6, dtype=F64)
    M[3:, :3] = 0.5 * torch.eye(3, dtype=F64)  # J^T u: example 1's row gets 0.5 * u_0
    M[:3, :3] = 0.3 * torch.eye(3, dtype=F64)
    v = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=F64)
    g, _ = solve_adjoint(_linear(M, shape), v, "gmres", max_iter=6, tol=1e-12)
    # By hand: g_0 = 0.3 g_0 + v_0 -> g_0 = v_0 / 0.7; g_1 = 0.5 g_0 -> v_0 / 1.4.
    expected = torch.stack([v[0] / 0.7, v[0] / 1.4])
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)


def test_zero_gradient_and_non_finite_products():
    shape = (2, 3)
    M = _contraction(6, 0.5, 6)
    g, st = solve_adjoint(_linear(M, shape), torch.zeros(shape, dtype=F64), "gmres", 10, 1e-3)
    assert torch.equal(g, torch.zeros(shape, dtype=F64)) and int(st["nstep"][0]) == 0 and st["converged"].all()
    with pytest.raises(DEQDivergence, match=r"^backward \(adjoint\) gmres solver diverged: non-finite J\^T u at product 1$"):
        solve_adjoint(lambda u: u * float("nan"), torch.ones(shape), "gmres", 10, 1e-3)


def test_fixed_point_solvers_remain_available_by_name():
    # The harness's earlier adjoint (Anderson, absolute ridge 1e-4, 20 steps) and the other
    # fixed-point solvers still solve g = J^T g + v when given enough steps.
    assert ADJOINT_SOLVERS.names() == ["anderson", "bicgstab", "broyden", "fixed_point", "gmres", "normal_cg"]
    shape = (3, 4)
    M = _contraction(12, 0.5, 7)
    v = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(8))
    expected = torch.linalg.solve(torch.eye(12, dtype=F64) - M, v.reshape(-1)).view(shape)
    for name, kw in (("anderson", {"lam": 1e-12}), ("broyden", {}), ("fixed_point", {})):
        g, st = solve_adjoint(_linear(M, shape), v, name, 100, 1e-12, **kw)
        torch.testing.assert_close(g, expected, rtol=1e-9, atol=1e-10)
        assert set(st) == set(STATS_KEYS)
    for name in ("gmres", "bicgstab", "normal_cg"):
        with pytest.raises(BenchError, match=rf"^unknown option 'lam' for solver '{name}'; choose from none$"):
            solve_adjoint(_linear(M, shape), v, name, 10, 1e-3, lam=1.0)


# ----------------------------------------------------------------------------------- normal_cg
def _transposed(M: torch.Tensor, shape):
    """jvp(w) = J w for the J of _linear (J^T = M, so J = M^T)."""
    return lambda w: (M.T @ w.reshape(-1)).view(shape)


def test_normal_cg_by_hand_on_a_2x2_system():
    # One example with 2 unknowns, J^T = M = [[0.5, 0], [0, 0]]: K = I - J^T = diag(0.5, 1), v = (1, 1).
    # Normal equations K^T K g = K^T v: diag(0.25, 1) g = (0.5, 1); exact g = (2, 1).
    # CG from x0 = 0 (jax's cg, as the reference's solve_normal_cg runs it):
    #   r0 = p0 = b = (0.5, 1), gamma0 = 0.25 + 1 = 1.25;  A p0 = (0.125, 1), <p0, A p0> = 0.0625 + 1 = 1.0625
    #   alpha0 = 1.25 / 1.0625 = 20/17;  x1 = (10/17, 20/17);  r1 = b - alpha0 A p0 = (6/17, -3/17)
    #   gamma1 = 36/289 + 9/289 = 45/289;  residual ||r1|| / ||b|| = sqrt(gamma1 / gamma0) = 6/17.
    # Step 2 (tol 0.1: 6/17 > 0.1): beta0 = gamma1 / gamma0 = 36/289;
    #   p1 = r1 + beta0 p0 = (120/289, -15/289);  A p1 = (30/289, -15/289);  <p1, A p1> = 3825/289^2
    #   alpha1 = (45/289) / (3825/289^2) = 17/5;  x2 = x1 + alpha1 p1 = (10/17 + 24/17, 20/17 - 3/17) = (2, 1),
    #   exact (CG is exact in 2 dimensions), residual 0.
    M = torch.tensor([[0.5, 0.0], [0.0, 0.0]], dtype=F64)
    shape = (1, 2)
    v = torch.tensor([[1.0, 1.0]], dtype=F64)
    g, st = solve_adjoint(_linear(M, shape), v, "normal_cg", max_iter=1, tol=0.1, jvp=_transposed(M, shape))
    torch.testing.assert_close(g, torch.tensor([[10 / 17, 20 / 17]], dtype=F64), rtol=1e-14, atol=0)
    # residual = ||r1|| / ||b|| = sqrt((45/289) / 1.25) = sqrt(36/289) = 6/17 > tol: unconverged at 1 step.
    assert int(st["nstep"][0]) == 1 and float(st["residual"][0]) == pytest.approx(6 / 17, rel=1e-14)
    assert not st["converged"].any()
    g, st = solve_adjoint(_linear(M, shape), v, "normal_cg", max_iter=50, tol=0.1, jvp=_transposed(M, shape))
    torch.testing.assert_close(g, torch.tensor([[2.0, 1.0]], dtype=F64), rtol=1e-13, atol=1e-13)
    assert int(st["nstep"][0]) == 2 and st["converged"].all()


def _scipy_cg_iterates(A: np.ndarray, b: np.ndarray, tol: float, maxiter: int) -> list[np.ndarray]:
    """scipy's CG on A x = b from 0 with rtol=tol, atol=0 (stop once ||r|| <= tol ||b||, jax's rule),
    every iterate recorded through its callback."""
    import scipy.sparse.linalg as sla

    xs: list[np.ndarray] = []
    x, info = sla.cg(A, b, rtol=tol, atol=0.0, maxiter=maxiter, callback=lambda xk: xs.append(xk.copy()))
    assert not xs or np.array_equal(xs[-1], x)
    return xs


@pytest.mark.parametrize("tol", [1e-2, 1e-6])
def test_normal_cg_matches_scipy_cg_on_the_normal_equations_per_example(tol):
    # Three examples of 8 unknowns, each with its own J_i (block diagonal over the batch, as a
    # per-example func gives): normal_cg must take, per example, the iterates scipy's CG takes on
    # K_i^T K_i g = K_i^T v_i, K_i = I - J_i^T, and stop at the same step.
    batch, d = 3, 8
    gen = torch.Generator().manual_seed(11)
    Ms = [_contraction(d, s, 20 + i) for i, s in enumerate((0.0, 0.8, 0.95))]  # example 0: J = 0, K = I
    M = torch.block_diag(*Ms)
    shape = (batch, d)
    v = torch.randn(shape, dtype=F64, generator=gen)
    for steps in range(1, 12):
        g, st = solve_adjoint(_linear(M, shape), v, "normal_cg", max_iter=steps, tol=tol, jvp=_transposed(M, shape))
        for i, Mi in enumerate(Ms):
            K = (torch.eye(d, dtype=F64) - Mi).numpy()
            xs = _scipy_cg_iterates(K.T @ K, K.T @ v[i].numpy(), tol, steps)
            assert int(st["nstep"][i]) == len(xs), (steps, i)
            if xs:
                np.testing.assert_allclose(g[i].numpy(), xs[-1], rtol=1e-9, atol=1e-12)
            r = K.T @ (v[i].numpy() - K @ g[i].numpy())
            assert float(st["residual"][i]) == pytest.approx(np.linalg.norm(r) / np.linalg.norm(K.T @ v[i].numpy()),
                                                             rel=1e-6)
    # Per-example stopping: example 0 (K = I) is solved by its first step and then kept as it is.
    _, st = solve_adjoint(_linear(M, shape), v, "normal_cg", max_iter=50, tol=1e-6, jvp=_transposed(M, shape))
    assert int(st["nstep"][0]) == 1 < int(st["nstep"][2]) and st["converged"].all()


def test_normal_cg_needs_a_jvp():
    M = _contraction(4, 0.5, 9)
    with pytest.raises(TypeError, match="normal_cg needs jvp"):
        solve_adjoint(_linear(M, (1, 4)), torch.ones(1, 4, dtype=F64), "normal_cg", 10, 1e-3)


# ------------------------------------------------------------------------------------ bicgstab
def test_bicgstab_solves_one_system_to_its_tolerance():
    # Against torch.linalg.solve on the explicit (I - M); the reported residual is the recurrence's,
    # checked against the true ||v + J^T g - g|| / ||v||; a coupled batch (as test_gmres_solves_one_
    # system_over_a_coupled_batch) is solved as one system.
    shape = (4, 25)
    M = _contraction(100, 0.9, 12)
    v = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(13))
    exact = torch.linalg.solve(torch.eye(100, dtype=F64) - M, v.reshape(-1)).view(shape)
    g, st = solve_adjoint(_linear(M, shape), v, "bicgstab", max_iter=200, tol=1e-10)
    torch.testing.assert_close(g, exact, rtol=1e-8, atol=1e-9)
    assert st["converged"].all() and set(st) == set(STATS_KEYS)
    for tol in (1e-2, 1e-5):
        g, st = solve_adjoint(_linear(M, shape), v, "bicgstab", max_iter=200, tol=tol)
        true = float((_linear(M, shape)(g) + v - g).norm() / v.norm())
        assert true == pytest.approx(float(st["residual"][0]), rel=1e-6) and true <= tol
    _, st = solve_adjoint(_linear(M, shape), v, "bicgstab", max_iter=3, tol=1e-12)  # the budget counts products
    assert int(st["nstep"][0]) == 3 and not st["converged"].any()
    C = torch.zeros(6, 6, dtype=F64)
    C[3:, :3], C[:3, :3] = 0.5 * torch.eye(3, dtype=F64), 0.3 * torch.eye(3, dtype=F64)
    w = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=F64)
    g, _ = solve_adjoint(_linear(C, (2, 3)), w, "bicgstab", max_iter=20, tol=1e-12)
    torch.testing.assert_close(g, torch.stack([w[0] / 0.7, w[0] / 1.4]), rtol=1e-12, atol=1e-12)


def test_krylov_solvers_on_zero_and_non_finite_input():
    shape = (2, 3)
    M = _contraction(6, 0.5, 6)
    jvp = _transposed(M, shape)
    for name in ("bicgstab", "normal_cg"):
        g, st = solve_adjoint(_linear(M, shape), torch.zeros(shape, dtype=F64), name, 10, 1e-3, jvp=jvp)
        assert torch.equal(g, torch.zeros(shape, dtype=F64)) and int(st["nstep"].max()) == 0 and st["converged"].all()
        with pytest.raises(DEQDivergence, match=rf"^backward \(adjoint\) {name} solver diverged: non-finite"):
            solve_adjoint(lambda u: u * float("nan"), torch.ones(shape), name, 10, 1e-3,
                          jvp=lambda w: w * float("nan"))


# ------------------------------------------------------------- both as the layer's b_solver
@pytest.mark.parametrize("b_solver", ["normal_cg", "bicgstab"])
def test_new_solvers_give_the_exact_gradient_in_a_deq_layer(b_solver):
    # A small, well-conditioned deq_mlp (its W z term at N(0, 0.01) init: J has norm ~0.1), float64:
    # the implicit gradient with each solver against the exact adjoint (_exact_adjoint, scipy float64
    # to 1e-10) at the same z*. The layer's jvp (double backward) is what normal_cg uses here.
    torch.manual_seed(0)
    model = build_model("deq_mlp", (12,), 3).double().train()
    layer = model.body.deq
    layer.configure(b_solver=b_solver, b_tol=1e-10, b_max_iter=100, tol=1e-12, max_iter=60)
    x = torch.randn(5, 12, dtype=F64, generator=torch.Generator().manual_seed(14))
    y = torch.tensor([0, 1, 2, 0, 1])
    cos, cos_jfb, st, exact_res = _check_default_gradient(model, x, y, "abs")
    assert exact_res < 1e-8 and st["converged"].all()
    assert cos == pytest.approx(1.0, abs=1e-9), cos
    assert cos_jfb < 1 - 1e-6  # JFB differs: the check can see a wrong adjoint


def test_normal_cg_is_given_the_layers_double_backward_jvp(monkeypatch):
    # What the layer hands normal_cg as jvp(w) is J w: checked against torch.func.jvp on func at z*.
    import fedeq_bench.methods.deq.adjoint as adjoint_mod

    torch.manual_seed(0)
    model = build_model("deq_mlp", (6,), 3).double().train()
    layer = model.body.deq
    real, seen = adjoint_mod.normal_cg, {}

    def spy(vjp, v, max_iter, tol, jvp):
        seen["w"] = torch.randn(v.shape, dtype=v.dtype, generator=torch.Generator().manual_seed(15))
        seen["Jw"] = jvp(seen["w"])
        return real(vjp, v, max_iter, tol, jvp)

    monkeypatch.setitem(adjoint_mod.ADJOINT_SOLVERS._items, "normal_cg", spy)
    x = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(16))
    cap = {}
    handle = layer.register_forward_hook(lambda mod, args, out: cap.update(x=args[0].detach()))  # returns None
    try:
        layer.configure(b_solver="normal_cg")
        model(x).sum().backward()
    finally:
        handle.remove()
    assert "Jw" in seen
    with torch.no_grad():
        z_star = layer(cap["x"], z0=cap["x"])
    _, expected = torch.func.jvp(lambda z: layer.func(z, cap["x"]), (z_star,), (seen["w"],))
    torch.testing.assert_close(seen["Jw"], expected, rtol=1e-10, atol=1e-12)


def test_layer_defaults():
    layer = DEQ(nn.Identity())
    s = layer.settings()
    assert (s["b_solver"], s["b_max_iter"], s["b_tol"], s["b_solver_kw"]) == ("normal_cg", 50, 1e-3, {})


# ---------------------------------------------------------------------- FeDEQ logs the backward
def test_fedeq_logs_the_adjoint_statistics_of_its_backward_passes():
    from fedeq_bench.methods.fedeq import FeDEQ, FeDEQConfig

    cfg = FeDEQConfig(model="deq_mlp", lr=0.05, batch_size=8, personal_epochs=1, shared_epochs=1)
    algo = FeDEQ(cfg, Task("deq_mlp", (4,), 3))
    torch.manual_seed(0)
    server = algo.init_server(build_model("deq_mlp", (4,), 3), seeding.generator(0, "server_init"))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)
    data = ClientTensors(x, y, x[:4], y[:4], x[:8], y[:8])
    seen = []
    algo.net.body.deq.backward_stats_hooks.append(seen.append)
    _, _, metrics = algo.local_update(algo.broadcast(server, 0, 1), algo.init_client(0, server, None), data,
                                      seeding.generator(0, "local", 1, 0))
    # 24 samples, batch 8, one shared epoch: 3 backward passes through the body (the head-only
    # epoch freezes the body, so it solves no adjoint).
    assert len(seen) == 3
    nstep = torch.cat([s["nstep"].double() for s in seen])
    res = torch.cat([s["residual"].double() for s in seen])
    conv = torch.cat([s["converged"] for s in seen])
    assert metrics["deq/b_nstep_mean"] == pytest.approx(float(nstep.mean()))
    assert metrics["deq/b_residual_max"] == pytest.approx(float(res.max()))
    assert metrics["deq/b_unconverged_frac"] == pytest.approx(float((~conv).double().mean()))
    assert 1 <= metrics["deq/b_nstep_mean"] <= 50 and metrics["deq/b_residual_max"] <= 1e-3
    # A second call reports its own solves only.
    _, _, again = algo.local_update(algo.broadcast(server, 0, 2), algo.init_client(0, server, None), data,
                                    seeding.generator(0, "local", 2, 0))
    assert len(seen) == 6 and "deq/b_nstep_mean" in again


# ------------------------------------------------- real images: default vs exact implicit gradient
FMNIST = Path("/usr/share/datasets/fashion-mnist")
N_IMAGES = 8


@pytest.fixture(scope="module")
def fmnist():
    """The first 8 + 60 Fashion-MNIST test images (8 to check, 60 to train on) and labels."""
    from fedeq_bench.datasets.fmnist import parse_idx, read_member

    files = [FMNIST / f"t10k-{k}-idx{d}-ubyte.gz" for k, d in (("images", 3), ("labels", 1))]
    if not all(f.is_file() for f in files):
        pytest.skip(f"Fashion-MNIST IDX files not installed at {FMNIST} (Debian package dataset-fashion-mnist)")
    imgs = parse_idx(read_member(files[0]), str(files[0]))[: N_IMAGES + 60]
    labels = parse_idx(read_member(files[1]), str(files[1]))[: N_IMAGES + 60]
    x = torch.from_numpy(imgs.astype(np.float32) / 255.0)[:, None]
    return x, torch.from_numpy(labels.astype(np.int64))


def _exact_adjoint(func: nn.Module, z_star, x, v, rtol: float = 1e-10) -> tuple[torch.Tensor, float]:
    """g = (I - J^T)^-1 v at z* in float64 by scipy on VJPs (BiCGStab, GMRES where it stalls: a
    different implementation from the code under test); returns (gradient, true residual). The
    same helper `python -m bench.perf --adjoint` measures against."""
    from bench.perf.adjoint import exact_adjoint

    return exact_adjoint(func, z_star, x, v, rtol)


def _cos(a, b) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def _check_default_gradient(model, x, y, stop_mode):
    """(cos(default, exact), cos(JFB, exact), adjoint stats, exact residual) at the default z*."""
    layer = model.body.deq
    assert layer.stop_mode == stop_mode
    cap = {}

    def hook(mod, args, kwargs, out):
        cap["x"], cap["z0"] = args[0].detach(), kwargs.get("z0")
        out.register_hook(lambda g: cap.__setitem__("v", g.detach()))

    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    finally:
        handle.remove()
    params = list(layer.func.parameters())
    default = torch.cat([p.grad.flatten() for p in params])
    stats = layer.last_backward_stats
    with torch.no_grad():  # the same solve again: z* itself (the layer returned func(z*, x))
        z_star = layer(cap["x"], z0=cap["z0"])
    exact, exact_res = _exact_adjoint(layer.func, z_star, cap["x"], cap["v"])
    zz = z_star.clone().requires_grad_()
    jfb = torch.cat([t.flatten() for t in torch.autograd.grad(layer.func(zz, cap["x"]), params, cap["v"])])
    return _cos(default, exact), _cos(jfb, exact), stats, exact_res


def test_default_backward_matches_the_exact_implicit_gradient_on_real_images(fmnist):
    """At the z* the default forward returns, the default backward's gradient of the DEQ block has
    cosine >= 0.99 with the exact implicit gradient at that z*, at initialization and after a few
    SGD steps. (The 20-step Anderson adjoint before GMRES: 0.967 at initialization, 0.872 after 20
    steps, on 32 images.) FeDEQ's default stop mode, abs, runs the forward's 20 steps here
    (||f(z) - z|| ~ 0.25, above tol 1e-3). rel ran them too (~2e-3) and passed the same checks; one
    stop mode is enough, as the backward stops on its own rel residual under either (layer.py)."""
    stop_mode = "abs"
    x, y = fmnist
    torch.manual_seed(0)
    model = build_model("deq_resnet_s", (1, 28, 28), 10).train()
    model.body.deq.configure(stop_mode=stop_mode)
    check_x, check_y = x[:N_IMAGES], y[:N_IMAGES]
    # The paper's FEMNIST lr and batch (0.01, 10). A much larger step (0.05 on batches of 16) makes
    # this block expansive within 4 steps (spectral radius of J ~1.05, forward residual 5e-2): its
    # adjoint then needs ~150 GMRES products, and the 50-step default reports it unconverged.
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for phase in ("init", "trained"):
        if phase == "trained":
            for i in range(6):  # 6 SGD steps of 10 other images each, default settings throughout
                sl = slice(N_IMAGES + 10 * i, N_IMAGES + 10 * (i + 1))
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[sl]), y[sl]).backward()
                opt.step()
        cos, cos_jfb, st, exact_res = _check_default_gradient(model, check_x, check_y, stop_mode)
        print(f"{stop_mode} {phase}: cos {cos:.6f} (jfb {cos_jfb:.4f}), adjoint steps {int(st['nstep'][0])} "
              f"residual {float(st['residual'][0]):.2e}; exact residual {exact_res:.1e}")
        assert exact_res < 1e-8
        # normal_cg stops per example: some run out of their 50 steps just above tol, at a gradient
        # that is still accurate (the property that matters, checked next).
        assert float(st["residual"].max()) <= 1e-2
        assert cos >= 0.99, (phase, cos)
        # The check can fail: dropping the adjoint solve (JFB, g = dL/dz) is far from 0.99.
        assert cos_jfb < 0.95, (phase, cos_jfb)


def test_engine_logs_backward_statistics_every_round(tmp_path):
    # What reaches MLflow: the engine's per-round history (reduce_client_metrics: *_max keys take
    # the cohort's max, the rest the mean), so every round carries the three deq/b_ keys.
    from bench.experiment import load_dataset
    from bench.loop import engine
    from bench.loop.backends import SerialBackend
    from tests.helpers import tiny_config, write_tiny_npz

    cfg = tiny_config(write_tiny_npz(tmp_path / "tiny.npz", clients=3), methods="fedeq", rounds=2,
                      **{"fedeq.personal_epochs": 1, "fedeq.shared_epochs": 1})
    res = engine.run_method(cfg, "fedeq", 0, load_dataset(cfg, 0), SerialBackend())
    assert len(res.history) == 2
    for h in res.history:
        assert 1 <= h["deq/b_nstep_mean"] <= 50
        assert (h["deq/b_residual_max"] <= 1e-3) == (h["deq/b_unconverged_frac"] == 0.0), h


# ------------------------------------------------------------------- python -m bench.perf --adjoint
def test_perf_adjoint_covers_every_solver_and_refuses_unknown_models(capsys):
    from bench.perf import __main__ as perf_main
    from bench.perf.adjoint import as_input, settings

    labels = [label for label, _ in settings()]
    assert labels == [f"implicit, {n}" for n in ADJOINT_SOLVERS.names()] + ["jfb", "phantom"]
    x, shape = as_input(torch.ones(2, 1, 28, 28), "deq_resnet_m_ref")  # pad 2 on each side, 3 channels
    assert shape == (3, 32, 32) and float(x[0, 2, 0, 0]) == 0.0 and float(x[0, 2, 2, 2]) == 1.0
    with pytest.raises(SystemExit) as e:
        perf_main.main(["--adjoint", "--models", "deq_mlp,resnet20"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--models: unknown resnet20; choose from deq_mlp, deq_resnet_s" in err[0]


def test_pick_default_follows_its_rule():
    # Rows as adjoint_table makes them (model, batch, phase, backward, cos, products, b_res, s/step, peak MB).
    # Model "s": every solver reaches 0.99 in both phases except normal_cg at init (0.893); bicgstab
    # has the least memory but can diverge, so only gmres and normal_cg are candidates. Model "ref":
    # no solver reaches 0.99 (beyond every budget), so its rows do not decide.
    from bench.perf.adjoint import pick_default

    def row(model, phase, solver, cos, secs, mb):
        return (model, 10, phase, solver, f"{cos:.4f}", "1", "-", f"{secs:.3f}", f"{mb:.1f}")

    rows = []
    for phase in ("init", "after 3 steps"):
        rows += [row("s", phase, "implicit, gmres", 1.0, 0.5, 47.7), row("s", phase, "implicit, bicgstab", 1.0, 0.6, 25.0),
                 row("s", phase, "implicit, normal_cg", 0.893 if phase == "init" else 0.999, 0.7, 24.0),
                 row("s", phase, "jfb", 0.6, 0.1, 20.0),
                 row("ref", phase, "implicit, gmres", 0.62, 1.3, 65.2), row("ref", phase, "implicit, normal_cg", 0.5, 1.2, 34.1)]
    verdict = pick_default(rows)
    # normal_cg misses the bar in a deciding row: gmres, 47.7 x 2 = 95.4 MB over the deciding rows.
    assert verdict.startswith("rule (cannot diverge, cosine >= 0.99 in every deciding row, least peak memory, "
                              "ties by time) picks gmres: gmres 95.4 MB / 1.00 s")
    assert verdict.endswith("not deciding): ref after 3 steps, ref init")
    # normal_cg at 0.995 at init: both qualify; normal_cg 48.0 MB < gmres 95.4 MB (the ref rows, where
    # normal_cg would lose nothing either, do not count).
    rows = [r if r[:4] != ("s", 10, "init", "implicit, normal_cg") else (*r[:4], "0.9950", *r[5:]) for r in rows]
    assert " picks normal_cg: normal_cg 48.0 MB / 1.40 s, gmres 95.4 MB / 1.00 s" in pick_default(rows)
    # Tied on memory (within 0.1 MB a row): the faster.
    rows = [r if r[3] != "implicit, gmres" else (*r[:8], "24.0") for r in rows]
    assert " picks gmres: " in pick_default(rows)
    rows = [r for r in rows if r[0] == "ref"]
    assert pick_default(rows).startswith("no solver that cannot diverge (gmres, normal_cg) reaches cosine 0.99")
