"""bench/loop/engine.py: schedule, exact bytes per round, metrics, client store, ledger contents, random
streams, and errors that name method, round and client."""
import collections
import math

import pytest
import torch

from bench.experiment import load_dataset
from bench.loop import engine, wire
from bench.loop.backends import Kind, SerialBackend
from fedeq_bench.core import seeding
from fedeq_bench.core.errors import BenchError
from fedeq_bench.methods.fedavg import FedAvg
from tests.helpers import tiny_config, write_tiny_npz

# The tiny task: 4 features, 3 classes, model mlp = body (Linear(4,200), Linear(200,200)) + head Linear(200,3).
# Encoded size of each entry: 2 + len(name) + 1 + 1 + 4 * ndim + 8 + numel * 4 (bench/loop/wire.py layout).
BODY_1_W = 2 + len("body.1.weight") + 2 + 4 * 2 + 8 + 200 * 4 * 4      # 3233
BODY_1_B = 2 + len("body.1.bias") + 2 + 4 * 1 + 8 + 200 * 4            # 827
BODY_3_W = 2 + len("body.3.weight") + 2 + 4 * 2 + 8 + 200 * 200 * 4    # 160033
BODY_3_B = BODY_1_B                                                      # 827
HEAD_W = 2 + len("head.weight") + 2 + 4 * 2 + 8 + 3 * 200 * 4          # 2431
HEAD_B = 2 + len("head.bias") + 2 + 4 * 1 + 8 + 3 * 4                  # 37
NUM_SAMPLES = 2 + len("num_samples") + 2 + 0 + 8 + 8                    # 31
HEADER = 8
BODY = BODY_1_W + BODY_1_B + BODY_3_W + BODY_3_B


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_npz(tmp_path_factory.mktemp("d") / "tiny.npz", clients=6)


def run(tiny, method, **kw):
    cfg = tiny_config(tiny, methods=method, **kw)
    ds = load_dataset(cfg, 0)
    return engine.run_method(cfg, method, 0, ds, SerialBackend()), ds


def test_entry_sizes_match_the_hand_arithmetic():
    assert (BODY_1_W, BODY_1_B, BODY_3_W, HEAD_W, HEAD_B, NUM_SAMPLES) == (3233, 827, 160033, 2431, 37, 31)


def test_fedavg_bytes_are_cohort_times_down_plus_up(tiny):
    res, _ = run(tiny, "fedavg", fraction=0.5)  # 6 clients * 0.5 = a cohort of 3 per round
    down = HEADER + BODY + HEAD_W + HEAD_B   # all parameters
    up = down + NUM_SAMPLES                  # ... and n_i
    for rnd, h in enumerate(res.history, 1):
        assert h["bytes/down"] == 3 * down == 3 * 167396
        assert h["bytes/up"] == 3 * up == 3 * 167427
        assert h["bytes/cumulative"] == rnd * 3 * (down + up)
    assert res.ledger.total() == 2 * 3 * (down + up)


def test_fedrep_sends_only_the_body_and_never_the_head(tiny):
    res, _ = run(tiny, "fedrep")
    down = HEADER + BODY
    assert res.history[0]["bytes/down"] == 6 * down == 6 * 164928
    assert res.history[0]["bytes/up"] == 6 * (down + NUM_SAMPLES)
    sent = res.ledger.keys_sent()
    assert sent == {"body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias", "num_samples"}
    assert not any(k.startswith("head.") for k in sent)
    assert (res.params_shared, res.params_personal) == (4 * 200 + 200 + 200 * 200 + 200, 200 * 3 + 3)


def test_schedule_is_drawn_up_front_and_shared_by_methods():
    ids = list(range(10))
    a = engine.make_schedule(7, ids, 5, 0.3)
    assert a == engine.make_schedule(7, ids, 5, 0.3)       # a pure function of (seed, round)
    assert a != engine.make_schedule(8, ids, 5, 0.3)
    assert all(len(c) == 3 and c == sorted(set(c)) for c in a)  # round(0.3 * 10) = 3 distinct ids
    assert engine.make_schedule(7, ids, 3, 0.3) == a[:3]   # round r does not depend on the horizon
    assert engine.make_schedule(0, ids, 2, 0.01) == [[c] for c in (engine.make_schedule(0, ids, 2, 0.01)[0][0],
                                                                     engine.make_schedule(0, ids, 2, 0.01)[1][0])]


