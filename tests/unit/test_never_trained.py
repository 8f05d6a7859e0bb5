"""Clients never sampled (fraction < 1, bench/loop/engine.py): `clients/never_trained` every round, and at
the final evaluation those clients take the held-out path (init_client from the final server,
personalize, evaluate) for every method."""
import pytest
import torch

from bench.experiment import load_dataset
from bench.loop import engine
from bench.loop.backends import SerialBackend
from fedeq_bench.methods.fedavg import FedAvg
from tests.helpers import tiny_config, write_tiny_npz


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_npz(tmp_path_factory.mktemp("d") / "tiny.npz", clients=6)


def test_count_and_final_personalization_of_never_sampled_clients(tiny, monkeypatch):
    # Prepare: personalize marks the state; evaluate scores 1 on a marked state, 0 otherwise, so
    # acc/mean counts exactly the clients that went through personalize.
    personalized, joined = [], []
    new_client = engine.new_client

    def recording_new_client(algo, cid, server, seed):
        joined.append(cid)
        return new_client(algo, cid, server, seed)

    def personalize(self, down, state, data, rng):
        personalized.append(1)
        return dict(state, personalized=torch.tensor(1.0))

    def evaluate(self, down, state, data, rng):
        acc = 1.0 if "personalized" in state else 0.0
        return {"test_acc": acc, "test_n": 1.0, "test_loss": 0.0, "val_acc": acc, "val_n": 1.0}

    monkeypatch.setattr(FedAvg, "personalize", personalize)
    monkeypatch.setattr(FedAvg, "evaluate", evaluate)
    monkeypatch.setattr(engine, "new_client", recording_new_client)
    cfg = tiny_config(tiny, methods="fedavg", rounds=3, eval_every=1, fraction=0.34)
    ds = load_dataset(cfg, 0)
    schedule = engine.make_schedule(0, ds.train_ids, 3, 0.34)  # round(0.34 * 6) = 2 clients a round

    # Execute
    res = engine.run_method(cfg, "fedavg", 0, ds, SerialBackend())

    # Assert: the count after each round is what the schedule leaves untouched so far ...
    seen, counts = set(), []
    for cohort in schedule:
        seen |= set(cohort)
        counts.append(len(set(ds.train_ids) - seen))
    assert [h["clients/never_trained"] for h in res.history] == counts
    never = counts[-1]
    assert never >= 1  # 3 rounds of 2 out of 6: this seed leaves some client unsampled
    untouched = sorted(set(ds.train_ids) - seen)
    # A training client joins whenever its state is read before it first trained (here every
    # evaluation reads everyone); the never-sampled join last, again, from the final server.
    assert set(joined) == set(ds.train_ids)
    assert joined[-len(untouched):] == untouched
    # ... earlier evaluations score everyone as they are (nobody personalized) ...
    assert res.history[0]["acc/mean"] == res.history[1]["acc/mean"] == 0.0
    # ... and the final one personalizes exactly the never-sampled clients: never / 6 of them score 1.
    assert len(personalized) == never
    assert res.final["acc/mean"] == never / len(ds.train_ids)
    assert res.final["acc/weighted"] == never / len(ds.train_ids)
    # The never-sampled clients sent nothing: they are absent from the ledger.
    assert len({e[1] for e in res.ledger.entries}) == len(ds.train_ids) - never


def test_full_participation_leaves_nobody_untrained(tiny):
    cfg = tiny_config(tiny, methods="fedavg", rounds=1)  # fraction 1: every client in round 1
    res = engine.run_method(cfg, "fedavg", 0, load_dataset(cfg, 0), SerialBackend())
    assert res.final["clients/never_trained"] == 0.0


def test_a_never_sampled_client_that_fails_is_named_so():
    assert engine.client_label(4, engine.Kind.EVALUATE_UNSEEN, never_trained=True) == \
        "never-trained client 4 (personalization and evaluation)"
    assert engine.client_label(4, engine.Kind.EVALUATE_UNSEEN) == \
        "held-out client 4 (personalization and evaluation)"
