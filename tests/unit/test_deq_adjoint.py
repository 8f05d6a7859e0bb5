"""methods.deq.adjoint: the implicit backward's adjoint solve g = J^T g + v.

Ground truths: torch.linalg.solve on explicit matrices, and (real images through deq_resnet_s)
scipy.sparse.linalg's BiCGStab (GMRES as a fallback) in float64 on vector-Jacobian products, an
independent implementation, to a relative residual of 1e-10.
"""
from __future__ import annotations

import copy
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
    assert ADJOINT_SOLVERS.names() == ["anderson", "broyden", "fixed_point", "gmres"]
    shape = (3, 4)
    M = _contraction(12, 0.5, 7)
    v = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(8))
    expected = torch.linalg.solve(torch.eye(12, dtype=F64) - M, v.reshape(-1)).view(shape)
    for name, kw in (("anderson", {"lam": 1e-12}), ("broyden", {}), ("fixed_point", {})):
        g, st = solve_adjoint(_linear(M, shape), v, name, 100, 1e-12, **kw)
        torch.testing.assert_close(g, expected, rtol=1e-9, atol=1e-10)
        assert set(st) == set(STATS_KEYS)
    with pytest.raises(BenchError, match=r"^unknown option 'lam' for solver 'gmres'; choose from none$"):
        solve_adjoint(_linear(M, shape), v, "gmres", 10, 1e-3, lam=1.0)


def test_layer_defaults():
    layer = DEQ(nn.Identity())
    s = layer.settings()
    assert (s["b_solver"], s["b_max_iter"], s["b_tol"], s["b_solver_kw"]) == ("gmres", 50, 1e-3, {})


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
    """g = (I - J^T)^-1 v at z* in float64 by scipy's GMRES on VJPs; returns (g, true residual)."""
    import scipy.sparse.linalg as sla

    f64 = copy.deepcopy(func).double()
    z = z_star.double().requires_grad_()
    fz = f64(z, x.double())
    shape, n = v.shape, v.numel()

    def matvec(u):
        u = torch.from_numpy(np.ascontiguousarray(u, dtype=np.float64)).view(shape)
        return (u - torch.autograd.grad(fz, z, u, retain_graph=True)[0]).numpy().ravel()

    b = v.double().numpy().ravel()
    # scipy's BiCGStab first: float64, a short recurrence (scipy's GMRES spends ~0.2 s per step on its
    # own Gram-Schmidt here), a different Krylov method from the code under test; scipy's GMRES where
    # BiCGStab stalls (seen on 32 images after training).
    op = sla.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    g, info = sla.bicgstab(op, b, rtol=rtol, atol=0.0, maxiter=300)
    if info != 0:
        g, info = sla.gmres(op, b, rtol=rtol, atol=0.0, restart=300, maxiter=2)
    assert info == 0
    res = float(np.linalg.norm(matvec(g) - b) / np.linalg.norm(b))
    g = torch.from_numpy(g).view(shape)
    grads = torch.autograd.grad(fz, list(f64.parameters()), g)
    return torch.cat([t.flatten() for t in grads]), res


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


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_default_backward_matches_the_exact_implicit_gradient_on_real_images(fmnist, stop_mode):
    """At the z* the default forward returns, the default backward's gradient of the DEQ block has
    cosine >= 0.99 with the exact implicit gradient at that z*, at initialization and after a few
    SGD steps. (The 20-step Anderson adjoint before GMRES: 0.967 at initialization, 0.872 after 20
    steps, on 32 images.) At these settings both stop modes run the forward's 20 steps
    (abs: ||f(z) - z|| ~ 0.25 there, rel: ~2e-3, both above tol 1e-3), so z* agrees."""
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
        assert st["converged"].all() and float(st["residual"].max()) <= 1e-3
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
