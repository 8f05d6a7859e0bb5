"""The run options that reproduce the FeDEQ reference's protocol (bench/config.py RunConfig):
`drop_last`, `unseen_pick`, `eval_dropout`. Each is off by default, where it must leave the earlier
behaviour exactly; on, it must do what longtanle/FeDEQ does (the file and line each test cites)."""
import numpy as np
import pytest
import torch
from torch import nn

from bench import config as C
from bench.experiment import load_dataset
from bench.loop import engine
from bench.loop.backends import SerialBackend
from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.seeding import numpy_rng
from fedeq_bench.datasets.base import DataArgs, build_federated
from fedeq_bench.methods.base import Task
from fedeq_bench.methods.nets import build_model
from fedeq_bench.methods.train import correct_and_loss, eval_mode, job_options, minibatches
from tests.helpers import tiny_config, write_tiny_npz


def batches(n, batch_size, drop_last=None, epochs=1):
    """The index batches `minibatches` yields for x = arange(n), from a fixed generator."""
    x = torch.arange(n, dtype=torch.float32)[:, None]
    gen = minibatches(x, x[:, 0].long(), epochs, batch_size, torch.Generator().manual_seed(3))
    if drop_last is None:  # outside any job: the behaviour before the option existed
        return [yb.tolist() for _, yb in gen]
    with job_options(Task("mlp", (1,), 2, drop_last=drop_last)):
        return [yb.tolist() for _, yb in gen]


def test_drop_last_off_keeps_the_partial_batch_as_before():
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    expected = [order[0:4], order[4:8], order[8:10]]  # ceil(10 / 4) batches, the last one partial
    assert batches(10, 4) == expected
    assert batches(10, 4, drop_last=False) == expected


def test_drop_last_does_what_the_reference_epoch_generator_does():
    # longtanle/FeDEQ utils/data_utils.py:243-250: shuffle, then len(x) // batch_size full batches;
    # trainers/base.py:96: batch size min(len(x), batch_size), so a small client trains on all of it.
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    assert batches(10, 4, drop_last=True) == [order[0:4], order[4:8]]
    assert batches(8, 4, drop_last=True) == batches(8, 4)  # nothing partial: nothing changes
    small = torch.randperm(3, generator=torch.Generator().manual_seed(3)).tolist()
    assert batches(3, 4, drop_last=True) == [small]
    assert batches(0, 4, drop_last=True) == []
    assert batches(10, 4) == batches(10, 4, drop_last=False)  # the context is left as it was


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_npz(tmp_path_factory.mktemp("d") / "tiny.npz", clients=4, n_train=20)


NUMBERS = ("loss/train", "acc/mean", "acc/weighted", "acc/bottom10", "bytes/cumulative")
"""The metrics a run's options decide (not its wall time or resident memory)."""


def run_fedavg(npz, **run):
    cfg = tiny_config(npz, methods="fedavg", rounds=2, val_frac=0.0, local_epochs=1, **run)
    res = engine.run_method(cfg, "fedavg", 0, load_dataset(cfg, 0), SerialBackend())
    return [{k: h[k] for k in NUMBERS} for h in res.history], [(r["cid"], r["test_acc"]) for r in res.clients]


def test_the_worker_applies_drop_last_to_every_local_update(tiny):
    # 20 training samples per client: batch 4 has no partial batch (the option changes nothing, bit
    # for bit); batch 8 has one of 4, which drop_last leaves out (a different model).
    assert run_fedavg(tiny, batch_size=4, drop_last=True) == run_fedavg(tiny, batch_size=4)
    on, off = run_fedavg(tiny, batch_size=8, drop_last=True), run_fedavg(tiny, batch_size=8)
    assert on[0][-1]["loss/train"] != off[0][-1]["loss/train"]


def fed(n, frac, pick="random", seed=0):
    raw = [(np.zeros((3, 2)), np.array([0, 1, 0]), np.zeros((1, 2)), np.array([1]))] * n
    return build_federated("t", raw, 2, DataArgs(seed=seed, val_frac=0.0, frac_unseen=frac, unseen_pick=pick), "t")


def test_unseen_pick_random_is_the_earlier_draw():
    expected = tuple(sorted(int(c) for c in numpy_rng(4, "unseen").permutation(10)[:3]))  # the stream `unseen`
    assert fed(10, 0.3, seed=4).unseen == expected
    assert DataArgs(seed=0).unseen_pick == "random" and C.RunConfig().unseen_pick == "random"


