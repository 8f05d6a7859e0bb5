"""Local (methods/local.py): each client runs SGD on its own model from w^0 and sends nothing (0 bytes)."""
import pytest
import torch
import torch.nn.functional as F

from bench.experiment import load_dataset
from bench.loop import engine
from bench.loop.backends import SerialBackend
from fedeq_bench.core import seeding
from fedeq_bench.methods.base import ClientTensors, MethodConfig, Task
from fedeq_bench.methods.local import OWN, Local
from fedeq_bench.methods.nets import build_model
from tests.helpers import tiny_config, write_tiny_npz


def eval_rng(rnd=1, cid=0):
    """The generator the engine hands evaluate() for client `cid` after round `rnd` (bench/loop/backends.py)."""
    return seeding.generator(0, "eval", rnd, cid)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_npz(tmp_path_factory.mktemp("d") / "tiny.npz", clients=6)


def test_local_sends_zero_bytes(tiny):
    cfg = tiny_config(tiny, methods="local", rounds=2, fraction=0.5, frac_unseen=0.34)
    ds = load_dataset(cfg, 0)
    res = engine.run_method(cfg, "local", 0, ds, SerialBackend())
    assert len(ds.unseen) == 2 and 0.0 <= res.final["acc/unseen"] <= 1.0  # round(0.34 * 6) held out
    for h in res.history:
        assert h["bytes/up"] == h["bytes/down"] == h["bytes/cumulative"] == 0
    # Every message was empty and an empty message is not sent: 0 bytes, no keys.
    assert len(res.ledger.entries) == 2 * 2 * 2  # 2 rounds x (down, up) x a cohort of 0.5 * 4 = 2
    assert all(e[3] == 0 and e[4] == () for e in res.ledger.entries)
    assert res.ledger.total() == 0 and res.ledger.keys_sent() == set()
    assert (res.params_shared, res.params_personal) == (0, 4 * 200 + 200 + 200 * 200 + 200 + 200 * 3 + 3)


def setup():
    algo = Local(MethodConfig(model="mlp", lr=0.1, local_epochs=1, batch_size=8), Task("mlp", (4,), 3))
    torch.manual_seed(0)
    server = algo.init_server(build_model("mlp", (4,), 3), seeding.generator(0, "server_init"))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    return algo, server, ClientTensors(x, y, x[:2], y[:2], x[:3], y[:3])


def test_each_round_is_one_sgd_step_on_the_clients_own_persistent_model():
    algo, server, d = setup()  # n == batch: one full-batch step per round
    state = algo.init_client(3, server, None)
    assert all(torch.equal(state[OWN + k], server[k]) for k in server)  # every client starts at w^0
    ref = build_model("mlp", (4,), 3)
    ref.load_state_dict(server)
    for rnd in (1, 2):
        up, state, m = algo.local_update(algo.broadcast(server, 3, rnd), state, d,
                                         seeding.generator(0, "local", rnd, 3))
        assert up == {} and m["steps"] == 1
        # By hand: own <- own - lr * dCE/d(own), continuing from last round's own model.
        grads = torch.autograd.grad(F.cross_entropy(ref(d.train_x), d.train_y), list(ref.parameters()))
        with torch.no_grad():
            for p, g in zip(ref.parameters(), grads, strict=True):
                p.sub_(0.1 * g)
        for name, p in ref.named_parameters():
            assert torch.allclose(state[OWN + name], p, atol=1e-6), (rnd, name)
    # The server learns nothing: aggregate keeps w^0, and the broadcast stays empty.
    new, _ = algo.aggregate(server, [(3, up)], 2)
    assert new is server and algo.broadcast(new, 3, 3) == {}


def test_evaluation_uses_the_clients_own_model():
    algo, server, d = setup()
    own = {OWN + k: t.clone() for k, t in server.items()}
    own[OWN + "head.weight"] = torch.zeros(3, 200)
    own[OWN + "head.bias"] = torch.tensor([0.0, 0.0, 1.0])  # predicts class 2 for every input
    assert algo.evaluate({}, own, d, eval_rng())["test_acc"] == float((d.test_y == 2).sum()) / 3


# Final-round numbers of `local` on this file's tiny task (fraction 0.5, 2 of 6 clients held out),
# computed with the code before `participation` existed: the default must keep them.
BEFORE_PARTICIPATION = {"loss/train": (1.1476865410804749, 1.1294620037078857), "acc/unseen": 0.125}


def run_local(tiny, fraction=0.5, **sets):
    cfg = tiny_config(tiny, methods="local", rounds=2, fraction=fraction, frac_unseen=0.34, **sets)
    return engine.run_method(cfg, "local", 0, load_dataset(cfg, 0), SerialBackend())


def test_participation_sampled_is_the_default_and_keeps_the_numbers(tiny):
    res = run_local(tiny)
    assert Local.Config().participation == "sampled"
    # Same machine: equal bit for bit; the tolerance only absorbs another CPU's float rounding.
    assert [h["loss/train"] for h in res.history] == pytest.approx(BEFORE_PARTICIPATION["loss/train"], rel=1e-6)
    assert res.final["acc/unseen"] == BEFORE_PARTICIPATION["acc/unseen"]
    # A cohort of 2 of the 4 training clients per round; this seed's schedule leaves one never sampled.
    assert [h["clients/never_trained"] for h in res.history] == [2, 1]


def test_participation_all_trains_every_client_every_round_at_zero_bytes(tiny):
    res = run_local(tiny, **{"local.participation": "all"})
    ds = load_dataset(tiny_config(tiny, methods="local", rounds=2, fraction=0.5, frac_unseen=0.34), 0)
    train = sorted(ds.train_ids)
    assert len(train) == 4
    # The ledger has a (down, up) row for every training client in both rounds, all of 0 bytes.
    assert sorted((e[0], e[1]) for e in res.ledger.entries if e[2] == "up") == [(r, c) for r in (1, 2) for c in train]
    assert res.ledger.total() == 0 and all(h["bytes/cumulative"] == 0 for h in res.history)
    assert all(h["clients/never_trained"] == 0 and h["mem/peak_train_bytes"] > 0 for h in res.history)
    # Every client trains in both rounds with its own streams ("local", round, cid): exactly what the
    # default gives when the schedule samples everyone (fraction 1), and not what it gives at 0.5.
    full = run_local(tiny, fraction=1.0)
    keys = ("loss/train", *engine.EVAL_METRICS, "acc/unseen")
    for h, f in zip(res.history, full.history, strict=True):
        assert {k: h[k] for k in keys} == {k: f[k] for k in keys}
    assert res.history[-1]["loss/train"] != run_local(tiny).history[-1]["loss/train"]
