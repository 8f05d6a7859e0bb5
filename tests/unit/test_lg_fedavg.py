"""LG-FedAvg: the global top layers are shared and averaged; the local representation stays home.

The tiny task: 4 features, 3 classes, mlp = body (Linear(4,200) `body.1`, Linear(200,200) `body.3`)
+ head Linear(200,3). Default global_layers = 2: `body.3` and `head` global, `body.1` local."""
import pytest
import torch
import torch.nn.functional as F

from bench.experiment import load_dataset
from bench.loop import engine, wire
from bench.loop.backends import SerialBackend
from fedeq_bench.core import seeding
from fedeq_bench.core.errors import BenchError
from fedeq_bench.methods.base import Task
from fedeq_bench.methods.lg_fedavg import LGFedAvg, LGFedAvgConfig, global_split
from fedeq_bench.methods.nets import build_model
from tests.helpers import eval_rng, method_setup, tiny_config, write_tiny_npz

LOCAL_KEYS = {"body.1.weight", "body.1.bias"}
GLOBAL_KEYS = {"body.3.weight", "body.3.bias", "head.weight", "head.bias"}
# The harness's cnn: body = conv(0), relu, pool, conv(3), relu, pool, flatten, Linear(7), relu; head Linear.
CNN_CONV_KEYS = {"body.0.weight", "body.0.bias", "body.3.weight", "body.3.bias"}
CNN_FC_KEYS = {"body.7.weight", "body.7.bias", "head.weight", "head.bias"}


def setup(lr=0.1, batch=4, epochs=1, n=12, **kw):
    """(algo, server, ref, data): tests/helpers.py's tiny task, data seed 2."""
    return method_setup(LGFedAvg, data_seed=2, n=n, lr=lr, local_epochs=epochs, batch_size=batch, **kw)


def test_the_split_counts_weight_layers_from_the_output_or_the_input():
    mlp, cnn = build_model("mlp", (1, 28, 28), 10), build_model("cnn", (1, 28, 28), 10)
    # Defaults (module docstring): 2 of the mlp's 3 Linear layers, 2 of the cnn's 4 weight layers.
    assert (LGFedAvgConfig().global_layers, LGFedAvgConfig().global_from) == (2, "output")
    shared, local = global_split(mlp, 2)
    assert set(shared) == GLOBAL_KEYS and set(local) == LOCAL_KEYS
    shared, local = global_split(cnn, 2)
    assert set(shared) == CNN_FC_KEYS and set(local) == CNN_CONV_KEYS
    # The authors' CIFAR-10 run shares the two convolutions (CNNCifar.weight_keys order): `input`.
    shared, local = global_split(cnn, 2, "input")
    assert set(shared) == CNN_CONV_KEYS and set(local) == CNN_FC_KEYS
    # k = 1 is the classifier alone; k = all layers shares everything (FedAvg).
    assert set(global_split(mlp, 1)[0]) == {"head.weight", "head.bias"}
    assert global_split(mlp, 3) == (list(mlp.state_dict()), [])
    # Parameter shares on 28x28 inputs (docstring): mlp 2 of 3 layers: (200*200+200 + 200*10+10) /
    # (784*200+200 + 200*200+200 + 200*10+10) = 42210 / 199210; cnn: the two convs (1*32*25+32 +
    # 32*64*25+64) = 52096 of 1663370.
    sd = mlp.state_dict()
    assert sum(sd[k].numel() for k in global_split(mlp, 2)[0]) == 42210
    assert sum(v.numel() for v in sd.values()) == 199210
    sd = cnn.state_dict()
    assert sum(sd[k].numel() for k in CNN_CONV_KEYS) == 52096 and sum(v.numel() for v in sd.values()) == 1663370
    for k in (0, 4):
        with pytest.raises(BenchError, match="between 1 and 3"):
            global_split(mlp, k)


def test_a_broadcast_is_exactly_the_encoded_global_tensors():
    for model, shape, keys in (("mlp", (4,), GLOBAL_KEYS), ("cnn", (1, 8, 8), CNN_FC_KEYS)):
        algo = LGFedAvg(LGFedAvgConfig(model=model, lr=0.1, local_epochs=1, batch_size=4), Task(model, shape, 3))
        torch.manual_seed(0)
        server = algo.init_server(build_model(model, shape, 3), seeding.generator(0, "server_init"))
        down = algo.broadcast(server, 0, 1)
        assert set(down) == keys
        assert len(wire.encode(down)) == len(wire.encode({k: server[k] for k in keys}))
    # mlp by hand (bench/loop/wire.py entry: 2 + len(name) + 1 + 1 + 4 * ndim + 8 + 4 * numel, header 8):
    algo, server, _, _ = setup()
    down = algo.broadcast(server, 0, 1)
    body3 = (2 + 13 + 2 + 8 + 8 + 200 * 200 * 4) + (2 + 11 + 2 + 4 + 8 + 200 * 4)  # 160033 + 827
    head = (2 + 11 + 2 + 8 + 8 + 3 * 200 * 4) + (2 + 9 + 2 + 4 + 8 + 3 * 4)         # 2431 + 37
    assert len(wire.encode(down)) == 8 + body3 + head == 163336


