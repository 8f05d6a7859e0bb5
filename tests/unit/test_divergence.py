"""bench/loop/divergence.py: finding a NaN or inf in nested states and messages."""
from __future__ import annotations

import torch

from bench.loop.divergence import first_nonfinite


def test_finite_trees_pass_and_the_first_bad_leaf_is_named():
    ok = {"w": torch.ones(3), "steps": torch.tensor([1, 2]), "head": [torch.zeros(2), 0.5], "n": 3}
    assert first_nonfinite(ok) is None
    bad = {**ok, "head": [torch.zeros(2), torch.tensor([0.0, float("nan")])], "z": torch.tensor(float("inf"))}
    assert first_nonfinite(bad) == "head.1"  # dict order, then list index; "z" comes later
    assert first_nonfinite({"loss": float("inf")}) == "loss"
    assert first_nonfinite(torch.tensor([float("-inf")])) == "value"
    assert first_nonfinite({"ids": torch.tensor([2**62])}) is None  # integers are never non-finite


import pytest  # noqa: E402

from fedeq_bench.methods import METHODS  # noqa: E402


def run(method, sets, rounds=1):
    from bench import config as C
    from bench import experiment
    from bench.loop import engine
    from bench.loop.backends import SerialBackend

    cfg = experiment.validate(C.apply(C.default_config(), {"methods": method, "dataset": "synthetic", "clients": 4,
                                                           "rounds": rounds, "backend": "serial", **sets}))
    return engine.run_method(cfg, method, 0, experiment.load_dataset(cfg, 0), SerialBackend())


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_stops_at_the_first_non_finite_update_naming_method_round_and_client(method):
    """A step size of 1e12 overflows any model's weights in round 1. Before, only DEQ solves checked:
    FedAvg, pFedMe (lam=1e30), Ditto ... trained on NaN to the end and FINISHED at chance accuracy."""
    from fedeq_bench.core.errors import BenchError

    # pFedMe's steps are personal_lr and eta, not lr; lam=1e30 blows its proximal term up instead.
    sets = {"pfedme.lam": 1e30} if method == "pfedme" else {f"{method}.lr": 1e12}
    with pytest.raises(BenchError, match=rf"^{method}: round 1, client \d+: .*diverged"):
        run(method, sets)


def test_a_non_finite_server_state_after_aggregation_stops_the_run(monkeypatch):
    from fedeq_bench.core.errors import BenchError
    from fedeq_bench.methods.fedavg import FedAvg

    real = FedAvg.aggregate

    def nan_aggregate(self, server, replies, rnd):
        server, metrics = real(self, server, replies, rnd)
        name = sorted(server)[0]
        return {**server, name: server[name] * float("nan")}, metrics

    monkeypatch.setattr(FedAvg, "aggregate", nan_aggregate)
    with pytest.raises(BenchError, match=r"^fedavg: round 1, server: diverged: non-finite server state \S+ after the "
                                         r"aggregate; lower the learning rate or the penalty$"):
        run("fedavg", {})
