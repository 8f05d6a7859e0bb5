"""pytest-benchmark over the harness's hot paths (not part of `make test`: pyproject's addopts skip
benchmarks; `make bench` runs them and compares with the last saved run).

    encode / decode      a ResNet-34-sized message (21.3 M float32 parameters, ~85 MB on the wire)
    local_update         one local update (1 epoch, 64 samples, batch 32) of every method on `mlp`
    deq forward+backward one step of `deq_resnet_s` on a batch of 32 32x32x3 images
    fedeq_update         one FeDEQ local update (3 personal + 5 shared epochs, batch 10) on deq_mlp
                         (480 samples) and deq_resnet_s (40), and FedRep on the paired explicit model
                         (mlp, resnet20) at equal epochs (bench/perf/workloads.py, `python -m bench.perf
                         --method fedeq`)
    aggregate            FedAvg's server step over 100 replies of `mlp`

Each benchmark also asserts what it computed, so a broken hot path fails instead of timing garbage.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.loop import wire
from fedeq_bench.core import seeding
from fedeq_bench.core.types import ClientTensors, Task
from fedeq_bench.methods import METHODS
from fedeq_bench.methods.base import NUM_SAMPLES
from fedeq_bench.methods.nets import build_model

SHAPE, CLASSES = (1, 28, 28), 10


@pytest.fixture(autouse=True)
def one_thread():
    """Benchmarks compare across runs: pin the thread count so a busy core count does not move them."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def resnet34_message():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_model("resnet34", (3, 32, 32), 100)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_encode_resnet34(benchmark, resnet34_message):
    buf = benchmark(wire.encode, resnet34_message)
    payload = sum(t.numel() * t.element_size() for t in resnet34_message.values())
    assert payload < len(buf) < payload + 100 * len(resnet34_message)  # tensor bytes plus small headers


def test_decode_resnet34(benchmark, resnet34_message):
    buf = wire.encode(resnet34_message)
    out = benchmark(wire.decode, buf)
    assert out.keys() == resnet34_message.keys()
    assert all(torch.equal(out[k], resnet34_message[k]) for k in out)


def client_data(n=64, seed=0) -> ClientTensors:
    g = seeding.generator(seed, "perf")
    x = torch.rand(n, *SHAPE, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return ClientTensors(x, y, x[:8], y[:8], x[:16], y[:16])


@pytest.mark.parametrize("name", METHODS.names())
def test_local_update_mlp(benchmark, name):
    method_cls = METHODS.get(name)
    cfg = method_cls.Config(model="mlp", lr=0.05, local_epochs=1, batch_size=32)
    algo = method_cls(cfg, Task("mlp", SHAPE, CLASSES))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("mlp", SHAPE, CLASSES)
    server = algo.init_server(model, seeding.generator(0, "server_init"))
    state = algo.init_client(0, server, seeding.generator(0, "client_init", 0))
    down = wire.decode(wire.encode(algo.broadcast(server, 0, 1)))
    data = client_data()

    def update():
        return algo.local_update(down, state, data, seeding.generator(0, "local", 1, 0))

    up, _, metrics = benchmark(update)
    assert all(torch.isfinite(t.float()).all() for t in up.values()), name
    if "loss" in metrics:
        assert metrics["loss"] == metrics["loss"]  # not NaN


def test_deq_resnet_s_forward_backward(benchmark):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_model("deq_resnet_s", (3, 32, 32), 10)
    g = seeding.generator(0, "perf")
    x = torch.rand(32, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)

    def step():
        net.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    loss = benchmark(step)
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_aggregate_100_replies(benchmark):
    fedavg = METHODS.get("fedavg")
    algo = fedavg(fedavg.Config(model="mlp", lr=0.05, local_epochs=1, batch_size=32), Task("mlp", SHAPE, CLASSES))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        server = algo.init_server(build_model("mlp", SHAPE, CLASSES), seeding.generator(0, "server_init"))
    down = algo.broadcast(server, 0, 1)
    # Reply i is the global model plus i, from i + 1 samples: the weighted mean adds
    # sum_i (i+1) i / sum_i (i+1) = (sum i^2 + sum i) / (sum i + 100) = (328350 + 4950) / 5050 = 66.0.
    replies = []
    for i in range(100):
        msg = {k: v + i for k, v in down.items() if k != NUM_SAMPLES}
        msg[NUM_SAMPLES] = torch.tensor(i + 1, dtype=torch.int64)
        replies.append((i, wire.decode(wire.encode(msg))))
    new, _ = benchmark(algo.aggregate, server, replies, 1)
    some = next(k for k in down if k != NUM_SAMPLES and down[k].is_floating_point())
    assert torch.allclose(new[some], down[some] + 66.0, atol=1e-3)


@pytest.mark.parametrize("method,model", [("fedeq", "deq_mlp"), ("fedrep", "mlp"),
                                          ("fedeq", "deq_resnet_s"), ("fedrep", "resnet20")])
def test_fedeq_update_vs_fedrep_at_equal_epochs(benchmark, method, model):
    from bench.perf.workloads import UPDATE_SAMPLES, update_setup

    n = UPDATE_SAMPLES["deq_resnet_s" if model in ("deq_resnet_s", "resnet20") else "deq_mlp"]
    update, _ = update_setup(method, model, n)
    rounds = 1 if "resnet" in model else 3
    up, _, metrics = benchmark.pedantic(update, rounds=rounds, iterations=1, warmup_rounds=1)
    assert all(torch.isfinite(t.float()).all() for t in up.values())
    # 8 epochs of ceil(n / 10) batches: the update really ran (FeDEQ and FedRep alike).
    assert metrics["steps"] == 8 * -(-n // 10)
    if method == "fedeq":
        assert 1 <= metrics["deq/nstep_mean"] <= 20