def test_uploads_are_exactly_the_global_keys_and_the_local_layers_stay_in_state():
    algo, server, _, d = setup()
    state = algo.init_client(0, server, None)
    down = algo.broadcast(server, 0, 1)
    up, new_state, _ = algo.local_update(down, state, d, seeding.generator(0, "local", 1, 0))
    assert set(down) == GLOBAL_KEYS
    assert set(up) == GLOBAL_KEYS | {"num_samples"}
    assert set(state) == set(new_state) == LOCAL_KEYS
    shared, personal = algo.param_split(algo.net)
    assert set(shared) == GLOBAL_KEYS and set(personal) == LOCAL_KEYS


def test_global_layers_option_moves_the_cut():
    algo, server, _, d = setup(global_layers=1)
    assert set(algo.broadcast(server, 0, 1)) == {"head.weight", "head.bias"}
    assert set(algo.init_client(0, server, None)) == LOCAL_KEYS | {"body.3.weight", "body.3.bias"}


def test_one_step_moves_local_and_global_layers_together():
    algo, server, ref, d = setup(lr=0.1, batch=8, n=8)  # n == batch: one full-batch step
    # The client's own local layer differs from the server's initial one: the step must start from it.
    state = {k: server[k] + 0.01 for k in LOCAL_KEYS}
    up, new_state, m = algo.local_update(algo.broadcast(server, 0, 1), state, d, seeding.generator(0, "local", 1, 0))
    assert m["steps"] == 1
    with torch.no_grad():
        for k, p in ref.named_parameters():
            if k in LOCAL_KEYS:
                p.copy_(state[k])
    loss = F.cross_entropy(ref(d.train_x), d.train_y)
    names = [n for n, _ in ref.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(loss, list(ref.parameters())), strict=True))
    # p <- p - lr * dCE/dp for local and global layers alike (joint training).
    for name, p in ref.named_parameters():
        got = up[name] if name in GLOBAL_KEYS else new_state[name]
        assert torch.allclose(got, p.detach() - 0.1 * grads[name], atol=1e-6), name


def test_aggregate_averages_global_layers_by_samples_and_never_touches_local_ones():
    algo, server, _, _ = setup()
    a = {k: torch.full_like(server[k], 1.0) for k in GLOBAL_KEYS} | {"num_samples": torch.tensor(1)}
    b = {k: torch.full_like(server[k], 5.0) for k in GLOBAL_KEYS} | {"num_samples": torch.tensor(3)}
    new, _ = algo.aggregate(server, [(0, a), (1, b)], 1)
    for k in GLOBAL_KEYS:
        assert torch.allclose(new[k], torch.full_like(server[k], (1.0 * 1 + 5.0 * 3) / 4))  # 4.0
    assert all(torch.equal(new[k], server[k]) for k in LOCAL_KEYS)


def test_evaluation_uses_own_local_layers_under_the_global_ones():
    algo, server, _, d = setup()
    # Own local layer outputs 0 (zero weight and bias, then ReLU(0) = 0), and the global body.3 has
    # zero bias: its output is ReLU(0) = 0 too, so the logits are the global head's bias alone,
    # which favours class 1.
    local = {k: torch.zeros_like(server[k]) for k in LOCAL_KEYS}
    glob = dict(server, **{"body.3.bias": torch.zeros(200), "head.bias": torch.tensor([0.0, 2.0, 0.0])})
    down = algo.broadcast(glob, 0, 1)
    m = algo.evaluate(down, local, d, eval_rng())
    assert m["test_acc"] == float((d.test_y == 1).sum()) / 4
    # The same global layers on the server's (nonzero) initial local layer: different logits, loss.
    m0 = algo.evaluate(down, algo.init_client(0, server, None), d, eval_rng())
    assert m0["test_loss"] != m["test_loss"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_npz(tmp_path_factory.mktemp("d") / "tiny.npz", clients=6)


def test_engine_counts_exactly_the_global_layers_bytes(tiny):
    cfg = tiny_config(tiny, methods="lg_fedavg")
    res = engine.run_method(cfg, "lg_fedavg", 0, load_dataset(cfg, 0), SerialBackend())
    down = 163336                                                           # the broadcast test above
    up = down + (2 + 11 + 2 + 0 + 8 + 8)                                    # + num_samples 31 = 163367
    for h in res.history:
        assert h["bytes/down"] == 6 * down and h["bytes/up"] == 6 * up
    assert res.ledger.keys_sent() == GLOBAL_KEYS | {"num_samples"}
    assert (res.params_shared, res.params_personal) == (200 * 200 + 200 + 200 * 3 + 3, 4 * 200 + 200)
