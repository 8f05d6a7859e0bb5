"""FeDEQ (methods/fedeq.py): ADMM arithmetic, what stays on the client, solver stats, memory, divergence."""
import pytest
import torch

from bench.experiment import load_dataset
from bench.loop import engine, memory
from bench.loop.backends import SerialBackend
from fedeq_bench.core import seeding
from fedeq_bench.core.errors import BenchError
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
                            batch_size=24, stop_mode="rel")
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
        with memory.PartsMeter("cpu") as m:
            _, _, metrics = step(algo, server, state, d)
        return m.peak_saved_bytes, m.peak_bytes, metrics["deq/nstep_mean"]

    saved5, peak5, steps5 = peak(5)
    saved50, peak50, steps50 = peak(50)
    # tol 0: the solver ran to max_iter (nstep = the step of the lowest residual, so <= max_iter)
    assert steps5 <= 5 < steps50
    # ... and the forward solve runs without a graph: nothing is saved per iteration.
    assert (saved5, peak5) == (saved50, peak50) and saved5 > 0


# ------------------------------------------------------------------------------ the reference's solve
def test_forward_solve_defaults_to_the_reference_rule_and_options_reach_the_layer():
    algo, _, _ = setup()
    deq = algo.net.body.deq
    assert (deq.stop_mode, deq.solver, deq.max_iter, deq.tol) == ("abs", "anderson", 20, 1e-3)
    assert deq.solver_kw == {"variant": "reference"}
    algo, _, _ = setup(stop_mode="rel", anderson_variant="torchdeq")
    assert algo.net.body.deq.stop_mode == "rel" and algo.net.body.deq.solver_kw == {"variant": "torchdeq"}
    algo, _, _ = setup(solver="broyden")  # the variant is Anderson's option only
    assert algo.net.body.deq.solver_kw == {}


def test_abs_stop_mode_reports_the_abs_residual_and_takes_more_steps_than_rel():
    # deq_mlp's state has ||f(z)|| ~ sqrt(128) * softplus(.) >> 1, so ||f - z|| <= 1e-3 is tighter
    # than ||f - z|| / ||f|| <= 1e-3: more steps. Recorded at the implicit backward's one
    # application of f at the returned z (as the test above): anderson-reference returns f(x_k),
    # so the abs residual there is ||f(f(x_k)) - f(x_k)||, at most the Lipschitz constant times the
    # solver's own ||f(x_k) - x_k||; we check the solver's stat is the abs residual at x_k instead,
    # by hand, through a hook that sees every evaluation of f.
    algo, server, d = setup(tol=1e-3, personal_epochs=0, shared_epochs=1, batch_size=24)
    calls = []
    hook = algo.net.body.deq.func.register_forward_hook(
        lambda mod, args, out: calls.append((args[0].detach().clone(), out.detach().clone())))
    try:
        _, _, m_abs = step(algo, server, algo.init_client(0, server, None), d)
    finally:
        hook.remove()
    # The solver's calls (no grad) come first; its last one is at the returned step of the slowest
    # example. The worst example's residual is the max over examples at their own stop.
    solver_calls = calls[:-1]  # the last call is the implicit backward's application with autograd
    r = [(fz - z).norm(dim=1) for z, fz in solver_calls]
    assert m_abs["deq/nstep_mean"] <= len(solver_calls) <= 20
    worst_at_stop = max(float(r[int(k) - 1][b]) for b, k in enumerate(algo_nsteps(algo, server, d)))
    assert m_abs["deq/residual_max"] == pytest.approx(worst_at_stop, rel=1e-5)
    algo_rel, server, d = setup(tol=1e-3, personal_epochs=0, shared_epochs=1, batch_size=24, stop_mode="rel")
    _, _, m_rel = step(algo_rel, server, algo_rel.init_client(0, server, None), d)
    assert m_abs["deq/nstep_mean"] > m_rel["deq/nstep_mean"], (m_abs, m_rel)


def algo_nsteps(algo, server, d):
    """Per-example step counts of the same single solve (re-run, deterministic)."""
    from fedeq_bench.methods.deq import solve

    net = algo.net
    load_all(net, server)
    x = net.body.linear_x(d.train_x.flatten(1)).detach()
    _, st = solve(lambda z: net.body.deq.func(z, x), x, "anderson", 20, 1e-3, stop_mode="abs", variant="reference")
    return st["nstep"].tolist()


