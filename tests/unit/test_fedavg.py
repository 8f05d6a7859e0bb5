"""FedAvg: one local step is one SGD step; the server's mean is sum_i n_i w_i / sum_i n_i."""
import torch
import torch.nn.functional as F

from fedeq_bench.core import seeding
from fedeq_bench.methods.base import ClientTensors, MethodConfig, Task
from fedeq_bench.methods.fedavg import FedAvg
from fedeq_bench.methods.train import weighted_average, with_num_samples


def eval_rng(rnd=1, cid=0):
    """The generator the engine hands evaluate() for client `cid` after round `rnd` (bench/loop/backends.py)."""
    return seeding.generator(0, "eval", rnd, cid)


def make(lr=0.1, batch=8, epochs=1):
    cfg = MethodConfig(model="mlp", lr=lr, local_epochs=epochs, batch_size=batch)
    return FedAvg(cfg, Task("mlp", (4,), 3))


def data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return ClientTensors(x, y, x[:2], y[:2], x[:3], y[:3])


def test_one_client_one_step_equals_one_sgd_step():
    algo = make(lr=0.1, batch=8)
    from fedeq_bench.methods.nets import build_model

    torch.manual_seed(0)
    ref = build_model("mlp", (4,), 3)
    server = algo.init_server(ref, seeding.generator(0, "server_init"))
    d = data(n=8)  # n == batch: exactly one step per epoch; the shuffle does not change a full batch's mean
    up, _, metrics = algo.local_update(algo.broadcast(server, 0, 1), {}, d, seeding.generator(0, "local", 1, 0))
    assert metrics["steps"] == 1
    # The same step by hand: w <- w - lr * dCE/dw on the full batch.
    loss = F.cross_entropy(ref(d.train_x), d.train_y)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for (name, p), g in zip(ref.named_parameters(), grads, strict=True):
        assert torch.allclose(up[name], p.detach() - 0.1 * g, atol=1e-6), name
    assert int(up["num_samples"]) == 8
    # One client with all the weight: the new global model is its model.
    new, _ = algo.aggregate(server, [(0, up)], 1)
    assert all(torch.equal(new[k], up[k]) for k in server)


def test_aggregation_is_the_sample_weighted_mean():
    w0, w1 = torch.tensor([1.0, 2.0]), torch.tensor([4.0, -1.0])
    replies = [(1, with_num_samples({"w": w1}, 2)), (0, with_num_samples({"w": w0}, 1))]
    out = weighted_average(replies, ["w"])
    # (w0 * 1 + w1 * 2) / 3 = ([1, 2] + [8, -2]) / 3 = [3, 0]
    assert torch.allclose(out["w"], (w0 * 1 + w1 * 2) / 3)
    assert torch.equal(out["w"], torch.tensor([3.0, 0.0]))


def test_aggregation_order_does_not_matter_and_ints_take_the_max():
    a = with_num_samples({"w": torch.tensor([0.1]), "count": torch.tensor(3)}, 3)
    b = with_num_samples({"w": torch.tensor([0.7]), "count": torch.tensor(5)}, 1)
    x = weighted_average([(0, a), (1, b)], ["w", "count"])
    y = weighted_average([(1, b), (0, a)], ["w", "count"])
    assert torch.equal(x["w"], y["w"])  # sorted by client id inside: same bits
    assert torch.allclose(x["w"], torch.tensor([(0.1 * 3 + 0.7 * 1) / 4]))
    assert int(x["count"]) == 5


def test_evaluate_uses_the_global_model_and_personalize_keeps_nothing():
    algo = make()
    from fedeq_bench.methods.nets import build_model

    torch.manual_seed(1)
    server = algo.init_server(build_model("mlp", (4,), 3), seeding.generator(0, "server_init"))
    d = data()
    m = algo.evaluate(algo.broadcast(server, 0, 1), {}, d, eval_rng())
    algo.net.load_state_dict(server)
    expected = int((algo.net(d.test_x).argmax(1) == d.test_y).sum()) / 3
    assert abs(m["test_acc"] - expected) < 1e-12 and m["test_n"] == 3
    assert algo.personalize(algo.broadcast(server, 0, 1), {}, d, seeding.generator(0, "personalize", 1, 0)) == {}
