"""APFL (Algorithm 1): w by SGD on CE(w); v by SGD on CE(alpha v + (1 - alpha) w) w.r.t. v; alpha by
SGD on the same loss, clipped to [0, 1]; w is uploaded, v and alpha stay home; evaluation uses the
parameter mixture."""
import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

from fedeq_bench.core import seeding
from fedeq_bench.methods.apfl import ALPHA, APFL, APFLConfig, V
from fedeq_bench.methods.base import ClientTensors, MethodConfig, Task
from fedeq_bench.methods.fedavg import FedAvg
from fedeq_bench.methods.nets import build_model
from fedeq_bench.methods.train import eval_metrics


def eval_rng(rnd=1, cid=0):
    """The generator the engine hands evaluate() for client `cid` after round `rnd` (bench/loop/backends.py)."""
    return seeding.generator(0, "eval", rnd, cid)


KEYS = ["body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias", "head.weight", "head.bias"]


def make(**kw):
    base = dict(model="mlp", lr=0.1, local_epochs=1, batch_size=8)
    base.update(kw)
    return APFL(APFLConfig(**base), Task("mlp", (4,), 3))


def setup(n=8, seed=0, **kw):
    algo = make(**kw)
    torch.manual_seed(seed)
    ref = build_model("mlp", (4,), 3)
    server = algo.init_server(ref, seeding.generator(0, "server_init"))
    g = torch.Generator().manual_seed(seed + 10)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    return algo, server, ref, ClientTensors(x, y, x[:2], y[:2], x[:4], y[:4])


def local_model(server, seed=5, scale=0.05):
    """A v_i that differs from w (so <v - w, g> is not trivially 0)."""
    g = torch.Generator().manual_seed(seed)
    return {k: t + scale * torch.randn(t.shape, generator=g) for k, t in server.items()}


def test_one_step_by_hand_w_v_and_alpha():
    lr, alpha_lr, alpha0 = 0.1, 0.05, 0.3
    algo, server, ref, d = setup(n=8, lr=lr, alpha_lr=alpha_lr, alpha=alpha0)  # n == batch: one step
    v0 = local_model(server)
    state = {V + k: t for k, t in v0.items()} | {ALPHA: torch.tensor(alpha0, dtype=torch.float64)}
    up, new_state, m = algo.local_update(algo.broadcast(server, 0, 1), state, d, seeding.generator(0, "local", 1, 0))
    assert m["steps"] == 1

    # w: w1 = w0 - lr * grad CE(w0).
    w0 = {k: server[k] for k in KEYS}
    loss_w = F.cross_entropy(ref(d.train_x), d.train_y)
    g_w = dict(zip(KEYS, torch.autograd.grad(loss_w, list(ref.parameters())), strict=True))
    for k in KEYS:
        assert torch.allclose(up[k], w0[k] - lr * g_w[k], atol=1e-6), k

    # v and alpha: differentiate L(v, alpha) = CE(f(x; alpha v + (1 - alpha) w0)) with autograd.
    v = {k: v0[k].clone().requires_grad_(True) for k in KEYS}
    a = torch.tensor(alpha0, requires_grad=True)
    mix = {k: a * v[k] + (1 - a) * w0[k] for k in KEYS}
    loss_mix = F.cross_entropy(functional_call(ref, mix, (d.train_x,)), d.train_y)
    grads = torch.autograd.grad(loss_mix, [v[k] for k in KEYS] + [a])
    g_v, g_a = dict(zip(KEYS, grads[:-1], strict=True)), grads[-1].item()
    for k in KEYS:  # v1 = v0 - lr * alpha * g_mix, i.e. - lr * dL/dv
        assert torch.allclose(new_state[V + k], v0[k] - lr * g_v[k], atol=1e-6), k
    # dL/dalpha = <v0 - w0, g_mix> with g_mix = dL/dv / alpha: the paper's alpha gradient.
    inner = sum(float(((v0[k] - w0[k]) * g_v[k] / alpha0).sum()) for k in KEYS)
    assert math.isclose(g_a, inner, rel_tol=1e-4, abs_tol=1e-9)
    expected_alpha = min(1.0, max(0.0, alpha0 - alpha_lr * g_a))
    assert expected_alpha != alpha0
    assert math.isclose(float(new_state[ALPHA]), expected_alpha, rel_tol=1e-6)
    assert new_state[ALPHA].dtype == torch.float64


