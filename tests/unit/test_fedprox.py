"""FedProx (methods/fedprox.py): w_i <- w_i - lr (grad CE(w_i) + mu (w_i - w)); mu = 0 is FedAvg bit for bit."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.experiment import load_dataset
from bench.loop import engine
from bench.loop.backends import Kind, SerialBackend
from fedeq_bench.core import seeding
from fedeq_bench.methods.base import ClientTensors, Task
from fedeq_bench.methods.fedprox import FedProx, FedProxConfig
from tests.helpers import tiny_config, write_tiny_npz

# Wall-clock and process-size metrics are measurements of the machine, not of the computation.
NONDETERMINISTIC = {"time/round_s", "mem/peak_rss_bytes"}


def ce_grad(W, b, x, y):
    """Gradient of mean CE(x W^T + b, y) by hand: G = (softmax(z) - onehot(y)) / n, dW = G^T x, db = sum_rows G."""
    p = torch.softmax(x @ W.T + b, dim=1)
    G = (p - F.one_hot(y, 3).to(p.dtype)) / len(y)
    return G.T @ x, G.sum(0)


def test_prox_term_adds_mu_times_drift_to_the_gradient():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    d = ClientTensors(x, y, x[:2], y[:2], x[:4], y[:4])
    W, b = 0.1 * torch.arange(12.0).reshape(3, 4) - 0.5, torch.tensor([0.2, -0.1, 0.0])

    def update(mu):
        # Two full-batch epochs (n = batch = 8): two SGD steps.
        # The scratch network: a tiny linear model, prebuilt (Task's model is not built).
        algo = FedProx(FedProxConfig(lr=0.1, local_epochs=2, batch_size=8, mu=mu), Task("mlp", (4,), 3),
                       net=nn.Sequential(nn.Linear(4, 3)))
        up, _, m = algo.local_update({"0.weight": W, "0.bias": b}, {}, d, seeding.generator(0, "local", 1, 0))
        assert m["steps"] == 2
        return up["0.weight"], up["0.bias"]

    gW, gb = ce_grad(W, b, x, y)
    W1, b1 = W - 0.1 * gW, b - 0.1 * gb                  # step 1: w_i = w, so mu (w_i - w) = 0
    gW1, gb1 = ce_grad(W1, b1, x, y)
    W2, b2 = W1 - 0.1 * (gW1 + 2.0 * (W1 - W)), b1 - 0.1 * (gb1 + 2.0 * (b1 - b))  # step 2 with mu = 2
    uW, ub = update(mu=2.0)
    assert torch.allclose(uW, W2, atol=1e-6) and torch.allclose(ub, b2, atol=1e-6)
    # Against FedAvg (mu = 0) the difference is -lr * mu * (W1 - W) = -0.1 * 2 * (-0.1 * gW) = 0.02 * gW.
    fW, _ = update(mu=0.0)
    assert torch.allclose(uW - fW, 0.02 * gW, atol=1e-6)
    assert float((uW - fW).abs().max()) > 1e-4


class RecordingBackend(SerialBackend):
    """SerialBackend that keeps every encoded upload, keyed by (round, client)."""

    def __init__(self):
        super().__init__()
        self.uploads = {}

    def run(self, kind, spec, jobs, seed, rnd, measure=frozenset()):
        out = super().run(kind, spec, jobs, seed, rnd, measure)
        if kind is Kind.TRAIN:
            self.uploads.update({(rnd, r.cid): bytes(r.up) for r in out})
        return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_npz(tmp_path_factory.mktemp("d") / "tiny.npz", clients=6)


def run(tiny, method, **sets):
    # 18 training samples per client < batch 32: one step per epoch, and FedProx's first step is
    # FedAvg's (w_i = w); two epochs give the prox term something to change.
    cfg = tiny_config(tiny, methods=method, rounds=2, fraction=0.5, frac_unseen=0.2, local_epochs=2, **sets)
    backend = RecordingBackend()
    return engine.run_method(cfg, method, 0, load_dataset(cfg, 0), backend), backend.uploads


def test_mu_zero_is_fedavg_bit_for_bit_through_the_engine(tiny):
    avg, avg_up = run(tiny, "fedavg")
    prox, prox_up = run(tiny, "fedprox", **{"fedprox.mu": 0.0})
    assert len(avg.history) == len(prox.history) == 2
    for a, p in zip(avg.history, prox.history, strict=True):
        a = {k: v for k, v in a.items() if k not in NONDETERMINISTIC}
        p = {k: v for k, v in p.items() if k not in NONDETERMINISTIC}
        assert a == p  # exact float equality: accuracy, loss, bytes, memory
    assert avg.ledger.entries == prox.ledger.entries
    assert set(avg_up) == set(prox_up) and any(r == 2 for r, _ in avg_up)
    assert all(avg_up[k] == prox_up[k] for k in avg_up)  # every upload, the final round's included: same bytes
    # And the comparison can fail: any mu > 0 changes the uploads.
    _, up01 = run(tiny, "fedprox", **{"fedprox.mu": 0.1})
    assert any(up01[k] != avg_up[k] for k in avg_up)