def load_all(net, tensors):
    from fedeq_bench.methods.train import load

    load(net, {k: v for k, v in tensors.items() if k in net.state_dict()})


# --------------------------------------------------------------------------------- z* once a round
@pytest.mark.parametrize("solver_kw", [{}, {"tol": 0.0}])
def test_cached_head_features_give_the_same_update_as_recomputing(solver_kw):
    # deq_mlp's body has no batch statistics or dropout and the reference Anderson solves each
    # example alone: training the head on z* computed once equals recomputing it every batch.
    ups, states = [], []
    for cache in (True, False):
        algo, server, d = setup(personal_epochs=3, shared_epochs=1, batch_size=5, cache_head_features=cache,
                                **solver_kw)
        assert algo._body_is_batch_free(algo.net)
        up, state, _ = step(algo, server, algo.init_client(0, server, None), d)
        ups.append(up), states.append(state)
    _, _, head = names(algo)
    for k in states[0]:
        assert torch.allclose(states[0][k], states[1][k], rtol=1e-5, atol=1e-6), k
    assert any(not torch.equal(states[0][HEAD + k], server[k]) for k in head)  # the head did train
    for k in ups[0]:
        assert torch.allclose(ups[0][k].float(), ups[1][k].float(), rtol=1e-5, atol=1e-6), k


def test_cache_is_not_used_where_the_body_has_batch_statistics_or_batch_wide_stopping():
    algo, _, _ = setup(anderson_variant="torchdeq")
    assert not algo._body_is_batch_free(algo.net)  # batch-wide stop
    res = FeDEQ(FeDEQConfig(model="deq_resnet_s"), Task("deq_resnet_s", (1, 28, 28), 10))
    assert not res._body_is_batch_free(res.net)    # BatchNorm in the stem and the FC block
    # The transformers draw dropout in code (F.dropout at the layer's `dropout` rate, 0.1), not through
    # nn.Dropout modules: a cached z* would freeze one mask for every epoch. (It also returns a tuple.)
    tf = FeDEQ(FeDEQConfig(model="deq_transformer"), Task("deq_transformer", (80,), 90))
    assert not tf._body_is_batch_free(tf.net)


# ------------------------------------------------------------------------- held-out clients, options
def _bn_method(**kw):
    """FeDEQ over a tiny explicit body with BatchNorm (what the DEQ-ResNet's body carries)."""
    from torch import nn

    from fedeq_bench.methods.nets import BodyHead

    torch.manual_seed(0)
    net = BodyHead(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)), nn.Linear(6, 3))
    cfg = FeDEQConfig(**{"model": "deq_mlp", "lr": 0.05, "batch_size": 24, "personal_epochs": 1,
                         "shared_epochs": 1, **kw})
    algo = FeDEQ(cfg, Task("deq_mlp", (4,), 3), net=net)
    server = algo.init_server(net, None)
    return algo, server


def test_held_out_client_keeps_the_norm_statistics_its_head_training_updated():
    algo, server = _bn_method()
    _, _, d = setup()
    down = algo.broadcast(server, 0, 1)
    state = algo.personalize(down, algo.init_client(0, server, None), d, seeding.generator(0, "personalize", 0))
    # One epoch, one batch of all 24 examples, BN momentum 0.1 from running_mean = 0:
    #   running_mean = 0.9 * 0 + 0.1 * mean_b(Linear(x_b))   (the body's Linear is not trained)
    lin = algo.net.body[0]
    with torch.no_grad():
        by_hand = 0.1 * (d.train_x @ server["body.0.weight"].T + server["body.0.bias"]).mean(0)
    assert torch.allclose(state["norm.body.1.running_mean"], by_hand, atol=1e-6)
    assert lin is algo.net.body[0]
    # Evaluation uses them (not the server's running_mean = 0).
    algo.evaluate(down, state, d, None)
    assert torch.equal(algo.net.body[1].running_mean, state["norm.body.1.running_mean"])
    assert torch.count_nonzero(server["body.1.running_mean"]) == 0