def test_unseen_pick_last_holds_out_the_last_client_indices():
    # longtanle/FeDEQ trainers/base.py:27-29, 43-55: clients [num_clients, num_total) are unseen.
    assert fed(10, 0.2, "last").unseen == (8, 9)
    assert fed(10, 0.2, "last").train_ids == list(range(8))
    assert fed(10, 0.0, "last").unseen == ()
    with pytest.raises(BenchError, match=r"^unknown unseen_pick 'first'; choose from last, random$"):
        fed(10, 0.2, "first")
    with pytest.raises(BenchError, match=r"^run.unseen_pick must be one of"):
        C.apply(C.default_config(), {"run.unseen_pick": "first"})


def token_batch(n=6, t=8, vocab=5):
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, vocab, (n, t), generator=g).float(), torch.randint(0, vocab, (n, t), generator=g)


def test_eval_dropout_off_evaluates_deterministically_and_draws_nothing():
    torch.manual_seed(0)
    net = build_model("transformer8", (8,), 5)
    x, y = token_batch()
    state = torch.random.get_rng_state()
    first = correct_and_loss(net, x, y)
    with job_options(Task("transformer8", (8,), 5)):
        assert correct_and_loss(net, x, y) == first
    assert torch.equal(torch.random.get_rng_state(), state)  # no dropout mask was drawn


def test_eval_dropout_evaluates_as_the_reference_with_is_training_true():
    # longtanle/FeDEQ utils/jax_utils.py:362-364 `seq_pred_fn` calls model.apply without is_training,
    # whose default is True (utils/model_utils.py:1182, 1236): evaluation with dropout on. For a model
    # whose only train-mode difference is dropout, that is its train-mode forward.
    torch.manual_seed(0)
    net = build_model("transformer8", (8,), 5)
    x, y = token_batch()
    with job_options(Task("transformer8", (8,), 5, eval_dropout=True)):
        torch.manual_seed(7)
        on = correct_and_loss(net, x, y)
        torch.manual_seed(7)
        assert correct_and_loss(net, x, y) == on  # masks from the seeded global generator: reruns agree
    net.train()
    torch.manual_seed(7)
    with torch.no_grad():
        logits = net(x)
    loss = float(torch.nn.functional.cross_entropy(logits.reshape(-1, 5), y.reshape(-1), reduction="sum"))
    assert on[1] == pytest.approx(loss, rel=1e-6)
    assert on != correct_and_loss(net, x, y)  # outside the job: no dropout, another loss


def test_eval_dropout_leaves_batch_norm_in_eval_mode():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Dropout(0.0))
    with job_options(Task("mlp", (3,), 4, eval_dropout=True)):
        eval_mode(net)
    assert [m.training for m in net] == [False, False, True, False]
    eval_mode(net)
    assert not any(m.training for m in net.modules())


def write_token_npz(path, clients=3, n=40, t=6, vocab=5):
    """Token-id windows (ids 1..vocab-1) with one next-token label each: a tiny transformer task."""
    rng = np.random.default_rng(0)
    arrays = {}
    for k in range(clients):
        for split in ("train", "test"):
            arrays[f"{split}_x_{k}"] = rng.integers(1, vocab, (n, t)).astype(np.float32)
            y = rng.integers(0, vocab, n)
            y[:vocab] = np.arange(vocab)  # every class present: num_classes == vocab
            arrays[f"{split}_y_{k}"] = y
    np.savez(path, **arrays)
    return str(path)


def test_the_worker_evaluates_every_method_with_seeded_dropout(tmp_path):
    npz = write_token_npz(tmp_path / "tokens.npz")

    def rows(**run):
        cfg = tiny_config(npz, methods="fedavg", rounds=1, val_frac=0.0, model="transformer8", batch_size=4, **run)
        res = engine.run_method(cfg, "fedavg", 0, load_dataset(cfg, 0), SerialBackend())
        return [{k: h[k] for k in NUMBERS} for h in res.history], [(r["cid"], r["test_acc"]) for r in res.clients]

    on = rows(eval_dropout=True)
    assert rows(eval_dropout=True) == on  # the `global` stream of each evaluation job: reruns agree
    off = rows()
    assert off[0][-1]["loss/train"] == on[0][-1]["loss/train"]  # training is untouched
    assert off[1] != on[1]  # the evaluation is not
