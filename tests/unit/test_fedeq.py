"""FeDEQ (methods/fedeq.py): ADMM arithmetic, what stays on the client, solver stats, memory, divergence."""
import pytest
import torch

from fedeq_bench.bench import engine, memory

from fedeq_bench.core import seeding
from fedeq_bench.bench.backends import SerialBackend
from fedeq_bench.core.errors import BenchError
from fedeq_bench.bench.experiment import load_dataset
from fedeq_bench.methods.base import ClientTensors, Task
from fedeq_bench.methods.fedeq import DUAL, HEAD, RESUME, THETA, FeDEQ, FeDEQConfig
from fedeq_bench.methods.nets import build_model
from tests.helpers import tiny_config, write_tiny_npz


def setup(**kw):
    cfg = FeDEQConfig(**{"model": "deq_mlp", "lr": 0.05, "batch_size": 8, "personal_epochs": 1,
                         "shared_epochs": 1, **kw})
    algo = FeDEQ(cfg, Task("deq_mlp", (4,), 3))
    torch.manual_seed(0)
    server = algo.init_server(build_model("deq_mlp", (4,), 3), seeding.generator(0, "server_init"))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)
    return algo, server, ClientTensors(x, y, x[:4], y[:4], x[:8], y[:8])


def names(algo):
    """(body names, trainable body parameter names, head names) of the method's network."""
    body, head = algo.param_split(algo.net)
    params = {n for n, _ in algo.net.named_parameters()}
    return body, [n for n in body if n in params], head


def step(algo, server, state, d, rnd=1, cid=0):
    return algo.local_update(algo.broadcast(server, cid, rnd), state, d, seeding.generator(0, "local", rnd, cid))


def test_dual_is_rho_times_drift_and_zero_without_drift():
    algo, server, d = setup(rho=0.5)
    body, trainable, head = names(algo)
    up, state, _ = step(algo, server, algo.init_client(0, server, None), d)
    for k in trainable:  # from dual = 0: dual <- 0 + rho (theta_i - theta)
        assert torch.allclose(state[DUAL + k], 0.5 * (state[THETA + k] - server[k]))
        assert torch.equal(up[k], state[THETA + k])  # aggregate=mean uploads theta_i itself
    # No representation epochs: theta_i == theta, so every dual stays exactly zero.
    algo, server, d = setup(rho=0.5, shared_epochs=0)
    _, state, _ = step(algo, server, algo.init_client(0, server, None), d)
    assert all(torch.count_nonzero(state[DUAL + k]) == 0 for k in trainable)


def test_mean_plus_dual_uploads_theta_plus_dual_over_rho():
    algo, server, d = setup(rho=0.5, aggregate="mean_plus_dual")
    _, trainable, _ = names(algo)
    up, state, _ = step(algo, server, algo.init_client(0, server, None), d)
    for k in trainable:
        assert torch.allclose(up[k], state[THETA + k] + state[DUAL + k] / 0.5)


def test_large_rho_keeps_theta_i_near_theta():
    def drift(rho):
        algo, server, d = setup(rho=rho, shared_epochs=5, personal_epochs=0)
        _, trainable, _ = names(algo)
        _, state, _ = step(algo, server, algo.init_client(0, server, None), d)
        return sum(float((state[THETA + k] - server[k]).pow(2).sum()) for k in trainable) ** 0.5

    free, tied = drift(0.0), drift(10.0)  # lr * rho = 0.5 < 2: the penalty's SGD is stable
    assert free > 0 and tied < 0.5 * free, (free, tied)


def test_resume_flag_follows_the_last_cohort_and_restart_option():
    algo, server, d = setup(personal_epochs=0, shared_epochs=1)
    server2, _ = algo.aggregate(server, [(0, {k: server[k] for k in names(algo)[0]} | {"num_samples": torch.tensor(1)})], 1)
    assert bool(algo.broadcast(server2, 0, 2)[RESUME]) and not bool(algo.broadcast(server2, 1, 2)[RESUME])
    always, *_ = setup(restart="always")
    assert not bool(always.broadcast(server2, 0, 2)[RESUME])


def test_resuming_client_continues_from_its_own_theta():
    algo, server, d = setup(personal_epochs=0, shared_epochs=0)
    body, _, _ = names(algo)
    state = algo.init_client(0, server, None)
    state.update({THETA + k: server[k] + 1.0 for k in body})  # a theta_i far from theta
    down = algo.broadcast(server, 0, 2)
    down[RESUME] = torch.tensor(True)
    up, _, _ = algo.local_update(down, state, d, seeding.generator(0, "local", 2, 0))
    assert all(torch.equal(up[k], server[k] + 1.0) for k in body)  # zero epochs: theta_i unchanged
    down[RESUME] = torch.tensor(False)
    up, _, _ = algo.local_update(down, state, d, seeding.generator(0, "local", 2, 0))
    assert all(torch.equal(up[k], server[k]) for k in body)        # restarted from theta


