"""bench/engine.py: schedule, exact bytes per round, metrics, client store, ledger contents."""
import math

import pytest
import torch

from fedeq_bench.bench import engine, wire
from fedeq_bench.bench.backends import SerialBackend
from fedeq_bench.bench.run import load_dataset
from tests.helpers import tiny_config, write_tiny_npz

# The tiny task: 4 features, 3 classes, model mlp = body (Linear(4,200), Linear(200,200)) + head Linear(200,3).
# Encoded size of each entry: 2 + len(name) + 1 + 1 + 4 * ndim + 8 + numel * 4 (bench/wire.py layout).
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

    The backend below tells the engine its actors train on `cuda` (this machine has none) and runs
    the clients on CPU itself; before the fix the driver built FeDEQ's network on `cuda` and failed.
    """
    import dataclasses

    def on_cpu(spec):
        return dataclasses.replace(spec, task=dataclasses.replace(spec.task, device="cpu"))

    class CudaActors(SerialBackend):
        def set_dataset(self, key, dataset):
            super().set_dataset(key, dataset)
            return "cuda"

        def train(self, spec, tasks, seed, rnd, measure=frozenset()):
            assert spec.task.device == "cuda"  # what the actors are told
            return super().train(on_cpu(spec), tasks, seed, rnd, measure)

        def evaluate(self, spec, tasks):
            return super().evaluate(on_cpu(spec), tasks)

    cfg = tiny_config(tiny, methods="fedeq", rounds=1, **{"fedeq.personal_epochs": 1, "fedeq.shared_epochs": 1})
    res = engine.run_method(cfg, "fedeq", 0, load_dataset(cfg, 0), CudaActors())
    assert res.history[0]["bytes/up"] > 0
