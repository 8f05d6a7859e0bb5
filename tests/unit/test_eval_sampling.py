"""--eval-clients N (bench/loop/engine.py): evaluations before the last round score a sample of N training
(and N held-out) clients drawn from the `eval_sample` stream, the same for every method; the last
round scores everyone; with N at least the number of clients nothing changes."""
import math

import numpy as np
import pytest

from bench.experiment import load_dataset, validate
from bench.loop import engine
from bench.loop.backends import Kind, SerialBackend
from bench.run import resolve_config
from fedeq_bench.core import seeding
from fedeq_bench.core.errors import BenchError
from tests.helpers import tiny_config, write_tiny_npz

ROUNDS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # 10 clients, round(0.3 * 10) = 3 held out: 7 training clients, so a sample of 2 is a real draw
    # in both groups.
    return write_tiny_npz(tmp_path_factory.mktemp("d") / "tiny.npz", clients=10)


class Recording(SerialBackend):
    """The serial backend, noting which clients each call ran and their metrics."""

    def __init__(self):
        super().__init__()
        self.cids: dict[tuple[Kind, int], list[int]] = {}
        self.metrics: dict[tuple[Kind, int, int], dict] = {}

    def run(self, kind, spec, jobs, seed, rnd, measure=frozenset()):
        results = super().run(kind, spec, jobs, seed, rnd, measure)
        self.cids.setdefault((kind, rnd), []).extend(j.cid for j in jobs)
        self.metrics.update({(kind, rnd, r.cid): r.metrics for r in results})
        return results


def run(tiny, method, **kw):
    cfg = tiny_config(tiny, methods=method, rounds=ROUNDS, eval_every=1, frac_unseen=0.3, **kw)
    ds = load_dataset(cfg, 0)
    backend = Recording()
    return engine.run_method(cfg, method, 0, ds, backend), backend, ds


UNSTABLE = ("time/round_s", "mem/peak_rss_bytes")  # wall clock and the process's RSS


def same(a, b):
    keys = a.keys() - set(UNSTABLE)
    return keys == b.keys() - set(UNSTABLE) and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k]))
                                                    for k in keys)


def test_the_sample_is_a_pure_function_of_seed_round_and_group():
    ids = list(range(100))
    a = engine.eval_sample(0, 3, ids, 10)
    # numpy's choice without replacement from the declared stream, in client-id order.
    want = seeding.numpy_rng(0, "eval_sample", 3, 0).choice(np.arange(100), 10, replace=False)
    assert a == sorted(want.tolist()) and len(set(a)) == 10
    assert engine.eval_sample(0, 3, ids[::-1], 10) == a  # the order ids come in does not matter
    assert a != engine.eval_sample(0, 4, ids, 10)           # another round ...
    assert a != engine.eval_sample(1, 3, ids, 10)           # ... another seed ...
    assert a != engine.eval_sample(0, 3, ids, 10, group=1)  # ... the held-out group: other clients
    # N at least the group's size: everyone, with no draw at all.
    assert engine.eval_sample(0, 3, ids, 100) == engine.eval_sample(0, 3, ids, None) == ids
    assert engine.eval_sample(0, 3, [], 5) == []


def test_every_method_scores_the_same_sample_and_the_last_round_everyone(tiny):
    runs = {m: run(tiny, m, eval_clients=2)[1:] for m in ("fedavg", "fedrep", "ditto")}
    ds = runs["fedavg"][1]
    assert len(ds.train_ids) == 7 and len(ds.unseen) == 3
    samples = []
    for rnd in range(1, ROUNDS):
        want_train = engine.eval_sample(0, rnd, ds.train_ids, 2, 0)
        want_held = engine.eval_sample(0, rnd, ds.unseen, 2, 1)
        assert len(want_train) == len(want_held) == 2
        for backend, _ in runs.values():
            assert backend.cids[(Kind.EVALUATE, rnd)] == want_train
            assert backend.cids[(Kind.EVALUATE_UNSEEN, rnd)] == want_held
        samples.append(want_train)
    assert samples[0] != samples[1]  # a new sample every round (this seed's draws)
    for backend, _ in runs.values():  # the last round: every training and every held-out client
        assert backend.cids[(Kind.EVALUATE, ROUNDS)] == ds.train_ids
        assert backend.cids[(Kind.EVALUATE_UNSEEN, ROUNDS)] == list(ds.unseen)


def test_a_sampled_round_reports_the_full_evaluation_restricted_to_its_sample(tiny):
    # Prepare: the same run evaluating everyone; a client's evaluation depends only on its own state
    # and its ("eval", rnd, cid) stream, never on who else is evaluated.
    full, full_backend, ds = run(tiny, "fedrep")
    # Execute
    sampled, _, _ = run(tiny, "fedrep", eval_clients=2)
    # Assert
    for rnd in range(1, ROUNDS):
        train = engine.eval_sample(0, rnd, ds.train_ids, 2, 0)
        held = engine.eval_sample(0, rnd, ds.unseen, 2, 1)
        want = engine.accuracy_metrics([full_backend.metrics[(Kind.EVALUATE, rnd, c)] for c in train])
        want["acc/unseen"] = engine.accuracy_metrics(
            [full_backend.metrics[(Kind.EVALUATE_UNSEEN, rnd, c)] for c in held])["acc/mean"]
        got = sampled.history[rnd - 1]
        assert {k: got[k] for k in want} == want
        # Training is untouched by what is evaluated.
        assert got["loss/train"] == full.history[rnd - 1]["loss/train"]
    assert same(sampled.final, full.final)  # the last round scores everyone: the same numbers
    assert sampled.clients == full.clients


def test_a_sample_at_least_as_large_as_the_federation_changes_nothing(tiny):
    full, _, _ = run(tiny, "ditto")
    big, _, _ = run(tiny, "ditto", eval_clients=7)  # 7 training clients, 3 held out
    assert all(same(a, b) for a, b in zip(full.history, big.history, strict=True))
    assert full.ledger.entries == big.ledger.entries


def test_flags_and_their_checks():
    cfg, _ = resolve_config(["--eval-clients", "50", "--state-budget-gb", "0.5", "--eval-every", "5"])
    assert (cfg.run.eval_clients, cfg.run.state_budget_gb, cfg.run.eval_every) == (50, 0.5, 5)
    assert resolve_config([])[0].run.eval_clients is None and resolve_config([])[0].run.state_budget_gb is None
    with pytest.raises(BenchError, match="eval_clients must be >= 1, got 0"):
        resolve_config(["--eval-clients", "0"])
    with pytest.raises(BenchError, match="state_budget_gb must be >= 0"):
        validate(tiny_config("x.npz", state_budget_gb=-1.0))
