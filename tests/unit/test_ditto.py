"""Ditto (methods/ditto.py): v_i <- v_i - lr (grad CE(v_i) + lam (v_i - w)); w as FedAvg; v_i stays home."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.experiment import load_dataset
from bench.loop import engine
from bench.loop.backends import SerialBackend
from fedeq_bench.core import seeding
from fedeq_bench.methods.base import ClientTensors, MethodConfig, Task
from fedeq_bench.methods.ditto import Ditto, DittoConfig, V
from fedeq_bench.methods.fedavg import FedAvg
from fedeq_bench.methods.local import OWN, Local
from fedeq_bench.methods.nets import build_model
from tests.helpers import tiny_config, trajectory, write_tiny_npz


def eval_rng(rnd=1, cid=0):
    """The generator the engine hands evaluate() for client `cid` after round `rnd` (bench/loop/backends.py)."""
    return seeding.generator(0, "eval", rnd, cid)


MLP_NAMES = {"body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias", "head.weight", "head.bias"}


def data(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    return ClientTensors(x, y, x[:2], y[:2], x[:4], y[:4])


def make(cls=Ditto, cfg_cls=DittoConfig, **kw):
    cfg = cfg_cls(**{"model": "mlp", "lr": 0.1, "local_epochs": 1, "batch_size": 4, **kw})
    algo = cls(cfg, Task("mlp", (4,), 3))
    torch.manual_seed(0)
    server = algo.init_server(build_model("mlp", (4,), 3), seeding.generator(0, "server_init"))
    return algo, server


def ce_grad(W, b, x, y):
    """Gradient of mean CE(x W^T + b, y) by hand: G = (softmax(z) - onehot(y)) / n, dW = G^T x, db = sum_rows G."""
    p = torch.softmax(x @ W.T + b, dim=1)
    G = (p - F.one_hot(y, 3).to(p.dtype)) / len(y)
    return G.T @ x, G.sum(0)


def test_personal_step_adds_lam_times_v_minus_w_to_the_gradient():
    # A linear model, one full-batch step (n = batch = 8): v1 = v - lr * (grad CE(v) + lam * (v - w)).
    d = data(n=8)
    w = {"0.weight": torch.zeros(3, 4), "0.bias": torch.zeros(3)}
    v = {"0.weight": 0.1 * torch.arange(12.0).reshape(3, 4), "0.bias": torch.tensor([0.5, -0.5, 0.0])}
    state = {V + k: t for k, t in v.items()}

    def personal(lam):
        # The scratch network: a tiny linear model, prebuilt (Task's model is not built).
        algo = Ditto(DittoConfig(lr=0.1, local_epochs=1, batch_size=8, lam=lam), Task("mlp", (4,), 3),
                     net=nn.Sequential(nn.Linear(4, 3)))
        up, new, m = algo.local_update(w, state, d, seeding.generator(0, "local", 1, 0))
        assert m["steps"] == 2  # one global step + one personal step
        return new

    gW, gb = ce_grad(v["0.weight"], v["0.bias"], d.train_x, d.train_y)
    new = personal(lam=2.0)
    # w = 0, so v - 0.1 * (g + 2 * (v - 0)) = 0.8 * v - 0.1 * g
    assert torch.allclose(new[V + "0.weight"], 0.8 * v["0.weight"] - 0.1 * gW, atol=1e-6)
    assert torch.allclose(new[V + "0.bias"], 0.8 * v["0.bias"] - 0.1 * gb, atol=1e-6)
    # The penalty's whole effect is -lr * lam * (v - w) = -0.2 * v relative to lam = 0.
    free = personal(lam=0.0)
    assert torch.allclose(new[V + "0.weight"] - free[V + "0.weight"], -0.2 * v["0.weight"], atol=1e-6)
    assert float((new[V + "0.weight"] - free[V + "0.weight"]).abs().max()) > 0.1  # 0.2 * 1.1 = 0.22


def test_upload_is_fedavgs_w_i_bit_for_bit_and_v_stays_in_state():
    algo, server = make(lam=0.5)
    fedavg, _ = make(FedAvg, MethodConfig)
    d = data()
    down = algo.broadcast(server, 0, 1)
    up, state, _ = algo.local_update(down, {}, d, seeding.generator(0, "local", 1, 0))
    ref, _, _ = fedavg.local_update(fedavg.broadcast(server, 0, 1), {}, d, seeding.generator(0, "local", 1, 0))
    assert set(down) == MLP_NAMES and set(up) == MLP_NAMES | {"num_samples"}
    assert not any(k.startswith(V) for k in (*down, *up))
    assert all(torch.equal(up[k], ref[k]) for k in ref)          # the global step is FedAvg's update
    assert set(state) == {V + k for k in MLP_NAMES}                 # v_i: state only
    # v_i started at w and saw the same 3 batches, but the penalty made it differ from w_i.
    assert not torch.equal(state[V + "head.weight"], up["head.weight"])


def test_lam_zero_trains_v_exactly_as_local_over_two_rounds():
    def run(lam):
        ditto, server = make(lam=lam)
        local, lserver = make(Local, MethodConfig)
        d = data()
        dstate, lstate = {}, local.init_client(0, lserver, None)
        for rnd in (1, 2):
            down = ditto.broadcast(server, 0, rnd)
            up, dstate, _ = ditto.local_update(down, dstate, d, seeding.generator(0, "local", rnd, 0))
            _, lstate, _ = local.local_update({}, lstate, d, seeding.generator(0, "local", rnd, 0))
            # The server moves w between rounds (a second client with other weights), so w^2 != v_i.
            other = {k: t + 0.01 for k, t in server.items()} | {"num_samples": torch.tensor(12)}
            server, _ = ditto.aggregate(server, [(0, up), (1, other)], rnd)
        return [torch.equal(dstate[V + k], lstate[OWN + k]) for k in MLP_NAMES]

    assert all(run(lam=0.0))      # same init (w^0), same batches, no penalty: identical tensors
    assert not all(run(lam=0.1))  # the penalty is what makes Ditto differ from local


def test_evaluation_uses_v_and_a_client_without_v_uses_w():
    algo, server = make()
    d = data()
    down = algo.broadcast(server, 0, 1)
    v = {V + k: t.clone() for k, t in server.items()}
    v[V + "head.weight"] = torch.zeros(3, 200)
    v[V + "head.bias"] = torch.tensor([0.0, 0.0, 1.0])  # predicts class 2 for every input
    assert algo.evaluate(down, v, d, eval_rng())["test_acc"] == float((d.test_y == 2).sum()) / 4
    fedavg, _ = make(FedAvg, MethodConfig)
    assert algo.evaluate(down, {}, d, eval_rng()) == fedavg.evaluate(down, {}, d, eval_rng())


def test_held_out_client_starts_v_from_final_w_and_takes_the_personal_step():
    algo, server = make(lam=0.5)
    d = data()
    down = algo.broadcast(server, 0, 3)
    state = algo.personalize(down, {}, d, seeding.generator(0, "personalize", 1, 0))
    # Same as a first local update's v_i: v <- w, then personal_epochs against w (same stream).
    _, ref, _ = algo.local_update(down, {}, d, seeding.generator(0, "personalize", 1, 0))
    assert set(state) == set(ref) and all(torch.equal(state[k], ref[k]) for k in ref)
    assert not torch.equal(state[V + "head.weight"], server["head.weight"])
    # personal_epochs = 0: v is the final w itself.
    algo0, _ = make(personal_epochs=0)
    state0 = algo0.personalize(down, {}, d, seeding.generator(0, "personalize", 1, 0))
    assert all(torch.equal(state0[V + k], server[k]) for k in server)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_npz(tmp_path_factory.mktemp("d") / "tiny.npz", clients=6)


def test_engine_ditto_never_sends_v_and_with_lam_zero_scores_as_local(tiny):
    results = {}
    for method, sets in (("ditto", {"ditto.lam": 0.0}), ("local", {})):
        cfg = tiny_config(tiny, methods=method, rounds=2, **sets)  # fraction 1: everyone starts at w^0
        ds = load_dataset(cfg, 0)
        results[method] = engine.run_method(cfg, method, 0, ds, SerialBackend())
    ditto, local = results["ditto"], results["local"]
    # What crossed the wire: w and n_i only, FedAvg's bytes (6 clients x (8-byte header + entries)).
    assert ditto.ledger.keys_sent() == MLP_NAMES | {"num_samples"}
    assert not any(k.startswith(V) for e in ditto.ledger.entries for k in e[4])
    assert ditto.history[0]["bytes/down"] == 6 * 167396 and ditto.history[0]["bytes/up"] == 6 * 167427
    # Personalized accuracy is v_i's; with lam = 0, v_i is local's model, so every score matches.
    for dh, lh in zip(ditto.history, local.history, strict=True):
        assert {k: dh[k] for k in engine.EVAL_METRICS} == {k: lh[k] for k in engine.EVAL_METRICS}


# tests/helpers.py `trajectory(Ditto)`, recorded from the code before personal_init and unseen existed.
BEFORE_OPTIONS = {"up1": 18.900714854827697, "state1": 6.990489578295637, "loss1": 1.06716055671374,
                  "up2": 20.540440372958187, "state2": 8.542398390633025, "loss2": 0.9226542264223099,
                  "eval": 0.7447540760040283, "personalized": 11.072966258577708, "eval_unseen": 0.6043230295181274}


def test_default_options_keep_the_numbers():
    assert (DittoConfig().personal_init, DittoConfig().unseen) == ("persist", "personalize")
    # Same machine: equal bit for bit; the tolerance only absorbs another CPU's float rounding.
    assert trajectory(Ditto) == pytest.approx(BEFORE_OPTIONS, rel=1e-6)
    assert trajectory(Ditto, personal_init="global") != pytest.approx(BEFORE_OPTIONS, rel=1e-6)


def test_personal_init_global_restarts_v_from_the_just_trained_global_copy():
    # A linear model, one full-batch step each (n = batch = 8), by hand:
    #   global step   w_i = w - lr * g(w)
    #   personal step v   = w_i - lr * (g(w_i) + lam * (w_i - w))     (from w_i, not from the old v_i)
    d = data(n=8)
    w = {"0.weight": 0.05 * torch.arange(12.0).reshape(3, 4), "0.bias": torch.tensor([0.2, -0.1, 0.0])}
    old_v = {V + "0.weight": torch.full((3, 4), 9.0), V + "0.bias": torch.full((3,), 9.0)}
    algo = Ditto(DittoConfig(lr=0.1, local_epochs=1, batch_size=8, lam=2.0, personal_init="global"),
                 Task("mlp", (4,), 3), net=nn.Sequential(nn.Linear(4, 3)))
    up, new, m = algo.local_update(w, old_v, d, seeding.generator(0, "local", 1, 0))
    assert m["steps"] == 2
    gW, gb = ce_grad(w["0.weight"], w["0.bias"], d.train_x, d.train_y)
    wi_W, wi_b = w["0.weight"] - 0.1 * gW, w["0.bias"] - 0.1 * gb
    assert torch.allclose(up["0.weight"], wi_W, atol=1e-6) and torch.allclose(up["0.bias"], wi_b, atol=1e-6)
    hW, hb = ce_grad(wi_W, wi_b, d.train_x, d.train_y)
    assert torch.allclose(new[V + "0.weight"], wi_W - 0.1 * (hW + 2.0 * (wi_W - w["0.weight"])), atol=1e-6)
    assert torch.allclose(new[V + "0.bias"], wi_b - 0.1 * (hb + 2.0 * (wi_b - w["0.bias"])), atol=1e-6)
    # The old v_i plays no part: the same update without one.
    _, fresh, _ = algo.local_update(w, {}, d, seeding.generator(0, "local", 1, 0))
    assert all(torch.equal(fresh[k], new[k]) for k in new)


def test_unseen_global_scores_the_final_w_as_fedavg_does():
    algo, server = make(unseen="global")
    d = data()
    down = algo.broadcast(server, 5, 3)
    assert algo.personalize(down, {}, d, seeding.generator(0, "personalize", 1, 5)) == {}  # nothing trained
    fedavg, _ = make(FedAvg, MethodConfig)
    assert algo.evaluate(down, {}, d, eval_rng()) == fedavg.evaluate(down, {}, d, eval_rng())
    # personal_init = "global" with the default unseen: the v one whole local update leaves.
    g, _ = make(personal_init="global")
    _, ref, _ = g.local_update(down, {}, d, seeding.generator(0, "personalize", 1, 5))
    got = g.personalize(down, {}, d, seeding.generator(0, "personalize", 1, 5))
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_engine_unseen_global_gives_fedavgs_held_out_accuracy(tiny):
    """Ditto's w is FedAvg's bit for bit, and FedAvg scores held-out clients with w: so must Ditto
    with unseen = "global" (and not with the default, which trains v on this task)."""
    runs = {}
    for name, method, sets in (("global", "ditto", {"ditto.unseen": "global"}), ("default", "ditto", {}),
                               ("fedavg", "fedavg", {})):
        cfg = tiny_config(tiny, methods=method, rounds=2, fraction=0.5, frac_unseen=0.34, **sets)
        runs[name] = engine.run_method(cfg, method, 0, load_dataset(cfg, 0), SerialBackend()).final
    assert runs["global"]["acc/unseen"] == runs["fedavg"]["acc/unseen"]
    assert runs["default"]["acc/unseen"] != runs["fedavg"]["acc/unseen"]
