"""FedRep: head epochs with the body frozen, then body epochs with the head frozen; head stays home."""
import pytest
import torch

from fedeq_bench.core import seeding
from fedeq_bench.methods.fedrep import FedRep
from tests.helpers import check_unseen_bn, eval_rng, method_setup, trajectory


def setup(head_epochs=2, epochs=1):
    """(algo, server, data): tests/helpers.py's tiny task, 12 examples, data seed 1."""
    algo, server, _, d = method_setup(FedRep, data_seed=1, n=12, lr=0.1, local_epochs=epochs, batch_size=4,
                                      head_epochs=head_epochs)
    return algo, server, d


def test_messages_carry_the_body_only_and_state_the_head_only():
    algo, server, d = setup()
    state = algo.init_client(0, server, seeding.generator(0, "client_init", 0))
    down = algo.broadcast(server, 0, 1)
    up, new_state, _ = algo.local_update(down, state, d, seeding.generator(0, "local", 1, 0))
    assert set(down) == {"body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias"}
    assert set(up) == set(down) | {"num_samples"}
    assert set(state) == set(new_state) == {"head.weight", "head.bias"}


def test_zero_body_epochs_leave_the_body_and_zero_head_epochs_leave_the_head():
    algo, server, d = setup(head_epochs=3, epochs=0)
    state = algo.init_client(0, server, None)
    down = algo.broadcast(server, 0, 1)
    up, new_state, m = algo.local_update(down, state, d, seeding.generator(0, "local", 1, 0))
    assert all(torch.equal(up[k], down[k]) for k in down)            # body frozen during head epochs
    assert not torch.equal(new_state["head.weight"], state["head.weight"])
    assert m["steps"] == 3 * 3                                         # 3 epochs * ceil(12 / 4) batches

    algo, server, d = setup(head_epochs=0, epochs=1)
    state = algo.init_client(0, server, None)
    up, new_state, _ = algo.local_update(algo.broadcast(server, 0, 1), state, d, seeding.generator(0, "local", 1, 0))
    assert all(torch.equal(new_state[k], state[k]) for k in state)    # head frozen during body epochs
    assert not torch.equal(up["body.1.weight"], server["body.1.weight"])


def test_aggregate_averages_bodies_by_samples_and_keeps_the_initial_head():
    algo, server, _ = setup()
    body = ["body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias"]
    a = {k: torch.full_like(server[k], 1.0) for k in body} | {"num_samples": torch.tensor(1)}
    b = {k: torch.full_like(server[k], 4.0) for k in body} | {"num_samples": torch.tensor(3)}
    new, _ = algo.aggregate(server, [(0, a), (1, b)], 1)
    for k in body:
        assert torch.allclose(new[k], torch.full_like(server[k], (1.0 * 1 + 4.0 * 3) / 4))  # 3.25
    assert torch.equal(new["head.weight"], server["head.weight"])


def test_evaluation_uses_global_body_and_own_head():
    algo, server, d = setup()
    head = {"head.weight": torch.zeros(3, 200), "head.bias": torch.tensor([0.0, 0.0, 1.0])}
    m = algo.evaluate(algo.broadcast(server, 0, 1), head, d, eval_rng())
    # A zero weight with bias favouring class 2 predicts 2 for every input, whatever the body.
    assert m["test_acc"] == float((d.test_y == 2).sum()) / 4


# tests/helpers.py `trajectory(FedRep)`, recorded from the code before server_weights and unseen_bn existed.
BEFORE_OPTIONS = {"up1": 31.68909438135836, "state1": 0.13674859050479427, "loss1": 0.9163166715039147,
                  "up2": 36.726429138295316, "state2": 0.13674841703323182, "loss2": 0.6108264144923952,
                  "eval": 0.3896437883377075, "personalized": 0.136748317439924, "eval_unseen": 0.4647868573665619}


def test_default_options_keep_the_numbers():
    assert (FedRep.Config().server_weights, FedRep.Config().unseen_bn) == ("samples", "drop")
    # Same machine: equal bit for bit; the tolerance only absorbs another CPU's float rounding.
    assert trajectory(FedRep) == pytest.approx(BEFORE_OPTIONS, rel=1e-6)
    # mlp has no BatchNorm: keeping statistics changes nothing here.
    assert trajectory(FedRep, unseen_bn="keep") == trajectory(FedRep)


def test_server_weights_uniform_is_the_plain_mean_of_bodies():
    algo, server, _ = setup()
    body = [k for k in server if k.startswith("body.")]
    a = {k: torch.full_like(server[k], 2.0) for k in body} | {"num_samples": torch.tensor(3)}
    b = {k: torch.full_like(server[k], -1.0) for k in body} | {"num_samples": torch.tensor(1)}
    uniform, _ = method_setup(FedRep, data_seed=1, server_weights="uniform")[:2]
    for alg, want in ((algo, (2.0 * 3 - 1.0) / 4), (uniform, (2.0 - 1.0) / 2)):  # 1.25 by n_i, 0.5 plain
        new, _ = alg.aggregate(server, [(1, b), (0, a)], 1)
        assert all(torch.allclose(new[k], torch.full_like(server[k], want)) for k in body)


def test_unseen_bn_keep_scores_held_out_clients_with_their_own_statistics():
    check_unseen_bn(FedRep, head_epochs=1)
