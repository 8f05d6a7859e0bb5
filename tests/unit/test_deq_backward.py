"""methods.deq.DEQ: implicit / JFB / phantom gradients, settings, and training memory.

Ground truths: torch.autograd.gradcheck (finite differences, float64) and the gradient of a long
unrolled solve (200 plain iterations of a contraction with autograd: the iteration error is
0.5^200, so its gradient is the implicit one to rounding).
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from bench.loop.memory import PartsMeter
from fedeq_bench.core.errors import BenchError
from fedeq_bench.methods.deq import DEQ, STATS_KEYS, DEQDivergence, solve

F64 = torch.float64


class Cell(nn.Module):
    """f(z, x) = tanh(W z + U x), ||W||_2 = norm, so f is a contraction in z (tanh' <= 1)."""

    def __init__(self, d: int, d_in: int | None = None, norm: float = 0.5, dtype=torch.float32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(d, d, generator=g, dtype=dtype)
        self.W = nn.Parameter(norm * W / torch.linalg.matrix_norm(W, 2))
        self.U = nn.Parameter(torch.randn(d, d_in or d, generator=g, dtype=dtype) / d**0.5)
        self.calls = 0

    def forward(self, z, x):
        self.calls += 1
        return torch.tanh(z @ self.W.T + x @ self.U.T)


def _grads(model: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """All gradients of loss = sum(out * t) (t a fixed pattern) w.r.t. parameters and x, flattened."""
    t = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    ps = [*model.parameters(), x]
    return torch.cat([g.flatten() for g in torch.autograd.grad((out * t).sum(), ps)])


def _unrolled(cell: Cell, x: torch.Tensor, steps: int = 200) -> torch.Tensor:
    """`steps` iterations z <- f(z, x) from z = 0 with autograd (the state has W's size)."""
    z = torch.zeros(x.shape[0], cell.W.shape[0], dtype=x.dtype)
    for _ in range(steps):
        z = cell(z, x)
    return z


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


TIGHT = dict(max_iter=100, tol=1e-13, b_max_iter=100, b_tol=1e-13)


# ------------------------------------------------------------------------------ implicit gradient
def test_implicit_gradient_passes_gradcheck():
    cell = Cell(4, dtype=F64)
    layer = DEQ(cell, solver="broyden", b_solver="broyden", **TIGHT)
    x = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    W = cell.W.detach().clone().requires_grad_()
    U = cell.U.detach().clone().requires_grad_()

    def fn(x, W, U):  # the DEQ as a function of its input and both weights
        cell.W, cell.U = W, U  # plain tensors in place of the Parameters: gradcheck owns them
        return layer(x)

    del cell.W, cell.U
    assert torch.autograd.gradcheck(fn, (x, W, U), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point"])
def test_implicit_gradient_equals_long_unrolled_gradient(solver):
    cell = Cell(6, d_in=5, dtype=F64)
    x = torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    z0 = torch.zeros(4, 6, dtype=F64)  # the state is 6-dim, the input 5-dim
    layer = DEQ(cell, solver=solver, b_solver=solver, **TIGHT)
    implicit = _grads(cell, x, layer(x, z0))
    unrolled = _grads(cell, x, _unrolled(cell, x))
    torch.testing.assert_close(implicit, unrolled, rtol=1e-6, atol=1e-9)
    # The check can fail: the one-step (JFB) gradient misses (I - J)^-T and is far from it.
    jfb = _grads(cell, x, layer.configure(backward="jfb")(x, z0))
    assert (jfb - unrolled).abs().max() > 1e-2
    assert set(layer.last_stats) == set(STATS_KEYS)


def test_implicit_backward_solves_the_adjoint_and_records_its_stats():
    cell = Cell(6, dtype=F64)
    x = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(3))
    layer = DEQ(cell, **TIGHT)
    out = layer(x)
    assert layer.last_backward_stats is None
    v = torch.randn_like(out, generator=torch.Generator().manual_seed(4))
    (gW,) = torch.autograd.grad((out * v).sum(), [cell.W])
    st = layer.last_backward_stats
    assert set(st) == set(STATS_KEYS) and st["converged"].all() and st["residual"].shape == (4,)
    # By hand, per example: J = diag(1 - f^2) W at z* (f = tanh(...) = z*); g = (I - J^T)^-1 v;
    # dL/dW = sum_b (g_b * (1 - z*_b^2)) z*_b^T.
    with torch.no_grad():
        z_star = out
        s = 1 - z_star**2
        J = s[:, :, None] * cell.W[None]  # (B, d, d)
        I = torch.eye(6, dtype=F64)
        g = torch.linalg.solve(I - J.transpose(1, 2), v[:, :, None])[:, :, 0]
        expected = (g * s).T @ z_star
    torch.testing.assert_close(gW, expected, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------------- jfb, phantom
def test_jfb_and_phantom_point_the_implicit_way():
    cell = Cell(8, norm=0.9, dtype=F64)
    x = torch.randn(5, 8, dtype=F64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    layer = DEQ(cell, **TIGHT)
    implicit = _grads(cell, x, layer(x))
    jfb = _grads(cell, x, layer.configure(backward="jfb")(x))
    phantom = _grads(cell, x, layer.configure(backward="phantom")(x))
    assert 0 < _cos(jfb, implicit) < 1 - 1e-6  # an approximation, pointing the same way
    assert 0 < _cos(phantom, implicit) < 1 - 1e-6
    # Phantom's k damped steps sum tau * sum_{i<k} ((1 - tau) I + tau J)^i, a truncated Neumann
    # series of (I - J)^-1: many steps give the implicit gradient.
    many = _grads(cell, x, layer.configure(phantom_steps=300)(x))
    torch.testing.assert_close(many, implicit, rtol=1e-7, atol=1e-9)


def test_jfb_is_the_gradient_of_one_step_from_the_fixed_point():
    cell = Cell(6, dtype=F64)
    x = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(6), requires_grad=True)
    layer = DEQ(cell, backward="jfb", **TIGHT)
    got = _grads(cell, x, layer(x))
    z_star, _ = solve(lambda z: cell(z, x), torch.zeros(3, 6, dtype=F64), "anderson", 100, 1e-13)
    torch.testing.assert_close(got, _grads(cell, x, cell(z_star, x)), rtol=1e-9, atol=1e-12)


def test_phantom_is_damped_unrolling_from_the_fixed_point():
    cell = Cell(6, dtype=F64)
    x = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(7), requires_grad=True)
    layer = DEQ(cell, backward="phantom", phantom_steps=3, phantom_tau=0.25, **TIGHT)
    got = _grads(cell, x, layer(x))
    z, _ = solve(lambda z: cell(z, x), torch.zeros(3, 6, dtype=F64), "anderson", 100, 1e-13)
    for _ in range(3):
        z = 0.75 * z + 0.25 * cell(z, x)
    torch.testing.assert_close(got, _grads(cell, x, z), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backward", ["implicit", "jfb", "phantom"])
def test_conv_and_sequence_states_train(backward):
    # (B, C, H, W) and (B, T, d) states: gradients exist and match the long unrolled ones (implicit).
    g = torch.Generator().manual_seed(8)
    conv = nn.Conv2d(3, 3, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(0.05 * torch.randn(conv.weight.shape, generator=g, dtype=F64))

    class ConvCell(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, z, x):
            return torch.tanh(self.conv(z) + x)

    class SeqCell(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4).double()
            with torch.no_grad():
                self.lin.weight.mul_(0.5 / torch.linalg.matrix_norm(self.lin.weight, 2))

        def forward(self, z, x):
            return torch.tanh(self.lin(z) + x)

    for cell, shape in ((ConvCell(), (2, 3, 5, 5)), (SeqCell(), (2, 7, 4))):
        x = torch.randn(shape, generator=g, dtype=F64, requires_grad=True)
        layer = DEQ(cell, backward=backward, **TIGHT)
        got = _grads(cell, x, layer(x))
        assert torch.isfinite(got).all() and got.abs().sum() > 0
        if backward == "implicit":
            z = torch.zeros(shape, dtype=F64)
            for _ in range(200):
                z = cell(z, x)
            torch.testing.assert_close(got, _grads(cell, x, z), rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------- eval / no_grad, graph
def test_eval_and_no_grad_only_solve():
    cell = Cell(6)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(9))
    layer = DEQ(cell, max_iter=7, tol=0.0)
    z_star, st = solve(lambda z: cell(z, x), torch.zeros(4, 6), "anderson", 7, 0.0)
    for mode in ("eval", "no_grad"):
        cell.calls = 0
        if mode == "eval":
            out = layer.eval()(x)
        else:
            with torch.no_grad():
                out = layer.train()(x)
        assert cell.calls == 7  # the solver's 7 evaluations, no extra application with autograd
        assert not out.requires_grad
        torch.testing.assert_close(out, z_star, rtol=0, atol=0)
        assert torch.equal(layer.last_stats["nstep"], st["nstep"])
    cell.calls = 0
    layer.train()(x)
    assert cell.calls == 8  # training: 7 solver evaluations + 1 with autograd (implicit)


def test_no_leak_and_repeatable_backward():
    # A dropped output frees its graph (no reference cycle through a hook), and backward can run
    # twice with retain_graph (no hook removed on first use).
    cell = Cell(6, dtype=F64)
    x = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(10))
    layer = DEQ(cell, **TIGHT)
    ref = weakref.ref(layer(x))
    gc.collect()
    assert ref() is None
    out = layer(x)
    (first,) = torch.autograd.grad(out.sum(), [cell.W], retain_graph=True)
    (second,) = torch.autograd.grad(out.sum(), [cell.W])
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# ------------------------------------------------------------------------------ configure, errors
def test_configure_validates_and_applies():
    layer = DEQ(Cell(4))
    with pytest.raises(BenchError, match=r"^unknown solver 'andersen'; choose from anderson, broyden, fixed_point$"):
        layer.configure(solver="andersen")
    with pytest.raises(BenchError, match=r"^unknown solver 'newton'; choose from anderson, bicgstab, broyden, fixed_point, gmres, normal_cg$"):
        layer.configure(b_solver="newton")
    with pytest.raises(BenchError, match=r"^unknown solver 'gmres'; choose from anderson, broyden, fixed_point$"):
        layer.configure(solver="gmres")  # a linear solver: only the adjoint is linear
    with pytest.raises(BenchError, match=r"^unknown option 'm' for solver 'normal_cg'; choose from none$"):
        layer.configure(b_solver_kw={"m": 3})
    with pytest.raises(BenchError, match=r"^unknown backward 'ift'; choose from implicit, jfb, phantom$"):
        layer.configure(backward="ift")
    with pytest.raises(BenchError, match=r"^unknown DEQ setting 'f_max_iter'; choose from .*max_iter"):
        layer.configure(f_max_iter=3)
    with pytest.raises(BenchError, match="max_iter must be an int >= 1"):
        layer.configure(max_iter=0)
    with pytest.raises(BenchError, match="phantom_tau must be a number in"):
        layer.configure(phantom_tau=0.0)
    with pytest.raises(BenchError, match="unknown option 'lamda' for solver 'anderson'"):
        layer.configure(solver_kw={"lamda": 1e-3})
    with pytest.raises(BenchError, match="unknown option 'm' for solver 'broyden'"):
        layer.configure(solver="broyden", solver_kw={"m": 3})  # checked against the new solver
    # All or nothing: a failed call changed nothing.
    with pytest.raises(BenchError):
        layer.configure(max_iter=9, backward="nope")
    assert layer.max_iter == 20 and layer.backward == "implicit"
    layer.configure(solver="fixed_point", max_iter=3, tol=0.0, backward="phantom", phantom_steps=2)
    s = layer.settings()
    assert (s["solver"], s["max_iter"], s["tol"], s["backward"], s["phantom_steps"]) == ("fixed_point", 3, 0.0, "phantom", 2)
    layer.func.calls = 0
    layer(torch.zeros(2, 4))
    assert layer.func.calls == 3 + 2  # 3 solver steps, 2 phantom steps
    assert layer.last_stats["nstep"].max() <= 3


def test_backward_divergence_raises_from_backward():
    # f(z, x) = 2 z + x: Broyden finds the (repelling) fixed point z* = -x in a couple of steps, but
    # the adjoint g = 2 g + v by plain iteration from 0 gives g_k = (2^k - 1) v, inf in float32 at
    # k = 128 (v = 1 from a sum).
    class Lin(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(2.0))

        def forward(self, z, x):
            return self.a * z + x

    layer = DEQ(Lin(), solver="broyden", b_solver="fixed_point", b_max_iter=200, b_tol=0.0)
    out = layer(torch.ones(2, 3))
    torch.testing.assert_close(out, -torch.ones(2, 3), rtol=0, atol=1e-5)
    with pytest.raises(DEQDivergence, match=r"^backward \(adjoint\) fixed_point solver diverged: .* evaluation 128$"):
        out.sum().backward()


# ------------------------------------------------------------------------------------- memory
B, D = 32, 64
ACT = B * D * 4  # one (32, 64) float32 activation: 8192 bytes


def _train_step(K: int, backward: str | None) -> tuple[PartsMeter, int]:
    """One step (forward, backward, SGD) of f(z, x) = tanh(W z + U x), W, U: Linear(64, 64, no bias);
    backward=None: the explicit weight-tied network, f applied K times from z = 0 with autograd."""
    torch.manual_seed(0)

    class MLPCell(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Linear(D, D, bias=False)
            self.U = nn.Linear(D, D, bias=False)
            with torch.no_grad():
                self.W.weight.mul_(0.5 / torch.linalg.matrix_norm(self.W.weight, 2))
            self.calls = 0

        def forward(self, z, x):
            self.calls += 1
            return torch.tanh(self.W(z) + self.U(x))

    cell = MLPCell()
    x = torch.randn(B, D)
    model = cell if backward is None else DEQ(cell, max_iter=K, tol=0.0, backward=backward)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with PartsMeter("cpu") as m:
        if backward is None:
            z = torch.zeros(B, D)
            for _ in range(K):
                z = cell(z, x)
        else:
            z = model(x)
        z.pow(2).sum().backward()
        opt.step()
    return m, cell.calls


def test_deq_training_memory_does_not_grow_with_solver_steps():
    # Saved for backward (torch 2.13, per storage): Linear W saves its input, Linear U saves x,
    # tanh saves its output, pow saves its input (the same output storage); weights are parameters.
    # DEQ (implicit, jfb): one application at z*: z* + x + tanh output = 3 activations.
    # Parameters 2 * 64*64*4 = 32768, SGD gradients the same, no optimizer state.
    # The implicit backward's default adjoint (normal_cg) also differentiates one VJP for its J w
    # products (double backward, built once per backward): 2 activations more while it solves,
    # whatever the number of solver steps.
    for backward, saved in (("implicit", 5 * ACT), ("jfb", 3 * ACT)):
        m5, calls5 = _train_step(5, backward)
        m50, calls50 = _train_step(50, backward)
        assert (calls5, calls50) == (5 + 1, 50 + 1)  # tol = 0: every solver step ran, + 1 with autograd
        assert m5.peak_saved_bytes == m50.peak_saved_bytes == saved
        assert m5.peak_bytes == m50.peak_bytes == saved + 2 * 32768
    # Phantom keeps its 5 steps (z_i into W and tanh outputs: 10) + x + the last mix (saved by pow),
    # 12 activations, whatever max_iter is.
    assert _train_step(5, "phantom")[0].peak_saved_bytes == _train_step(50, "phantom")[0].peak_saved_bytes == 12 * ACT


def test_unrolled_training_memory_grows_with_steps():
    # K applications from z0 = 0 with autograd: z0 and every output z_1..z_K (each is the next W
    # input, z_K the pow input) + x = (K + 2) activations: 7 at K = 5, 52 at K = 50.
    m5, _ = _train_step(5, None)
    m50, _ = _train_step(50, None)
    assert m5.peak_saved_bytes == 7 * ACT == 57344
    assert m50.peak_saved_bytes == 52 * ACT == 425984
    assert m50.peak_saved_bytes / m5.peak_saved_bytes == 52 / 7  # ~7.4x for 10x the steps
    assert m50.peak_bytes - m5.peak_bytes == 45 * ACT


def test_frozen_deq_skips_the_backward_solve():
    """With func's parameters frozen and x not requiring grad, no adjoint solve runs (FeDEQ's head step)."""
    import torch
    from torch import nn

    from fedeq_bench.methods.deq import DEQ

    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(8, 8, bias=False)
            nn.init.normal_(self.w.weight, 0, 0.05)

        def forward(self, z, x):
            return torch.tanh(self.w(z) + x)

    layer = DEQ(F(), max_iter=30, tol=1e-6)
    head = nn.Linear(8, 2)
    x = torch.randn(4, 8)
    for p in layer.parameters():
        p.requires_grad_(False)
    layer.last_backward_stats = None
    head(layer(x)).sum().backward()
    assert layer.last_backward_stats is None and head.weight.grad is not None
    for p in layer.parameters():
        p.requires_grad_(True)
    head(layer(x)).sum().backward()
    assert layer.last_backward_stats is not None  # the implicit backward ran once its weights train
