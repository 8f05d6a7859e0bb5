"""FedPer: body and head trained jointly; only the body crosses the network; the head stays home."""
import pytest
import torch
import torch.nn.functional as F

from bench.experiment import load_dataset
from bench.loop import engine
from bench.loop.backends import SerialBackend
from fedeq_bench.core import seeding
from fedeq_bench.methods.fedper import FedPer
from tests.helpers import check_unseen_bn, eval_rng, method_setup, tiny_config, trajectory, write_tiny_npz

BODY_KEYS = {"body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias"}
HEAD_KEYS = {"head.weight", "head.bias"}


def setup(lr=0.1, batch=4, epochs=1, n=12, **kw):
    """(algo, server, ref, data): tests/helpers.py's tiny task, data seed 1."""
    return method_setup(FedPer, data_seed=1, n=n, lr=lr, local_epochs=epochs, batch_size=batch, **kw)


def test_messages_carry_the_body_only_and_state_the_head_only():
    algo, server, _, d = setup()
    state = algo.init_client(0, server, seeding.generator(0, "client_init", 0))
    down = algo.broadcast(server, 0, 1)
    up, new_state, m = algo.local_update(down, state, d, seeding.generator(0, "local", 1, 0))
    assert set(down) == BODY_KEYS
    assert set(up) == BODY_KEYS | {"num_samples"} and int(up["num_samples"]) == 12
    assert set(state) == set(new_state) == HEAD_KEYS
    assert m["steps"] == 3  # ceil(12 / 4) batches, 1 epoch
    assert algo.param_split(algo.net) == (["body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias"],
                                          ["head.weight", "head.bias"])


def test_one_step_moves_body_and_head_together():
    # n == batch: one full-batch step; the shuffle does not change a full batch's mean gradient.
    algo, server, ref, d = setup(lr=0.1, batch=8, n=8)
    state = algo.init_client(0, server, None)
    up, new_state, m = algo.local_update(algo.broadcast(server, 0, 1), state, d, seeding.generator(0, "local", 1, 0))
    assert m["steps"] == 1
    # By hand: every parameter p <- p - lr * dCE/dp at the same point (unlike FedRep's alternation,
    # where the body step would see the already-updated head).
    loss = F.cross_entropy(ref(d.train_x), d.train_y)
    names = [n for n, _ in ref.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(loss, list(ref.parameters())), strict=True))
    for name, p in ref.named_parameters():
        got = up[name] if name in BODY_KEYS else new_state[name]
        assert torch.allclose(got, p.detach() - 0.1 * grads[name], atol=1e-6), name
    assert not torch.equal(new_state["head.weight"], state["head.weight"])


def test_aggregate_is_the_sample_weighted_mean_of_bodies():
    algo, server, _, _ = setup()
    a = {k: torch.full_like(server[k], 2.0) for k in BODY_KEYS} | {"num_samples": torch.tensor(3)}
    b = {k: torch.full_like(server[k], -1.0) for k in BODY_KEYS} | {"num_samples": torch.tensor(1)}
    new, _ = algo.aggregate(server, [(1, b), (0, a)], 1)
    for k in BODY_KEYS:
        assert torch.allclose(new[k], torch.full_like(server[k], (2.0 * 3 + (-1.0) * 1) / 4))  # 1.25
    assert all(torch.equal(new[k], server[k]) for k in HEAD_KEYS)  # the initial head, kept for new clients


def test_evaluation_uses_global_body_and_own_head():
    algo, server, _, d = setup()
    head = {"head.weight": torch.zeros(3, 200), "head.bias": torch.tensor([0.0, 1.0, 0.0])}
    m = algo.evaluate(algo.broadcast(server, 0, 1), head, d, eval_rng())
    # A zero weight with bias favouring class 1 predicts 1 for every input, whatever the body.
    assert m["test_acc"] == float((d.test_y == 1).sum()) / 4 and m["test_n"] == 4