def test_every_metric_every_round_and_final_is_the_last_round(tiny):
    res, ds = run(tiny, "fedavg", rounds=3, eval_every=2)
    assert len(res.history) == 3
    for rnd, h in enumerate(res.history, 1):
        assert set(engine.ROUND_METRICS) <= set(h)
        assert (set(engine.EVAL_METRICS) <= set(h)) == (rnd in (2, 3))  # every 2nd round, and always the last
    assert res.final is res.history[-1]
    assert 0 < res.final["mem/peak_train_bytes"] and 0 < res.final["mem/peak_rss_bytes"]


def test_accuracy_metrics_arithmetic():
    evals = [{"test_acc": a, "test_n": n, "val_acc": v, "val_n": 1.0}
             for a, n, v in [(1.0, 10, 0.5), (0.5, 30, 0.5), (0.0, 10, 1.0)] + [(0.9, 10, 0.0)] * 8]
    m = engine.accuracy_metrics(evals)
    assert math.isclose(m["acc/mean"], (1.0 + 0.5 + 0.0 + 0.9 * 8) / 11)
    assert math.isclose(m["acc/weighted"], (1.0 * 10 + 0.5 * 30 + 0 + 0.9 * 10 * 8) / (10 + 30 + 10 + 80))
    # 11 clients: the worst decile is ceil(11 / 10) = 2 clients: 0.0 and 0.5.
    assert math.isclose(m["acc/bottom10"], (0.0 + 0.5) / 2)
    assert math.isclose(m["acc/val"], (0.5 + 0.5 + 1.0) / 11)


def test_unseen_clients_never_train_and_are_evaluated(tiny):
    res, ds = run(tiny, "fedrep", frac_unseen=0.34)  # round(0.34 * 6) = 2 held out
    assert len(ds.unseen) == 2
    trained = {e[1] for e in res.ledger.entries}
    assert trained == set(range(6)) - set(ds.unseen)
    assert all(0.0 <= h["acc/unseen"] <= 1.0 for h in res.history)


def test_solver_stats_reduce_max_or_mean():
    per = [{"deq/residual_max": 0.1, "deq/nstep_mean": 4.0, "apfl/alpha": 0.2, "loss": 1.0},
           {"deq/residual_max": 0.3, "deq/nstep_mean": 6.0, "apfl/alpha": 0.4, "loss": 3.0}]
    # max of (0.1, 0.3); mean of (4, 6) and of (0.2, 0.4); `loss` is reduced by the engine itself.
    assert engine.reduce_client_metrics(per) == pytest.approx(
        {"deq/nstep_mean": 5.0, "deq/residual_max": 0.3, "apfl/alpha": 0.3})


def test_initial_model_is_the_same_for_every_method_and_depends_on_seed(tiny):
    cfg = tiny_config(tiny)
    ds = load_dataset(cfg, 0)
    a = engine.build_initial_model("mlp", ds, 0).state_dict()
    b = engine.build_initial_model("mlp", ds, 0).state_dict()
    c = engine.build_initial_model("mlp", ds, 1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])


def test_encode_cache_reuses_only_unchanged_tensors():
    cache = engine.EncodeCache()
    w = torch.zeros(3)
    a = cache.encode({"w": w})
    assert cache.encode({"w": w}) is a                   # same tensor, same version: same bytes object
    w.add_(1.0)                                          # an in-place change bumps the version
    b = cache.encode({"w": w})
    assert b is not a and torch.equal(wire.decode(b)["w"], torch.ones(3))
    assert cache.encode({"w": w.clone()}) == b           # another tensor is encoded afresh (equal bytes)


def test_the_driver_never_builds_on_the_actors_device(tiny):
    """On a GPU cluster the head may have no GPU: the server side must stay on CPU.

    The backend below tells the engine its actors train on `cuda` (no GPU is needed) and runs
    the clients on CPU itself; before the fix the driver built FeDEQ's network on `cuda` and failed.
    """
    import dataclasses

    def on_cpu(spec):
        return dataclasses.replace(spec, task=dataclasses.replace(spec.task, device="cpu"))

    class CudaActors(SerialBackend):
        def set_dataset(self, key, dataset):
            super().set_dataset(key, dataset)
            return "cuda"

        def run(self, kind, spec, jobs, seed, rnd, measure=frozenset()):
            assert spec.task.device == "cuda"  # what the actors are told
            return super().run(kind, on_cpu(spec), jobs, seed, rnd, measure)

    cfg = tiny_config(tiny, methods="fedeq", rounds=1, **{"fedeq.personal_epochs": 1, "fedeq.shared_epochs": 1})
    res = engine.run_method(cfg, "fedeq", 0, load_dataset(cfg, 0), CudaActors())
    assert res.history[0]["bytes/up"] > 0


