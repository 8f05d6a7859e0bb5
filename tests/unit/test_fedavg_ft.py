"""FedAvg-FT (methods/fedavg_ft.py): FedAvg training; evaluation fine-tunes a throwaway copy of w in
the batch order of the generator it is handed; from switch_round on, each client fine-tunes its own
persistent copy and nothing is aggregated."""
import pytest
import torch
import torch.nn.functional as F

from bench.experiment import load_dataset
from bench.loop import engine
from bench.loop.backends import SerialBackend
from fedeq_bench.core import seeding
from fedeq_bench.methods.base import ClientTensors, MethodConfig, Task
from fedeq_bench.methods.fedavg import FedAvg
from fedeq_bench.methods.fedavg_ft import FINETUNE, FT_CLIENTS, OWN, FedAvgFT, FedAvgFTConfig
from fedeq_bench.methods.nets import build_model
from fedeq_bench.methods.train import eval_metrics
from tests.helpers import check_finetuning_follows_rng, tiny_config, write_tiny_npz


def eval_rng(rnd=1, cid=0):
    """The generator the engine hands evaluate() for client `cid` after round `rnd` (bench/loop/backends.py)."""
    return seeding.generator(0, "eval", rnd, cid)


MLP_NAMES = {"body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias", "head.weight", "head.bias"}


def setup(**kw):
    algo = FedAvgFT(FedAvgFTConfig(**{"model": "mlp", "lr": 0.1, "local_epochs": 1, "batch_size": 8, **kw}),
                    Task("mlp", (4,), 3))
    fedavg = FedAvg(MethodConfig(model="mlp", lr=0.1, local_epochs=1, batch_size=8), Task("mlp", (4,), 3))
    torch.manual_seed(0)
    server = algo.init_server(build_model("mlp", (4,), 3), seeding.generator(0, "server_init"))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    return algo, fedavg, server, ClientTensors(x, y, x[:2], y[:2], x[:6], y[:6])


def model(server):
    return {k: server[k] for k in MLP_NAMES}


def sgd_by_hand(server, d, batches, lr=0.1):
    """w, then one SGD step on mean CE per batch of sample indices, in the given order."""
    ref = build_model("mlp", (4,), 3)
    ref.load_state_dict(model(server))
    for idx in batches:
        grads = torch.autograd.grad(F.cross_entropy(ref(d.train_x[idx]), d.train_y[idx]), list(ref.parameters()))
        with torch.no_grad():
            for p, g in zip(ref.parameters(), grads, strict=True):
                p.sub_(lr * g)
    return ref


def test_training_rounds_are_fedavg_bit_for_bit():
    algo, fedavg, server, d = setup()
    down = algo.broadcast(server, 0, 7)
    assert set(down) == MLP_NAMES  # switch_round None: FedAvg's downlink, no extra entry
    state = algo.init_client(0, server, seeding.generator(0, "client_init", 0))
    up, new_state, _ = algo.local_update(down, state, d, seeding.generator(0, "local", 7, 0))
    ref, _, _ = fedavg.local_update(model(server), {}, d, seeding.generator(0, "local", 7, 0))
    assert set(up) == set(ref) and all(torch.equal(up[k], ref[k]) for k in ref)
    assert new_state is state and state == {}  # training keeps nothing: no model, no fine-tuning seed
    new, _ = algo.aggregate(server, [(0, up)], 7)
    assert all(torch.equal(new[k], up[k]) for k in MLP_NAMES)  # one client: the mean is its w_i


def test_evaluation_fine_tunes_a_throwaway_copy_and_keeps_nothing():
    algo, fedavg, server, d = setup(finetune_epochs=1)
    state = algo.init_client(0, server, seeding.generator(0, "client_init", 0))
    down = algo.broadcast(server, 0, 1)
    before = {k: t.clone() for k, t in down.items()}
    m = algo.evaluate(down, state, d, eval_rng())
    # By hand: u = w - lr * dCE/dw on the full batch (n = batch = 8, so one step; order does not matter).
    expected = eval_metrics(sgd_by_hand(server, d, [torch.arange(8)]), d)
    assert m["test_acc"] == expected["test_acc"] and abs(m["test_loss"] - expected["test_loss"]) < 1e-6
    # It differs from FedAvg's evaluation of w itself ...
    plain = fedavg.evaluate(model(server), {}, d, eval_rng())
    assert abs(m["test_loss"] - plain["test_loss"]) > 1e-4
    # ... and leaves nothing behind: same message, same state, the same score when evaluated again.
    assert all(torch.equal(down[k], before[k]) for k in before) and state == {}
    assert algo.evaluate(down, state, d, eval_rng()) == m
    # finetune_epochs = 0 is FedAvg's evaluation exactly.
    algo0, *_ = setup(finetune_epochs=0)
    assert algo0.evaluate(down, state, d, eval_rng()) == plain


