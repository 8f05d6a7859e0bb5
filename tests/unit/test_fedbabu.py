"""FedBABU: the head stays at its initial values in training; only the body is trained and sent;
evaluation fine-tunes a throwaway copy, in the batch order of the generator it is handed, and leaves
no state."""
import copy

import pytest
import torch
import torch.nn.functional as F

from bench.experiment import load_dataset
from bench.loop import engine
from bench.loop.backends import SerialBackend
from fedeq_bench.core import seeding
from fedeq_bench.methods.base import Task
from fedeq_bench.methods.fedbabu import FedBABU, FedBABUConfig
from fedeq_bench.methods.nets import build_model
from fedeq_bench.methods.train import eval_metrics
from tests.helpers import check_finetuning_follows_rng, eval_rng, method_setup, tiny_config, write_tiny_npz

BODY_KEYS = {"body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias"}
HEAD_KEYS = {"head.weight", "head.bias"}


def setup(lr=0.1, batch=4, epochs=1, n=12, **kw):
    """(algo, server, ref, data): tests/helpers.py's tiny task, data seed 3."""
    return method_setup(FedBABU, data_seed=3, n=n, lr=lr, local_epochs=epochs, batch_size=batch, **kw)


def sgd_by_hand(net, d, batches, lr=0.1):
    """`net` after one SGD step on mean CE, w.r.t. every parameter, per batch of sample indices."""
    for idx in batches:
        grads = torch.autograd.grad(F.cross_entropy(net(d.train_x[idx]), d.train_y[idx]), list(net.parameters()))
        with torch.no_grad():
            for p, g in zip(net.parameters(), grads, strict=True):
                p.sub_(lr * g)
    return net


def test_head_unchanged_after_local_update_and_body_takes_a_body_only_step():
    algo, server, ref, d = setup(lr=0.1, batch=8, n=8)  # n == batch: one full-batch step
    state = algo.init_client(0, server, seeding.generator(0, "client_init", 0))
    head0 = {k: state[k].clone() for k in HEAD_KEYS}
    down = algo.broadcast(server, 0, 1)
    up, new_state, m = algo.local_update(down, state, d, seeding.generator(0, "local", 1, 0))
    assert m["steps"] == 1
    # The head in the returned state and in the network that trained is still h^0, bit for bit.
    trained = algo.net.state_dict()
    for k in HEAD_KEYS:
        assert torch.equal(new_state[k], head0[k]) and torch.equal(trained[k], head0[k]), k
    # By hand: body <- body - lr * dCE/dbody, with the head fixed at h^0.
    loss = F.cross_entropy(ref(d.train_x), d.train_y)
    body_params = [(n, p) for n, p in ref.named_parameters() if n in BODY_KEYS]
    grads = torch.autograd.grad(loss, [p for _, p in body_params])
    for (name, p), g in zip(body_params, grads, strict=True):
        assert torch.allclose(up[name], p.detach() - 0.1 * g, atol=1e-6), name


def test_only_the_body_is_uploaded_and_averaged():
    algo, server, _, d = setup()
    state = algo.init_client(0, server, seeding.generator(0, "client_init", 0))
    down = algo.broadcast(server, 0, 1)
    up, _, _ = algo.local_update(down, state, d, seeding.generator(0, "local", 1, 0))
    assert set(down) == BODY_KEYS and set(up) == BODY_KEYS | {"num_samples"}
    assert set(state) == HEAD_KEYS  # h^0 only: no seed of evaluation's batch order
    a = {k: torch.full_like(server[k], 3.0) for k in BODY_KEYS} | {"num_samples": torch.tensor(2)}
    b = {k: torch.full_like(server[k], 0.0) for k in BODY_KEYS} | {"num_samples": torch.tensor(1)}
    new, _ = algo.aggregate(server, [(0, a), (1, b)], 1)
    for k in BODY_KEYS:
        assert torch.allclose(new[k], torch.full_like(server[k], (3.0 * 2 + 0.0 * 1) / 3))  # 2.0
    assert all(torch.equal(new[k], server[k]) for k in HEAD_KEYS)


