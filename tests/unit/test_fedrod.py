"""FedRoD: generic model (body + head) trained with the balanced softmax and averaged; a personal
head on top of the generic logits, trained with CE, never sent."""
import math

import pytest
import torch
import torch.nn.functional as F

from bench.experiment import load_dataset
from bench.loop import engine
from bench.loop.backends import SerialBackend
from fedeq_bench.core import seeding
from fedeq_bench.methods.base import MethodConfig, Task
from fedeq_bench.methods.fedavg import FedAvg
from fedeq_bench.methods.fedrod import PHEAD, FedRoD, balanced_softmax_loss, log_class_prior
from tests.helpers import eval_rng, method_setup, tiny_config, write_tiny_npz

KEYS = ["body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias", "head.weight", "head.bias"]


def setup(n=8, **kw):
    """(algo, server, ref, data): tests/helpers.py's tiny task, data seed 4, labels 0, 0, 0, 1 repeated."""
    cfg = dict(lr=0.1, local_epochs=1, batch_size=8)
    cfg.update(kw)
    y = torch.tensor([0, 0, 0, 1] * (n // 4))  # class 2 absent: prior (3/4, 1/4, 0)
    return method_setup(FedRoD, data_seed=4, n=n, labels=y, **cfg)


def test_balanced_softmax_by_hand():
    y = torch.tensor([0, 0, 0, 1])
    lp = log_class_prior(y, 3)
    assert torch.allclose(lp[:2], torch.tensor([math.log(3 / 4), math.log(1 / 4)])) and lp[2] == -math.inf
    logits = torch.tensor([[1.0, 2.0, 0.0]], requires_grad=True)
    loss = balanced_softmax_loss(logits, torch.tensor([0]), lp)
    # -log( (3/4) e^1 / ((3/4) e^1 + (1/4) e^2 + 0 * e^0) ) = log(1 + e / 3) = 0.6451...
    assert math.isclose(loss.item(), math.log(1 + math.e / 3), rel_tol=1e-6)
    # Plain CE would be -log(e / (e + e^2 + 1)) = 1.4076...: the prior does change the loss.
    assert not math.isclose(F.cross_entropy(logits, torch.tensor([0])).item(), loss.item(), rel_tol=1e-3)
    # The absent class gets probability 0 and a zero (finite) gradient; the others
    # d/dlogit_c = softmax(adjusted)_c - 1[c = y]: q0 = 3e / (3e + e^2) = 1 / (1 + e / 3).
    (g,) = torch.autograd.grad(loss, logits)
    q0 = 1 / (1 + math.e / 3)
    assert torch.allclose(g, torch.tensor([[q0 - 1, 1 - q0, 0.0]]), atol=1e-6)


def test_one_step_by_hand_generic_bsm_and_personal_ce():
    lr = 0.1
    algo, server, ref, d = setup(n=8, lr=lr)  # n == batch: one full-batch step
    state = algo.init_client(0, server, None)
    assert set(state) == {PHEAD + "weight", PHEAD + "bias"}
    assert torch.equal(state[PHEAD + "weight"], server["head.weight"])  # h_i^0 = the initial classifier
    state = {PHEAD + "weight": torch.full((3, 200), 0.01), PHEAD + "bias": torch.tensor([0.0, 0.5, -0.5])}
    up, new_state, m = algo.local_update(algo.broadcast(server, 0, 1), state, d, seeding.generator(0, "local", 1, 0))
    assert m["steps"] == 1
    # Generic: every parameter p <- p - lr * d/dp CE(g + log prior, y), prior = (3/4, 1/4, 0).
    z = ref.body(d.train_x)
    g = ref.head(z)
    loss_g = F.cross_entropy(g + torch.log(torch.tensor([0.75, 0.25, 0.0])), d.train_y)
    grads = torch.autograd.grad(loss_g, list(ref.parameters()))
    for (name, p), gr in zip(ref.named_parameters(), grads, strict=True):
        assert torch.allclose(up[name], p.detach() - lr * gr, atol=1e-6), name
    # Personal: h <- h - lr * d/dh CE(g0 + z0 W_h^T + b_h, y), z0 and g0 from BEFORE the generic step.
    wp = state[PHEAD + "weight"].clone().requires_grad_(True)
    bp = state[PHEAD + "bias"].clone().requires_grad_(True)
    loss_p = F.cross_entropy(g.detach() + z.detach() @ wp.T + bp, d.train_y)
    gw, gb = torch.autograd.grad(loss_p, [wp, bp])
    assert torch.allclose(new_state[PHEAD + "weight"], state[PHEAD + "weight"] - lr * gw, atol=1e-6)
    assert torch.allclose(new_state[PHEAD + "bias"], state[PHEAD + "bias"] - lr * gb, atol=1e-6)
    assert math.isclose(m["loss"], loss_p.item(), rel_tol=1e-6)  # reported: the personal model's CE


def test_ce_generic_loss_is_fedavgs_update():
    algo, server, _, d = setup(n=16, batch_size=4, generic_loss="ce")
    fedavg = FedAvg(MethodConfig(model="mlp", lr=0.1, local_epochs=1, batch_size=4), Task("mlp", (4,), 3))
    down = algo.broadcast(server, 0, 1)
    a, _, _ = algo.local_update(down, algo.init_client(0, server, None), d, seeding.generator(0, "local", 1, 0))
    b, _, _ = fedavg.local_update(down, {}, d, seeding.generator(0, "local", 1, 0))
    assert all(torch.equal(a[k], b[k]) for k in b)  # same batches: the personal head does not touch w


def test_evaluation_adds_personal_logits_to_generic_logits():
    algo, server, _, d = setup(n=16)
    down = algo.broadcast(server, 0, 1)
    fedavg = FedAvg(MethodConfig(model="mlp", lr=0.1, local_epochs=1, batch_size=8), Task("mlp", (4,), 3))
    # A zero personal head adds 0 to every logit: exactly the generic model's (FedAvg's) evaluation.
    zero = {PHEAD + "weight": torch.zeros(3, 200), PHEAD + "bias": torch.zeros(3)}
    assert algo.evaluate(down, zero, d, eval_rng()) == fedavg.evaluate(down, {}, d, eval_rng())
    # A personal bias of +100 on class 1 outweighs the generic logits: predicts 1 everywhere.
    big = {PHEAD + "weight": torch.zeros(3, 200), PHEAD + "bias": torch.tensor([0.0, 100.0, 0.0])}
    assert algo.evaluate(down, big, d, eval_rng())["test_acc"] == float((d.test_y == 1).sum()) / 4


def test_held_out_client_trains_only_its_personal_head():
    algo, server, _, d = setup(n=16, batch_size=4)
    state = algo.init_client(7, server, None)
    down = algo.broadcast(server, 7, 2)
    new_state = algo.personalize(down, state, d, seeding.generator(0, "personalize", 1, 7))
    assert set(new_state) == set(state)
    assert not torch.equal(new_state[PHEAD + "weight"], state[PHEAD + "weight"])
    after = algo.net.state_dict()
    assert all(torch.equal(after[k], down[k]) for k in KEYS)  # the generic model stayed frozen


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_npz(tmp_path_factory.mktemp("d") / "tiny.npz", clients=6)


def test_personal_head_is_never_in_a_message(tiny):
    cfg = tiny_config(tiny, methods="fedrod")
    res = engine.run_method(cfg, "fedrod", 0, load_dataset(cfg, 0), SerialBackend())
    assert res.ledger.keys_sent() == set(KEYS) | {"num_samples"}
    assert not any(k.startswith(PHEAD) for k in res.ledger.keys_sent())
    # The generic model's bytes, exactly FedAvg's: body 164920 + head.weight 2431 + head.bias 37 + header 8.
    down = 8 + (3233 + 827 + 160033 + 827) + 2431 + 37   # 167396 (test_engine's FedAvg arithmetic)
    for h in res.history:
        assert h["bytes/down"] == 6 * down and h["bytes/up"] == 6 * (down + 31)
    # Personal parameters: one classifier of 200 * 3 + 3.
    assert (res.params_shared, res.params_personal) == (41200 + 603, 603)