def test_evaluation_fine_tunes_in_the_batch_order_of_the_generator_it_is_handed():
    # n = 8, batch 4: two steps, and the result depends on which samples share a batch.
    algo, _, server, d = setup(finetune_epochs=1, batch_size=4)
    state = algo.init_client(0, server, seeding.generator(0, "client_init", 0))
    assert state == {}  # no seed of evaluation's batch order is kept on the client
    down = algo.broadcast(server, 0, 1)

    check_finetuning_follows_rng(algo, down, state, d, lambda batches: sgd_by_hand(server, d, batches))


def test_switch_round_freezes_w_and_clients_keep_their_own_copy():
    algo, _, server, d = setup(switch_round=3)
    state = algo.init_client(4, server, seeding.generator(0, "client_init", 4))
    assert FINETUNE not in algo.broadcast(server, 4, 2)
    down = algo.broadcast(server, 4, 3)  # first fine-tuning round: the final w and the flag
    assert set(down) == MLP_NAMES | {FINETUNE}
    up, state, _ = algo.local_update(down, state, d, seeding.generator(0, "local", 3, 4))
    assert up == {} and set(state) == {OWN + k for k in MLP_NAMES}
    new, _ = algo.aggregate(server, [(4, up)], 3)
    assert all(torch.equal(new[k], server[k]) for k in MLP_NAMES)  # no aggregation any more
    assert new[FT_CLIENTS].tolist() == [4]
    assert algo.broadcast(new, 4, 4) == {} and FINETUNE in algo.broadcast(new, 5, 4)
    # Round 4: nothing received, one more epoch from its own copy (one full-batch step by hand).
    ref = build_model("mlp", (4,), 3)
    ref.load_state_dict({k: state[OWN + k] for k in MLP_NAMES})
    grads = torch.autograd.grad(F.cross_entropy(ref(d.train_x), d.train_y), list(ref.parameters()))
    up, state, _ = algo.local_update({}, state, d, seeding.generator(0, "local", 4, 4))
    assert up == {}
    for (name, p), g in zip(ref.named_parameters(), grads, strict=True):
        assert torch.allclose(state[OWN + name], p.detach() - 0.1 * g, atol=1e-6), name
    # Its evaluation is its own copy, not a fine-tuned copy of w.
    ref.load_state_dict({k: state[OWN + k] for k in MLP_NAMES})
    own = algo.evaluate({}, state, d, eval_rng(4, 4))
    assert own["test_loss"] == pytest.approx(eval_metrics(ref, d)["test_loss"], abs=1e-6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_npz(tmp_path_factory.mktemp("d") / "tiny.npz", clients=6)


def test_engine_bytes_fedavg_before_the_switch_one_flag_at_it_zero_after(tiny):
    cfg = tiny_config(tiny, methods="fedavg_ft", rounds=4, fraction=0.5, **{"fedavg_ft.switch_round": 2})
    ds = load_dataset(cfg, 0)
    res = engine.run_method(cfg, "fedavg_ft", 0, ds, SerialBackend())
    schedule = engine.make_schedule(0, ds.train_ids, 4, 0.5)
    model_bytes = 167396   # 8-byte header + every mlp entry (tests/unit/test_engine.py)
    flag = 2 + len("finetune") + 1 + 1 + 0 + 8 + 1  # a bool scalar entry: 21 bytes
    assert res.history[0]["bytes/down"] == 3 * model_bytes and res.history[0]["bytes/up"] == 3 * (model_bytes + 31)
    have = set()
    for rnd in (2, 3, 4):
        new = [c for c in schedule[rnd - 1] if c not in have]  # clients receiving the final w now
        assert res.history[rnd - 1]["bytes/down"] == len(new) * (model_bytes + flag)
        assert res.history[rnd - 1]["bytes/up"] == 0
        have |= set(new)
    # This schedule repeats clients, so the zero-byte path runs: round 4's cohort all have their copies.
    assert schedule == [[1, 2, 4], [0, 2, 4], [0, 3, 5], [0, 4, 5]] and res.history[3]["bytes/down"] == 0