def test_dual_starts_at_dual_init():
    algo, server, d = setup(rho=0.5, dual_init=0.001)
    _, trainable, _ = names(algo)
    _, state, _ = step(algo, server, algo.init_client(0, server, None), d)
    for k in trainable:  # dual <- 0.001 + rho (theta_i - theta)
        assert torch.allclose(state[DUAL + k], 0.001 + 0.5 * (state[THETA + k] - server[k]))


def test_uniform_server_weights_average_the_cohort_plainly():
    algo, server, _ = setup(server_weights="uniform")
    body = names(algo)[0]
    k = names(algo)[1][0]
    r0 = {b: server[b] for b in body} | {"num_samples": torch.tensor(1)}
    r1 = {b: server[b] + 1.0 if b == k else server[b] for b in body} | {"num_samples": torch.tensor(3)}
    new, _ = algo.aggregate(server, [(0, r0), (1, r1)], 1)
    assert torch.allclose(new[k], server[k] + 0.5)       # (0 + 1) / 2, not (0 * 1 + 1 * 3) / 4
    algo, server, _ = setup()
    new, _ = algo.aggregate(server, [(0, r0), (1, r1)], 1)
    assert torch.allclose(new[k], server[k] + 0.75)      # samples: 3 / 4


def test_token_penalty_scale_divides_the_penalty_by_the_batch_token_count():
    # Inputs as token ids with some padding (id 0). One batch holding all 24 examples, so every
    # step's token count is T = number of ids > 0. Dividing the penalty by T equals using rho / T
    # and dual / T in the unscaled form: the same theta_i (the dual step itself is not scaled).
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 5, (24, 4), generator=g).float()
    y = torch.randint(0, 3, (24,), generator=g)
    d = ClientTensors(x, y, x[:4], y[:4], x[:8], y[:8])
    T = int((x > 0).sum())
    assert 0 < T < x.numel()
    thetas = []
    for kw in ({"penalty_scale": "tokens", "rho": 2.0, "dual_init": 0.5},
               {"penalty_scale": "none", "rho": 2.0 / T, "dual_init": 0.5 / T}):
        algo, server, _ = setup(batch_size=24, personal_epochs=0, shared_epochs=3, **kw)
        _, state, _ = step(algo, server, algo.init_client(0, server, None), d)
        thetas.append(state)
    _, trainable, _ = names(algo)
    for k in trainable:
        assert torch.allclose(thetas[0][THETA + k], thetas[1][THETA + k], rtol=1e-5, atol=1e-7), k
    free, _, _ = setup(batch_size=24, personal_epochs=0, shared_epochs=3, rho=2.0, dual_init=0.5)
    _, st_free, _ = step(free, server, free.init_client(0, server, None), d)
    assert any(not torch.allclose(st_free[THETA + k], thetas[0][THETA + k]) for k in trainable)
    # Image-shaped inputs have no tokens: a clear error.
    algo, server, d = setup(penalty_scale="tokens")
    img = ClientTensors(d.train_x[:, None, :], d.train_y, d.test_x, d.test_y, d.val_x, d.val_y)
    with pytest.raises(BenchError, match="penalty_scale=tokens needs token-id inputs"):
        step(algo, server, algo.init_client(0, server, None), img)


def test_by_default_the_body_never_sees_more_than_a_batch():
    """The default (no head-feature cache, as the reference) runs the body on one mini-batch at a time,
    so the metered peak follows the batch; the cache runs it once over the client's whole data (all n
    rows at once), the memory a device would then need. Batch 5 against the client's n > 5 examples."""
    from fedeq_bench.methods.nets import body_of

    seen = {}
    for cache in (None, True):
        kw = {} if cache is None else {"cache_head_features": cache}
        algo, server, d = setup(personal_epochs=2, shared_epochs=1, batch_size=5, **kw)
        rows: list[int] = []
        handle = body_of(algo.net).register_forward_pre_hook(lambda mod, args, rows=rows: rows.append(args[0].shape[0]))
        step(algo, server, algo.init_client(0, server, None), d)
        handle.remove()
        seen[cache] = max(rows)
    assert seen[None] == 5
    assert seen[True] > 5