def test_held_out_client_trains_its_head_on_the_frozen_body():
    algo, server, _, d = setup(unseen_head_epochs=2)
    state = algo.init_client(9, server, None)
    down = algo.broadcast(server, 9, 3)
    new_state = algo.personalize(down, state, d, seeding.generator(0, "personalize", 1, 9))
    assert set(new_state) == HEAD_KEYS
    assert not torch.equal(new_state["head.weight"], state["head.weight"])
    trained = algo.net.state_dict()
    assert all(torch.equal(trained[k], down[k]) for k in BODY_KEYS)  # the body never moved
    # 0 epochs: the head is handed back as it came.
    algo0, server0, _, d0 = setup(unseen_head_epochs=0)
    st = algo0.init_client(9, server0, None)
    out = algo0.personalize(algo0.broadcast(server0, 9, 3), st, d0, seeding.generator(0, "personalize", 1, 9))
    assert all(torch.equal(out[k], st[k]) for k in HEAD_KEYS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_npz(tmp_path_factory.mktemp("d") / "tiny.npz", clients=6)


def test_engine_counts_exactly_the_body_bytes_and_never_sends_the_head(tiny):
    cfg = tiny_config(tiny, methods="fedper")
    res = engine.run_method(cfg, "fedper", 0, load_dataset(cfg, 0), SerialBackend())
    # bench/loop/wire.py: an entry costs 2 + len(name) + 1 + 1 + 4 * ndim + 8 + 4 * numel bytes (float32).
    body = ((2 + 13 + 2 + 8 + 8 + 200 * 4 * 4)          # body.1.weight (200, 4):    3233
            + (2 + 11 + 2 + 4 + 8 + 200 * 4)            # body.1.bias (200,):          827
            + (2 + 13 + 2 + 8 + 8 + 200 * 200 * 4)      # body.3.weight (200, 200): 160033
            + (2 + 11 + 2 + 4 + 8 + 200 * 4))           # body.3.bias (200,):          827
    down = 8 + body                                     # 8-byte header: 164928
    up = down + (2 + 11 + 2 + 0 + 8 + 8)                # + num_samples (int64 scalar): 31
    assert (down, up) == (164928, 164959)
    for h in res.history:                               # every one of the 6 clients, every round
        assert h["bytes/down"] == 6 * down and h["bytes/up"] == 6 * up
    assert res.ledger.keys_sent() == BODY_KEYS | {"num_samples"}
    assert (res.params_shared, res.params_personal) == (4 * 200 + 200 + 200 * 200 + 200, 200 * 3 + 3)


# tests/helpers.py `trajectory(FedPer)`, recorded from the code before head_epochs, server_weights and
# unseen_bn existed.
BEFORE_OPTIONS = {"up1": 18.76396688009993, "state1": 0.13674797472776845, "loss1": 1.0669091840585072,
                  "up2": 20.40369234248203, "state2": 0.1367480304761557, "loss2": 0.920618732770284,
                  "eval": 0.7374559640884399, "personalized": 0.13674757566855078, "eval_unseen": 0.772036075592041}


def test_default_options_keep_the_numbers():
    cfg = FedPer.Config()
    assert (cfg.head_epochs, cfg.server_weights, cfg.unseen_bn) == (0, "samples", "drop")
    # Same machine: equal bit for bit; the tolerance only absorbs another CPU's float rounding.
    assert trajectory(FedPer) == pytest.approx(BEFORE_OPTIONS, rel=1e-6)
    assert trajectory(FedPer, unseen_bn="keep") == trajectory(FedPer)  # mlp has no BatchNorm
    assert trajectory(FedPer, head_epochs=1) != pytest.approx(BEFORE_OPTIONS, rel=1e-6)


def test_head_epochs_train_the_head_alone_before_the_joint_epochs():
    # n == batch: one full-batch step per epoch. By hand, head_epochs = 1, local_epochs = 1:
    #   head step:  h1 = h - lr * dCE/dh (phi, h)              (phi frozen)
    #   joint step: phi' = phi - lr * dCE/dphi (phi, h1),  h2 = h1 - lr * dCE/dh (phi, h1)
    algo, server, ref, d = setup(lr=0.1, batch=8, n=8, head_epochs=1)
    state = algo.init_client(0, server, None)
    up, new_state, m = algo.local_update(algo.broadcast(server, 0, 1), state, d, seeding.generator(0, "local", 1, 0))
    assert m["steps"] == 2
    head = dict(ref.head.named_parameters())
    g = torch.autograd.grad(F.cross_entropy(ref(d.train_x), d.train_y), list(head.values()))
    with torch.no_grad():
        for p, gp in zip(head.values(), g, strict=True):
            p.sub_(0.1 * gp)
    names = [n for n, _ in ref.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(F.cross_entropy(ref(d.train_x), d.train_y),
                                                list(ref.parameters())), strict=True))
    for name, p in ref.named_parameters():
        got = up[name] if name in BODY_KEYS else new_state[name]
        assert torch.allclose(got, p.detach() - 0.1 * grads[name], atol=1e-6), name


def test_server_weights_uniform_is_the_plain_mean_of_bodies():
    a_server = setup()[1]
    a = {k: torch.full_like(a_server[k], 2.0) for k in BODY_KEYS} | {"num_samples": torch.tensor(3)}
    b = {k: torch.full_like(a_server[k], -1.0) for k in BODY_KEYS} | {"num_samples": torch.tensor(1)}
    algo, server, _, _ = setup(server_weights="uniform")
    new, _ = algo.aggregate(server, [(1, b), (0, a)], 1)
    for k in BODY_KEYS:  # (2 - 1) / 2, where the default gives 1.25 (test above)
        assert torch.allclose(new[k], torch.full_like(server[k], 0.5))
    assert all(torch.equal(new[k], server[k]) for k in HEAD_KEYS)


def test_unseen_bn_keep_scores_held_out_clients_with_their_own_statistics():
    check_unseen_bn(FedPer, unseen_head_epochs=1)
