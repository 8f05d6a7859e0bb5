"""The FeDEQ reference's sequence-DEQ solves (longtanle/FeDEQ deq/solver/deq_seq.py, rootfind.py,
broyden_2.py): `stop_mode="batch"` (the whole batch's Broyden stop) and `second_solve`."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from fedeq_bench.core.errors import BenchError
from fedeq_bench.methods.base import Task
from fedeq_bench.methods.deq import DEQ, solve
from fedeq_bench.methods.fedeq import FeDEQ, FeDEQConfig


def reference_broyden(g, x0: np.ndarray, max_iter: int, eps: float):
    """longtanle/FeDEQ deq/solver/broyden_2.py `broyden` (lines 94-188), line for line in numpy, on
    (B, d) states: returns (min_x, n_step)."""
    def matvec(Us, VTs, x):  # broyden_2.py:56-64
        return -x + np.einsum("bil,bl->bi", Us, np.einsum("bli,bi->bl", VTs, x))

    def rmatvec(Us, VTs, x):  # broyden_2.py:46-54
        return -x + np.einsum("bl,bli->bi", np.einsum("bi,bil->bl", x, Us), VTs)

    bsz, d = x0.shape
    x, gx = x0, g(x0)
    min_x, min_obj = x, np.linalg.norm(gx)
    Us, VTs = np.zeros((bsz, d, max_iter)), np.zeros((bsz, max_iter, d))
    n, converged = 0, False
    while not converged and n < max_iter:
        dx = -matvec(Us, VTs, gx)  # line_search with s = 1 (lines 85-92)
        g_new = g(x + dx)
        x, dgx, gx = x + dx, g_new - gx, g_new
        n += 1
        obj = np.linalg.norm(gx)
        if obj < min_obj:
            min_x, min_obj = x, obj
        converged = obj < eps
        vT = rmatvec(Us, VTs, dx)  # update(), lines 67-82
        u = (dx - matvec(Us, VTs, dgx)) / np.einsum("bi,bi->b", vT, dgx)[:, None]
        VTs[:, n - 1], Us[:, :, n - 1] = np.nan_to_num(vT), np.nan_to_num(u)
    return min_x, n


def problem(batch=3, d=12, seed=0):
    """f(z) = tanh(A_b z + c_b) per example, A_b of spectral norm 0.9 (a contraction, several steps)."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(batch, d, d))
    A *= 0.9 / np.linalg.norm(A, ord=2, axis=(1, 2))[:, None, None]
    c = rng.normal(size=(batch, d)) * np.array([0.1, 1.0, 3.0])[:batch, None]  # easy to hard examples
    f_np = lambda z: np.tanh(np.einsum("bij,bj->bi", A, z) + c)  # noqa: E731
    At, ct = torch.from_numpy(A), torch.from_numpy(c)
    f_t = lambda z: torch.tanh(torch.einsum("bij,bj->bi", At, z) + ct)  # noqa: E731
    return f_np, f_t, np.zeros((batch, d))


@pytest.mark.parametrize(("tol", "max_iter"), [(1e-6, 30), (1e-3, 30), (1e-2, 30), (0.0, 8)])
def test_batch_stop_is_the_reference_broyden(tol, max_iter):
    f_np, f_t, z0 = problem()
    # rootfind.py:40: eps = 1e-6 * sqrt(x.size) for the reference's tol 1e-6; here the batch RMS < tol.
    expected, steps = reference_broyden(lambda z: f_np(z) - z, z0, max_iter, tol * math.sqrt(z0.size))
    z, stats = solve(f_t, torch.from_numpy(z0), "broyden", max_iter, tol, stop_mode="batch")
    np.testing.assert_allclose(z.numpy(), expected, rtol=0, atol=1e-12)
    rms = float(torch.linalg.norm(f_t(z) - z)) / math.sqrt(z0.size)
    assert stats["residual"].tolist() == pytest.approx([rms] * 3, rel=1e-9)  # one value: the batch's
    assert (stats["converged"] == (rms < tol)).all() and int(stats["nstep"][0]) <= steps
    if tol > 0:
        assert rms < tol and steps < max_iter


