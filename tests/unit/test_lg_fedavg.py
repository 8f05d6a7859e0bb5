"""LG-FedAvg: the head (global layers) is shared and averaged; the body (local representation) stays home."""
import pytest
import torch
import torch.nn.functional as F

from fedeq_bench.bench import engine

from fedeq_bench.core import seeding
from fedeq_bench.bench.backends import SerialBackend
from fedeq_bench.bench.experiment import load_dataset
from fedeq_bench.methods.base import ClientTensors, MethodConfig, Task
from fedeq_bench.methods.lg_fedavg import LGFedAvg
from fedeq_bench.methods.nets import build_model
from tests.helpers import tiny_config, write_tiny_npz


def eval_rng(rnd=1, cid=0):
    """The generator the engine hands evaluate() for client `cid` after round `rnd` (bench/backends.py)."""
    return seeding.generator(0, "eval", rnd, cid)


BODY_KEYS = {"body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias"}
HEAD_KEYS = {"head.weight", "head.bias"}


def setup(lr=0.1, batch=4, epochs=1, n=12):
    algo = LGFedAvg(MethodConfig(model="mlp", lr=lr, local_epochs=epochs, batch_size=batch), Task("mlp", (4,), 3))
    torch.manual_seed(0)
    ref = build_model("mlp", (4,), 3)
    server = algo.init_server(ref, seeding.generator(0, "server_init"))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    return algo, server, ref, ClientTensors(x, y, x[:2], y[:2], x[:4], y[:4])


def test_uploads_are_exactly_the_head_keys_and_the_body_stays_in_state():
    algo, server, _, d = setup()
    state = algo.init_client(0, server, None)
    down = algo.broadcast(server, 0, 1)
    up, new_state, _ = algo.local_update(down, state, d, seeding.generator(0, "local", 1, 0))
    assert set(down) == HEAD_KEYS
    assert set(up) == HEAD_KEYS | {"num_samples"}
    assert set(state) == set(new_state) == BODY_KEYS
    shared, personal = algo.param_split(algo.net)
    assert set(shared) == HEAD_KEYS and set(personal) == BODY_KEYS


def test_one_step_moves_local_body_and_global_head_together():
    algo, server, ref, d = setup(lr=0.1, batch=8, n=8)  # n == batch: one full-batch step
    # The client's own body differs from the server's initial one: the step must start from it.
    state = {k: server[k] + 0.01 for k in BODY_KEYS}
    up, new_state, m = algo.local_update(algo.broadcast(server, 0, 1), state, d, seeding.generator(0, "local", 1, 0))
    assert m["steps"] == 1
    with torch.no_grad():
        for k, p in ref.named_parameters():
            if k in BODY_KEYS:
                p.copy_(state[k])
    loss = F.cross_entropy(ref(d.train_x), d.train_y)
    names = [n for n, _ in ref.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(loss, list(ref.parameters()))))
    # p <- p - lr * dCE/dp for body and head alike (joint training).
    for name, p in ref.named_parameters():
        got = up[name] if name in HEAD_KEYS else new_state[name]
        assert torch.allclose(got, p.detach() - 0.1 * grads[name], atol=1e-6), name


def test_aggregate_averages_heads_by_samples_and_never_touches_bodies():
    algo, server, _, _ = setup()
    a = {k: torch.full_like(server[k], 1.0) for k in HEAD_KEYS} | {"num_samples": torch.tensor(1)}
    b = {k: torch.full_like(server[k], 5.0) for k in HEAD_KEYS} | {"num_samples": torch.tensor(3)}
    new, _ = algo.aggregate(server, [(0, a), (1, b)], 1)
    for k in HEAD_KEYS:
        assert torch.allclose(new[k], torch.full_like(server[k], (1.0 * 1 + 5.0 * 3) / 4))  # 4.0
    assert all(torch.equal(new[k], server[k]) for k in BODY_KEYS)


def test_evaluation_uses_own_body_under_the_global_head():
    algo, server, _, d = setup()
    # Own body whose last layer outputs 0 (zero weight and bias, then ReLU(0) = 0): the logits are
    # the global head's bias alone, which favours class 1.
    body = {k: server[k].clone() for k in BODY_KEYS}
    body["body.3.weight"].zero_()
    body["body.3.bias"].zero_()
    down = algo.broadcast(dict(server, **{"head.bias": torch.tensor([0.0, 2.0, 0.0])}), 0, 1)
    m = algo.evaluate(down, body, d, eval_rng())
    assert m["test_acc"] == float((d.test_y == 1).sum()) / 4
    # The same global head on the server's (nonzero) initial body: different logits, different loss.
    m0 = algo.evaluate(down, algo.init_client(0, server, None), d, eval_rng())
    assert m0["test_loss"] != m["test_loss"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_npz(tmp_path_factory.mktemp("d") / "tiny.npz", clients=6)


def test_engine_counts_exactly_the_head_bytes(tiny):
    cfg = tiny_config(tiny, methods="lg_fedavg")
    res = engine.run_method(cfg, "lg_fedavg", 0, load_dataset(cfg, 0), SerialBackend())
    # bench/wire.py entry: 2 + len(name) + 1 + 1 + 4 * ndim + 8 + 4 * numel (float32).
    head = (2 + 11 + 2 + 8 + 8 + 3 * 200 * 4) + (2 + 9 + 2 + 4 + 8 + 3 * 4)   # head.weight 2431 + head.bias 37
    down = 8 + head                                                        # 2476
    up = down + (2 + 11 + 2 + 0 + 8 + 8)                                    # + num_samples 31 = 2507
    assert (down, up) == (2476, 2507)
    for h in res.history:
        assert h["bytes/down"] == 6 * down and h["bytes/up"] == 6 * up
    assert res.ledger.keys_sent() == HEAD_KEYS | {"num_samples"}
    assert (res.params_shared, res.params_personal) == (200 * 3 + 3, 4 * 200 + 200 + 200 * 200 + 200)