def test_reported_residual_is_the_relative_residual_at_the_returned_fixed_point():
    # methods/deq/solvers.py: residual_b = ||f(z)_b - z_b|| / (||f(z)_b|| + 1e-9) at the returned
    # iterate, and deq/residual_max is its max over the call's examples. Broyden returns the iterate
    # z itself (anderson and fixed_point return f(z), where the recomputation would not apply), and
    # the implicit backward applies f once more, with autograd, at exactly that z: record it there.
    # One batch of 24 and no head epochs: the call makes exactly one training solve.
    algo, server, d = setup(solver="broyden", max_iter=2, tol=0.0, personal_epochs=0, shared_epochs=1,
                            batch_size=24)
    at_z = []
    func = algo.net.body.deq.func
    hook = func.register_forward_hook(
        lambda mod, args, out: at_z.append((args[0].detach(), out.detach())) if args[0].requires_grad else None)
    try:
        _, _, metrics = step(algo, server, algo.init_client(0, server, None), d)
    finally:
        hook.remove()
    assert len(at_z) == 1  # one solve, one application at its returned z
    z, fz = at_z[0]
    by_hand = ((fz - z).flatten(1).norm(dim=1) / (fz.flatten(1).norm(dim=1) + 1e-9)).max()
    # 2 Broyden steps from z0 = x leave a residual (~4e-3) far above float32 rounding, so the match
    # means something (anderson's returned f(z) would be off by 17x here).
    assert float(by_hand) > 1e-4
    assert metrics["deq/residual_max"] == pytest.approx(float(by_hand), rel=1e-4)
    assert metrics["deq/unconverged_frac"] == 1.0  # tol 0: no residual is below it


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_npz(tmp_path_factory.mktemp("d") / "tiny.npz", clients=5)


def test_engine_run_never_sends_dual_or_head_and_logs_solver_stats(tiny):
    cfg = tiny_config(tiny, methods="fedeq", frac_unseen=0.2, **{"fedeq.personal_epochs": 1, "fedeq.shared_epochs": 1})
    ds = load_dataset(cfg, 0)
    res = engine.run_method(cfg, "fedeq", 0, ds, SerialBackend())
    assert res.model == "deq_mlp"  # the dataset's DEQ pairing
    sent = res.ledger.keys_sent()
    assert not any(k.startswith((DUAL, HEAD, THETA, "head.")) for k in sent), sent
    assert sent == {k for k in build_model("deq_mlp", (4,), 3).state_dict() if k.startswith("body.")} | \
        {"num_samples", RESUME}
    for h in res.history:
        assert 1 <= h["deq/nstep_mean"] <= 20
        # converged = residual < tol (1e-3, FeDEQConfig's default) per example, so the worst residual
        # is below tol exactly when no example of any client is unconverged.
        assert (h["deq/residual_max"] < 1e-3) == (h["deq/unconverged_frac"] == 0.0), h
        assert 0.0 <= h["deq/unconverged_frac"] <= 1.0 and "acc/unseen" in h


def test_divergence_names_method_round_and_client(tiny):
    cfg = tiny_config(tiny, methods="fedeq", rounds=1, lr=1e6)
    ds = load_dataset(cfg, 0)
    with pytest.raises(BenchError, match=r"^fedeq: round 1, client \d+: ") as e:
        engine.run_method(cfg, "fedeq", 0, ds, SerialBackend())
    assert "\n" not in str(e.value)


def test_local_update_activation_memory_does_not_grow_with_solver_iterations():
    def peak(max_iter):
        algo, server, d = setup(max_iter=max_iter, tol=0.0, backward="jfb", personal_epochs=0)
        state = algo.init_client(0, server, None)
        with memory.MemoryMeter("cpu") as m:
            _, _, metrics = step(algo, server, state, d)
        return m.peak_saved_bytes, m.peak_bytes, metrics["deq/nstep_mean"]

    saved5, peak5, steps5 = peak(5)
    saved50, peak50, steps50 = peak(50)
    # tol 0: the solver ran to max_iter (nstep = the step of the lowest residual, so <= max_iter)
    assert steps5 <= 5 < steps50
    # ... and the forward solve runs without a graph: nothing is saved per iteration.
    assert (saved5, peak5) == (saved50, peak50) and saved5 > 0