def test_batch_stop_differs_from_the_per_example_stop():
    # The same Broyden iteration; torchdeq's rule waits for the worst example's ||f(z) - z|| < tol,
    # the reference's for the batch's RMS: on easy-to-hard examples the batch stops earlier.
    _, f_t, z0 = problem()
    _, per = solve(f_t, torch.from_numpy(z0), "broyden", 30, 1e-3, stop_mode="abs")
    _, batch = solve(f_t, torch.from_numpy(z0), "broyden", 30, 1e-3, stop_mode="batch")
    assert int(batch["nstep"][0]) < int(per["nstep"].max())


def test_batch_stop_needs_broyden():
    with pytest.raises(BenchError, match=r"^stop_mode 'batch' .* needs solver 'broyden', got 'anderson'$"):
        solve(torch.cos, torch.zeros(2, 1), "anderson", stop_mode="batch")
    with pytest.raises(BenchError, match=r"^DEQ stop_mode 'batch' .* needs solver 'broyden', got 'anderson'$"):
        DEQ(Block(), stop_mode="batch")
    with pytest.raises(BenchError, match=r"^fedeq.stop_mode=batch .* needs fedeq.solver=broyden, got 'anderson'$"):
        FeDEQ(FeDEQConfig(model="deq_mlp", stop_mode="batch"), Task("deq_mlp", (4,), 3))


class Block(nn.Module):
    """func(z, x) = tanh(W z + x), a contraction for small W."""

    def __init__(self, d=6):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(d, d, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.lin.weight.mul_(0.5)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


SETTINGS = {"solver": "broyden", "max_iter": 20, "tol": 1e-6, "stop_mode": "batch"}


def by_hand(block, x):
    """deq_seq.py:24-29 without differentiation: z1 = solve from 0, then the solve from f(z1)."""
    f = lambda z: block(z, x)  # noqa: E731
    z1, s1 = solve(f, torch.zeros_like(x), **{k: SETTINGS[k] for k in ("solver", "max_iter", "tol")},
                   stop_mode="batch")
    with torch.no_grad():
        z2, s2 = solve(f, f(z1), "broyden", 20, 1e-6, stop_mode="batch")
    return z1, s1, z2, s2


def test_second_solve_off_returns_z_star_as_before():
    block, x = Block(), torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    layer = DEQ(block, **SETTINGS).eval()
    z1, _, _, _ = by_hand(block, x)
    assert torch.equal(layer(x), z1)


def test_second_solve_where_nothing_is_differentiated():
    block, x = Block(), torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z1, s1, z2, s2 = by_hand(block, x)
    layer = DEQ(block, second_solve=True, **SETTINGS)
    layer.eval()
    assert torch.equal(layer(x), z2)  # evaluation: the reference's rootfind_grad primal body
    assert torch.equal(layer.last_stats["nstep"], s1["nstep"] + s2["nstep"])
    assert torch.equal(layer.last_stats["residual"], s2["residual"])
    layer.train()
    for p in block.parameters():  # the head step: the body frozen, so the custom_vjp runs its primal
        p.requires_grad_(False)
    assert torch.equal(layer(x), z2)


def test_second_solve_leaves_the_differentiated_output_and_gradient_as_before():
    # Under differentiation the reference's rootfind_grad returns f(z1) (dumb_fwd, rootfind.py:59-60):
    # what the implicit backward returns without second_solve.
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    outs = []
    for second in (False, True):
        block = Block()
        layer = DEQ(block, second_solve=second, b_solver="broyden", b_max_iter=20, **SETTINGS).train()
        out = layer(x)
        (g,) = torch.autograd.grad(out.pow(2).sum(), [block.lin.weight])
        outs.append((out.detach(), g, layer.last_backward_stats))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    z1, _, _, _ = by_hand(Block(), x)
    with torch.no_grad():
        assert torch.equal(outs[1][0], Block()(z1, x))
    # stop_mode="batch" makes the Broyden adjoint stop on the batch too (rootfind.py:26-29): one
    # residual for the whole batch, repeated per example.
    stats = outs[1][2]
    assert torch.equal(stats["residual"], stats["residual"][:1].expand(4))