def test_every_stream_is_drawn_once_per_ids_except_client_init_of_late_joiners(tiny, monkeypatch):
    """Each (stream, ids) is drawn once per run, with one exception: `engine.new_client`, the one call
    site of ("client_init", cid), draws it whenever a client's state is made: a training client's
    each time it is read before the client first trained (the store keeps no untrained state, see
    bench/loop/store.py), a held-out client at every evaluation, a training client never sampled at the
    final evaluation (the same numbers each time).

    A never-sampled client's final evaluation is the held-out path: ("personalize", rnd, cid) and
    ("global", 2, rnd, cid) instead of ("global", 1, rnd, cid); ("eval", rnd, cid) either way.
    """
    cfg = tiny_config(tiny, methods="fedrep", rounds=2, eval_every=1, fraction=0.5, frac_unseen=0.34)
    ds = load_dataset(cfg, 0)
    schedule = engine.make_schedule(0, ds.train_ids, 2, 0.5)  # before recording: it draws "schedule" too
    never = sorted(set(ds.train_ids) - set(schedule[0]) - set(schedule[1]))
    drawn = collections.Counter()
    derive = seeding.derive

    def recording(seed, stream, *ids):
        drawn[(stream, *ids)] += 1
        return derive(seed, stream, *ids)

    monkeypatch.setattr(seeding, "derive", recording)  # generator() and numpy_rng() call it too
    engine.run_method(cfg, "fedrep", 0, ds, SerialBackend())

    expected = collections.Counter([("init",), ("server_init",), ("schedule", 1), ("schedule", 2)])
    first = {c: min((r for r, cohort in enumerate(schedule, 1) if c in cohort), default=None) for c in ds.train_ids}
    for rnd in (1, 2):  # both rounds are evaluated (eval_every=1)
        fresh = never if rnd == 2 else []  # only the final evaluation personalizes the never-sampled
        expected.update(("local", rnd, c) for c in schedule[rnd - 1])
        # A training client not trained yet reads as init_client: at its first local update, and at
        # an evaluation that finds it untrained (the final one sends the never-sampled the other way).
        expected.update(("client_init", c) for c in ds.train_ids if first[c] == rnd)
        expected.update(("client_init", c) for c in ds.train_ids
                        if (first[c] is None or first[c] > rnd) and c not in fresh)
        expected.update(("eval", rnd, c) for c in ds.train_ids + list(ds.unseen))
        expected.update(("personalize", rnd, c) for c in list(ds.unseen) + fresh)
        expected.update(("client_init", c) for c in list(ds.unseen) + fresh)
        # Each client job seeds torch's global generator from ("global", kind, rnd, cid); kinds are
        # numbered in Kind's order: 0 train (the cohort), 1 evaluate (training clients), 2 held-out path.
        expected.update(("global", 0, rnd, c) for c in schedule[rnd - 1])
        expected.update(("global", 1, rnd, c) for c in ds.train_ids if c not in fresh)
        expected.update(("global", 2, rnd, c) for c in list(ds.unseen) + fresh)
    assert len(ds.unseen) == 2 and set(ds.unseen).isdisjoint(ds.train_ids)
    assert len(never) >= 1  # 4 training clients, 2 per round: this seed leaves some unsampled
    assert drawn == expected, (drawn - expected, expected - drawn)
    late = [c for c in ds.train_ids if first[c] == 2]  # read untrained by round 1's evaluation, then trained
    assert late and {k: n for k, n in drawn.items() if n > 1} == \
        {("client_init", c): 2 for c in [*ds.unseen, *never, *late]}


def test_failure_names_method_round_and_place():
    assert str(engine.failure("fedeq", 3, "solver diverged", engine.client_label(7))) == \
        "fedeq: round 3, client 7: solver diverged"
    assert str(engine.failure("fedeq", 3, "boom")) == "fedeq: round 3, server: boom"
    assert engine.client_label(7, Kind.EVALUATE) == "client 7 (evaluation)"
    assert engine.client_label(7, Kind.EVALUATE_UNSEEN).startswith("held-out client 7 ")