def test_alpha_stays_in_0_1_and_is_fixed_without_adaptation():
    for alpha_lr in (1e6, -1e6):  # a huge step either way is clipped onto the interval's ends
        algo, server, _, d = setup(n=24, batch_size=4, local_epochs=3, alpha_lr=alpha_lr)
        state = {V + k: t for k, t in local_model(server).items()} | {ALPHA: torch.tensor(0.5, dtype=torch.float64)}
        _, new_state, m = algo.local_update(algo.broadcast(server, 0, 1), state, d, seeding.generator(0, "local", 1, 0))
        alpha = float(new_state[ALPHA])
        assert 0.0 <= alpha <= 1.0 and alpha in (0.0, 1.0), alpha
        assert m["steps"] == 3 * 6
    algo, server, _, d = setup(n=24, batch_size=4, adaptive_alpha=False, alpha=0.25)
    state = algo.init_client(0, server, None)
    _, new_state, _ = algo.local_update(algo.broadcast(server, 0, 1), state, d, seeding.generator(0, "local", 1, 0))
    assert float(new_state[ALPHA]) == 0.25
    assert not torch.equal(new_state[V + "head.weight"], state[V + "head.weight"])  # v still trains


def test_evaluation_is_the_parameter_mixture():
    algo, server, ref, d = setup(n=16)
    v = local_model(server, scale=0.5)
    down = algo.broadcast(server, 0, 1)
    # alpha = 1: exactly the local model v (1 * v + 0 * w == v).
    ref.load_state_dict(v)
    assert algo.evaluate(down, {V + k: t for k, t in v.items()} | {ALPHA: torch.tensor(1.0, dtype=torch.float64)},
                         d, eval_rng()) == eval_metrics(ref, d)
    # alpha = 0: exactly the global model, i.e. FedAvg's evaluation of w.
    fedavg = FedAvg(MethodConfig(model="mlp", lr=0.1, local_epochs=1, batch_size=8), Task("mlp", (4,), 3))
    state0 = {V + k: t for k, t in v.items()} | {ALPHA: torch.tensor(0.0, dtype=torch.float64)}
    assert algo.evaluate(down, state0, d, eval_rng()) == fedavg.evaluate(down, {}, d, eval_rng())
    # alpha = 0.25: the network with parameters 0.25 v + 0.75 w (not a mixture of outputs).
    ref.load_state_dict({k: 0.25 * v[k] + 0.75 * server[k] for k in server})
    state = {V + k: t for k, t in v.items()} | {ALPHA: torch.tensor(0.25, dtype=torch.float64)}
    got, expected = algo.evaluate(down, state, d, eval_rng()), eval_metrics(ref, d)
    assert got["test_acc"] == expected["test_acc"]
    assert math.isclose(got["test_loss"], expected["test_loss"], rel_tol=1e-6)


def test_upload_is_w_only_and_the_global_step_is_fedavgs():
    cfg = dict(lr=0.1, local_epochs=2, batch_size=4)
    algo, server, _, d = setup(n=12, **cfg)
    state = algo.init_client(0, server, None)
    assert set(state) == {V + k for k in KEYS} | {ALPHA} and float(state[ALPHA]) == 0.5
    assert all(torch.equal(state[V + k], server[k]) for k in KEYS)  # v_i^0 = w^0
    down = algo.broadcast(server, 0, 1)
    up, new_state, _ = algo.local_update(down, state, d, seeding.generator(0, "local", 1, 0))
    assert set(down) == set(KEYS) and set(up) == set(KEYS) | {"num_samples"}
    assert not any(k.startswith(V) or k == ALPHA for k in up)
    fedavg = FedAvg(MethodConfig(model="mlp", **cfg), Task("mlp", (4,), 3))
    ref_up, _, _ = fedavg.local_update(down, {}, d, seeding.generator(0, "local", 1, 0))
    assert all(torch.equal(up[k], ref_up[k]) for k in ref_up)  # same batches, same SGD: bit for bit
    # Server: sum_i n_i w_i / sum_i n_i.
    a = {k: torch.full_like(server[k], 1.0) for k in KEYS} | {"num_samples": torch.tensor(1)}
    b = {k: torch.full_like(server[k], 3.0) for k in KEYS} | {"num_samples": torch.tensor(3)}
    new, _ = algo.aggregate(server, [(0, a), (1, b)], 1)
    assert all(torch.allclose(new[k], torch.full_like(server[k], (1.0 * 1 + 3.0 * 3) / 4)) for k in KEYS)  # 2.5
