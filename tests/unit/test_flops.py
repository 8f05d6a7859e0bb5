"""bench/loop/flops.py: FLOPs as PyTorch's formulas count them (2 per multiply-add of a matrix
product), by hand on a tiny MLP and one fixed-point step of deq_mlp, equal to FlopCounterMode's total
where that can count, through a DEQ's adjoint where it cannot, and per round in the engine."""
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.loop.flops import Counter
from fedeq_bench.methods.nets import build_model
from fedeq_bench.methods.nets.deq_mlp import DEQMLPBlock
from tests.helpers import synthetic_run


def step(net, x, y):
    nn.functional.cross_entropy(net(x), y).backward()


def test_a_training_step_of_a_tiny_mlp_by_hand():
    """Linear(4, 3), ReLU, Linear(3, 2) on a batch of 5. Forward: 2*5*4*3 + 2*5*3*2 = 120 + 60.
    Backward: the second layer's weight and input gradients, 60 each; the first layer's weight
    gradient, 120 (no input gradient: the input needs none). 420 in all."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1])
    with Counter() as fwd:
        net(x)
    assert fwd.total == 180
    with Counter() as c:
        step(net, x, y)
    assert c.total == 420


def test_one_fixed_point_step_of_deq_mlp_by_hand():
    """f(z, x) = softplus(W z + x), W 128 x 128 without bias: one evaluation on a batch of 5 is one
    (5 x 128) @ (128 x 128) product, 2 * 5 * 128 * 128 FLOPs."""
    block = DEQMLPBlock(128)
    z, x = torch.randn(5, 128), torch.randn(5, 128)
    with Counter() as c, torch.no_grad():
        block(z, x)
    assert c.total == 2 * 5 * 128 * 128 == 163_840


def test_equal_to_flopcountermode_where_it_can_count():
    """The same formulas as PyTorch's own counter on an explicit CNN's training step (conv forward and
    backward, addmm): if a torch upgrade changes either, this fails."""
    torch.manual_seed(0)
    net = build_model("cnn", (1, 28, 28), 10)
    x, y = torch.randn(4, 1, 28, 28), torch.arange(4)
    with FlopCounterMode(display=False) as ref:
        step(net, x, y)
    with Counter() as c:
        step(net, x, y)
    assert c.total == ref.get_total_flops() > 0


def test_a_deq_training_step_counts_its_solves_and_adjoint():
    """FlopCounterMode's module hooks fail inside a DEQ's backward (bench/loop/flops.py); this counter
    counts it: the whole step is more than its forward (the adjoint solve's products)."""
    torch.manual_seed(0)
    net = build_model("deq_mlp", (60,), 10)
    x, y = torch.randn(8, 60), torch.arange(8) % 10
    with Counter() as fwd, torch.no_grad():
        net(x)
    with Counter() as whole:
        step(net, x, y)
    assert whole.total > fwd.total > 2 * 8 * 128 * 128  # at least one fixed-point step


def run(method, **keys):
    return synthetic_run(method, local_epochs=2, **keys)


def test_the_engine_logs_a_rounds_flops_from_each_clients_update():
    """FedAvg's 2NN (Linear layers I_k x O_k, the first with no input gradient): a sample costs
    6 * sum(I_k O_k) - 2 * I_0 O_0 FLOPs per epoch (forward, weight and input gradients, 2 per
    multiply-add), whatever the batches, so a client's update is epochs * n_train * that."""
    ds, r = run("fedavg")
    linears = [m for m in build_model("mlp", ds.input_shape, ds.num_classes).modules() if isinstance(m, nn.Linear)]
    per_sample = 6 * sum(m.in_features * m.out_features for m in linears) - 2 * linears[0].in_features * linears[0].out_features
    n_train = {cid: c.num_train for cid, c in enumerate(ds.clients)}
    sent = {}
    for e in r.ledger.entries:
        if e.direction == "up":
            sent.setdefault(e.round, []).append(e.client)
    for rnd, h in enumerate(r.history, start=1):
        want = sum(2 * n_train[c] * per_sample for c in sent[rnd])
        assert h["compute/flops_train"] == want and h["compute/flops_update"] == want / len(sent[rnd])
        assert h["compute/flops_eval"] > 0  # every client scored, forward passes only
    # A DEQ's update costs several explicit networks' (its solves and adjoint): compute is its price.
    _, deq = run("fedeq")
    assert deq.history[0]["compute/flops_update"] > 0