def test_an_error_in_aggregate_names_method_and_round(tiny, monkeypatch):
    aggregate = FedAvg.aggregate

    def flaky(self, server, replies, rnd):
        if rnd == 2:
            raise BenchError("solver diverged (residual nan)")
        return aggregate(self, server, replies, rnd)

    monkeypatch.setattr(FedAvg, "aggregate", flaky)
    rounds = []
    cfg = tiny_config(tiny, methods="fedavg", rounds=3)
    with pytest.raises(BenchError) as e:
        engine.run_method(cfg, "fedavg", 0, load_dataset(cfg, 0), SerialBackend(), lambda r, m: rounds.append(r))
    assert str(e.value) == "fedavg: round 2, server: solver diverged (residual nan)"
    assert rounds == [1]  # round 1 was reported before the failure


def test_an_error_in_local_update_names_method_round_and_client(tiny, monkeypatch):
    # Cohorts of round(0.5 * 6) = 3: the 4th local update is the first client of round 2's cohort
    # (Serial runs a cohort in client-id order).
    calls = []
    local_update = FedAvg.local_update

    def flaky(self, down, state, data, rng):
        calls.append(1)
        if len(calls) == 4:
            raise BenchError("solver diverged (residual inf)")
        return local_update(self, down, state, data, rng)

    monkeypatch.setattr(FedAvg, "local_update", flaky)
    cfg = tiny_config(tiny, methods="fedavg", rounds=2, fraction=0.5)
    ds = load_dataset(cfg, 0)
    with pytest.raises(BenchError) as e:
        engine.run_method(cfg, "fedavg", 0, ds, SerialBackend())
    first = engine.make_schedule(0, ds.train_ids, 2, 0.5)[1][0]
    assert str(e.value) == f"fedavg: round 2, client {first}: solver diverged (residual inf)"


@pytest.mark.parametrize("step, place", [("evaluate", "client {train} (evaluation)"),
                                         ("personalize", "held-out client {unseen} (personalization and evaluation)")])
def test_an_error_in_evaluation_names_method_round_and_client(tiny, monkeypatch, step, place):
    def broken(self, down, state, data, rng):
        raise BenchError("no test data")

    if step == "personalize":  # held-out clients only: training clients' evaluation must still pass
        monkeypatch.setattr(FedAvg, "personalize", broken)
    else:
        monkeypatch.setattr(FedAvg, "evaluate", broken)
    cfg = tiny_config(tiny, methods="fedavg", rounds=1, frac_unseen=0.34)
    ds = load_dataset(cfg, 0)
    with pytest.raises(BenchError) as e:
        engine.run_method(cfg, "fedavg", 0, ds, SerialBackend())
    # Clients run in id order: the first training client, or the first held-out one, fails first.
    assert str(e.value) == f"fedavg: round 1, {place.format(train=ds.train_ids[0], unseen=ds.unseen[0])}: no test data"


def test_a_bug_keeps_its_type_and_traceback_and_says_where(tiny, monkeypatch):
    """Only BenchError is bad input (one line); any other exception is a bug and stays one."""
    def aggregate(self, server, replies, rnd):
        return 1 / 0

    def local_update(self, down, state, data, rng):
        raise KeyError("w")

    cfg = tiny_config(tiny, methods="fedavg", rounds=1)
    ds = load_dataset(cfg, 0)
    with monkeypatch.context() as m:
        m.setattr(FedAvg, "aggregate", aggregate)
        with pytest.raises(ZeroDivisionError) as e:
            engine.run_method(cfg, "fedavg", 0, ds, SerialBackend())
        assert e.value.__notes__ == ["in fedavg: round 1, server"]
    monkeypatch.setattr(FedAvg, "local_update", local_update)
    with pytest.raises(KeyError) as e:
        engine.run_method(cfg, "fedavg", 0, ds, SerialBackend())
    assert e.value.__notes__ == ["in fedavg: round 1, client 0 (train)"]  # fraction 1: client 0 first


def test_cpu_memory_reaches_the_worker_and_changes_only_the_memory_metric(tiny):
    # --cpu-memory travels in the Task of the method's spec to the worker that meters the update.
    # FedAvg's update also allocates its uplink copy and temporaries the parts count leaves out, so
    # live (the default) reads more; every other number is the same run's.
    parts, _ = run(tiny, "fedavg", cpu_memory="parts")
    live, _ = run(tiny, "fedavg")
    key = "mem/peak_train_bytes"
    for a, b in zip(parts.history, live.history, strict=True):
        assert {k: v for k, v in a.items() if k not in {key, "time/round_s", "mem/peak_rss_bytes"}} == \
               {k: v for k, v in b.items() if k not in {key, "time/round_s", "mem/peak_rss_bytes"}}
    assert live.history[0][key] > parts.history[0][key] > 0