def test_evaluation_fine_tunes_the_whole_model_once_and_leaves_no_state():
    algo, server, ref, d = setup(lr=0.1, batch=8, n=8, finetune_epochs=1)
    state = algo.init_client(0, server, seeding.generator(0, "client_init", 0))
    down = algo.broadcast(server, 0, 1)
    before_state = {k: v.clone() for k, v in state.items()}
    before_down = {k: v.clone() for k, v in down.items()}
    m1 = algo.evaluate(down, state, d, eval_rng())
    m2 = algo.evaluate(down, state, d, eval_rng())
    # Nothing persisted: inputs untouched and a second evaluation is the same (not a second epoch).
    assert all(torch.equal(state[k], before_state[k]) for k in state)
    assert all(torch.equal(down[k], before_down[k]) for k in down)
    assert m1 == m2
    # By hand: one full-batch SGD step on every parameter (body AND head) of (phi, h^0), then evaluate.
    expected = eval_metrics(sgd_by_hand(ref, d, [torch.arange(8)]), d)
    assert m1["test_acc"] == expected["test_acc"]
    assert abs(m1["test_loss"] - expected["test_loss"]) < 1e-6


def test_evaluation_fine_tunes_in_the_batch_order_of_the_generator_it_is_handed():
    # n = 8, batch 4: two steps, and the result depends on which samples share a batch.
    algo, server, ref, d = setup(lr=0.1, batch=4, n=8, finetune_epochs=1)
    state = algo.init_client(0, server, seeding.generator(0, "client_init", 0))
    down = algo.broadcast(server, 0, 1)

    check_finetuning_follows_rng(algo, down, state, d, lambda batches: sgd_by_hand(copy.deepcopy(ref), d, batches))


def test_zero_fine_tuning_evaluates_the_trained_model_and_head_only_keeps_the_body():
    algo, server, ref, d = setup(finetune_epochs=0)
    state = algo.init_client(0, server, seeding.generator(0, "client_init", 0))
    assert algo.evaluate(algo.broadcast(server, 0, 1), state, d, eval_rng()) == eval_metrics(ref, d)
    algo, server, _, d = setup(finetune_epochs=2, finetune_head_only=True)
    state = algo.init_client(0, server, seeding.generator(0, "client_init", 0))
    algo.evaluate(algo.broadcast(server, 0, 1), state, d, eval_rng())
    tuned = algo.net.state_dict()
    assert all(torch.equal(tuned[k], server[k]) for k in BODY_KEYS)
    assert not torch.equal(tuned["head.weight"], server["head.weight"])
    # A held-out client needs nothing before its (fine-tuning) evaluation.
    assert algo.personalize(algo.broadcast(server, 5, 2), state, d, seeding.generator(0, "personalize", 2, 5)) is state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_npz(tmp_path_factory.mktemp("d") / "tiny.npz", clients=6)


def test_engine_sends_the_body_only(tiny):
    cfg = tiny_config(tiny, methods="fedbabu")
    res = engine.run_method(cfg, "fedbabu", 0, load_dataset(cfg, 0), SerialBackend())
    # Body entries 3233 + 827 + 160033 + 827 plus the 8-byte header (see test_fedper for the arithmetic).
    down = 8 + 3233 + 827 + 160033 + 827                 # 164928
    for h in res.history:
        assert h["bytes/down"] == 6 * down and h["bytes/up"] == 6 * (down + 31)
    assert res.ledger.keys_sent() == BODY_KEYS | {"num_samples"}


def test_a_zero_initial_head_is_redrawn_so_the_body_can_learn():
    algo = FedBABU(FedBABUConfig(model="mlp", lr=0.1, local_epochs=1, batch_size=8), Task("mlp", (4,), 3))
    torch.manual_seed(0)
    model = build_model("mlp", (4,), 3)
    with torch.no_grad():
        model.head.weight.zero_()  # as resnet34 initializes its classifier
    # With W = 0 frozen, dCE/dz = W^T (softmax - onehot) = 0: the body would get no gradient at all.
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.body.parameters()))
    assert all(not g.any() for g in grads)
    server = algo.init_server(model, seeding.generator(0, "server_init"))
    again = algo.init_server(model, seeding.generator(0, "server_init"))
    assert server["head.weight"].any() and torch.equal(server["head.weight"], again["head.weight"])
    # nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) = U(-1/sqrt(200), 1/sqrt(200)).
    assert float(server["head.weight"].abs().max()) <= 1 / 200 ** 0.5
    sd = model.state_dict()
    assert all(torch.equal(server[k], sd[k]) for k in sd if k != "head.weight")
    # A nonzero initial head is kept as it is (the same initial model as every other method).
    torch.manual_seed(0)
    model = build_model("mlp", (4,), 3)
    server = algo.init_server(model, seeding.generator(0, "server_init"))
    assert all(torch.equal(server[k], v) for k, v in model.state_dict().items())
