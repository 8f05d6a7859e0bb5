"""bench/experiment/ and bench/tracking/: statistics over seeds, the table, and the lifecycle of
an MLflow run (read back from a real SQLite store with MlflowClient)."""
import math

import pytest
from mlflow.tracking import MlflowClient

from bench import experiment as X
from bench.loop import wire
from bench.loop.engine import MethodResult
from bench.report.stats import seed_stat
from bench.tracking import Pruned, Tracker
from tests.helpers import tiny_config, write_tiny_npz

# -- statistics over seeds ------------------------------------------------------------------------


def test_seed_stat_is_mean_and_sample_std():
    # mean = (0.80 + 0.84 + 0.86) / 3 = 2.50 / 3 = 0.8333...
    # deviations: 0.80 - 0.8333 = -0.0333, 0.84 - 0.8333 = 0.0067, 0.86 - 0.8333 = 0.0267
    # sample std (ddof=1) = sqrt((0.0333^2 + 0.0067^2 + 0.0267^2) / (3 - 1))
    #                     = sqrt((0.0011111 + 0.0000444 + 0.0007111) / 2) = sqrt(0.00093333) = 0.030551
    mean, std = seed_stat([0.80, 0.84, 0.86])
    assert mean == pytest.approx(2.50 / 3)
    d = [0.80 - 2.50 / 3, 0.84 - 2.50 / 3, 0.86 - 2.50 / 3]
    assert std == pytest.approx(math.sqrt((d[0] ** 2 + d[1] ** 2 + d[2] ** 2) / 2))
    assert std == pytest.approx(0.030551, abs=1e-6)
    # Not the population std (ddof=0), sqrt(0.0018667 / 3) = 0.024944, which numpy gives by default.
    assert std != pytest.approx(math.sqrt((d[0] ** 2 + d[1] ** 2 + d[2] ** 2) / 3))


def test_one_seed_has_no_std():
    assert seed_stat([0.8]) == (0.8, None)  # summary.json: [0.8, null], not a spread of 0
    with pytest.raises(ValueError):
        seed_stat([])


def result(method, seed, acc, up_bytes, wall_s=1.0, model="mlp"):
    """A MethodResult with one round: `acc` as every accuracy, `up_bytes` sent up, 2x that sent down."""
    r = MethodResult(method, seed, model, wall_s=wall_s + 10.0)  # the whole method: setup counted too
    r.history.append({"acc/mean": acc, "acc/weighted": acc, "acc/bottom10": acc,
                      "mem/peak_train_bytes": 2e6, "time/round_s": wall_s, "sim/time_cumulative_s": 12.5})
    r.ledger.record(1, 0, "up", b"x" * up_bytes, ["w"])
    r.ledger.record(1, 0, "down", b"x" * (2 * up_bytes), ["w"])
    return r


def test_summarize_groups_by_method_over_seeds():
    results = [result("fedavg", s, a, 1000) for s, a in zip((0, 1, 2), (0.80, 0.84, 0.86), strict=True)]
    results.append(result("fedrep", 0, 0.9, 3000))
    rows = X.summarize(results)
    assert [(r["method"], r["seeds"]) for r in rows] == [("fedavg", 3), ("fedrep", 1)]
    fedavg, fedrep = rows
    assert fedavg["acc/mean"] == seed_stat([0.80, 0.84, 0.86])
    assert fedavg["mb_up"] == (1000 / 1e6, 0.0) and fedavg["mb_down"] == (2000 / 1e6, 0.0)
    assert fedavg["peak_train_mb"].mean == pytest.approx(2e6 / 1e6)
    assert fedrep["acc/weighted"] == (0.9, None) and fedrep["mb_up"] == (3000 / 1e6, None)
    # wall s: the sum of time/round_s, as the report's (not the method's whole time, 10 s more here).
    assert fedrep["wall_s"] == (1.0, None)


# -- the table ------------------------------------------------------------------------------------

HEAD = ("| method | model | acc/mean | acc/weighted | acc/bottom10 | MB up | MB down | peak train MB | sim s "
        "| wall s |")


def test_table_with_one_seed_has_means_only():
    table = X.format_table(X.summarize([result("fedavg", 0, 0.8, 1_500_000, wall_s=2.0)]))
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].split("|")] == [c.strip() for c in HEAD.split("|")]
    assert set(lines[1]) == {"|", "-"}
    # 1.5e6 bytes up = 1.50 MB, 3.0e6 down = 3.00 MB, peak 2e6 bytes = 2.000 MB, 12.5 simulated s.
    assert [c.strip() for c in lines[2].split("|")[1:-1]] == \
        ["fedavg", "mlp", "0.8000", "0.8000", "0.8000", "1.50", "3.00", "2.000", "12.5", "2.0"]
    assert "±" not in table and len(lines) == 3


def test_table_with_several_seeds_shows_sample_std_even_when_zero():
    rows = X.summarize([result("fedavg", s, a, 1000) for s, a in zip((0, 1, 2), (0.80, 0.84, 0.86), strict=True)])
    table = X.format_table(rows)
    cells = [c.strip() for c in table.splitlines()[2].split("|")[1:-1]]
    assert cells[2] == "0.8333 ± 0.0306"  # the hand computation above, to 4 places
    assert cells[5] == "0.00 ± 0.00"  # equal bytes in every seed: ± 0, still shown
    assert "mean ± sample std (ddof=1) over 3 seeds" in table.splitlines()[-1]


# -- the run lifecycle ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one runs MLflow's migrations: seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    tracker = Tracker(uri, "lifecycle")
    return tracker, MlflowClient(tracking_uri=uri)


def child_of(client, tracker, parent):
    (run,) = client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    return run


def test_normal_exit_ends_finished(store):
    tracker, client = store
    with tracker.run("ok", {"a": "1"}) as run_id:
        assert client.get_run(run_id).info.status == "RUNNING"
        tracker.log_metrics(run_id, 1, {"m": 0.5})
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"a": "1"} and "pruned" not in run.data.tags


def test_exception_ends_failed_and_propagates(store):
    tracker, client = store
    with pytest.raises(ValueError, match="boom"):
        with tracker.run("bad", {}) as run_id:
            raise ValueError("boom")
    assert client.get_run(run_id).info.status == "FAILED"


def test_keyboard_interrupt_ends_killed(store):
    tracker, client = store
    with pytest.raises(KeyboardInterrupt):
        with tracker.run("stopped", {}) as run_id:
            raise KeyboardInterrupt
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and "pruned" not in run.data.tags


@pytest.mark.parametrize("pruned", [Pruned, "optuna"])
def test_pruned_ends_killed_with_a_tag_never_finished(store, pruned):
    tracker, client = store
    if pruned == "optuna":
        import optuna

        pruned = optuna.TrialPruned
    with pytest.raises(pruned):
        with tracker.run("pruned", {}) as run_id:
            raise pruned()
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["pruned"] == "true"


def test_a_child_failure_ends_child_and_parent(store):
    tracker, client = store
    with pytest.raises(RuntimeError):
        with tracker.run("parent", {}) as parent:
            with tracker.run("child ok", {}, parent=parent) as ok:
                pass
            with tracker.run("child bad", {}, parent=parent) as bad:
                raise RuntimeError("x")
    assert client.get_run(ok).info.status == "FINISHED"
    assert client.get_run(bad).info.status == "FAILED"
    assert client.get_run(bad).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(parent).info.status == "FAILED"


def test_unknown_status_is_refused(store):
    tracker, _ = store
    with pytest.raises(ValueError, match="PRUNED"):
        tracker.end("any", "DONE")


def test_run_one_pruned_by_on_round_keeps_its_rounds(store, tmp_path):
    """What a sweep's pruner will do: stop a child run after round 1; it ends pruned, round 1 kept."""
    from bench.experiment.load import make_backend

    tracker, client = store
    cfg = X.validate(tiny_config(write_tiny_npz(tmp_path / "t.npz"), methods="fedavg", rounds=3))
    ds = X.load_dataset(cfg, 0)

    def prune_after_1(rnd, metrics):
        if rnd == 1:
            raise Pruned

    backend = make_backend(cfg.run)
    try:
        with pytest.raises(Pruned), tracker.run("trial", {}) as parent:
            X.run_one(cfg, tracker, parent, backend, "fedavg", 0, ds, quiet=True, on_round=prune_after_1)
    finally:
        backend.close()
    run = child_of(client, tracker, parent)
    assert run.info.run_name == "fedavg seed=0"
    assert run.info.status == "KILLED" and run.data.tags["pruned"] == "true"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "bytes/up")] == [1]


def test_run_one_records_the_ledger_as_csv(store, tmp_path):
    from bench.experiment.load import make_backend

    tracker, client = store
    cfg = X.validate(tiny_config(write_tiny_npz(tmp_path / "t.npz"), methods="fedavg", rounds=2))
    backend = make_backend(cfg.run)
    try:
        with tracker.run("comparison", {}) as parent:
            res = X.run_one(cfg, tracker, parent, backend, "fedavg", 0, X.load_dataset(cfg, 0), quiet=True)
    finally:
        backend.close()
    run = child_of(client, tracker, parent)
    assert run.info.status == "FINISHED"
    path = client.download_artifacts(run.info.run_id, "ledger.csv", str(tmp_path))
    with open(path) as f:
        assert wire.from_csv(f.read()) == res.ledger.entries


def test_each_run_logs_its_final_evaluation_per_client_and_it_adds_up_to_the_metrics(report_store, tmp_path):
    """clients.csv holds one row per client; its numbers reproduce the run's final acc/* metrics:
    acc/mean = mean test_acc over training clients (never-trained ones included), acc/weighted =
    sum(test_acc * test_n) / sum(test_n), acc/unseen = mean over the held-out clients."""
    import csv

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=report_store["uri"])
    exp = client.get_experiment_by_name(report_store["experiment"])
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{report_store['parent']}'")
    assert len(children) == 6  # 3 methods x 2 seeds
    for r in children:
        path = client.download_artifacts(r.info.run_id, "clients.csv", str(tmp_path / r.info.run_id))
        rows = list(csv.DictReader(open(path)))
        assert [int(x["cid"]) for x in rows] == list(range(6))  # 6 clients, id order
        train = [x for x in rows if x["group"] in ("train", "never_trained")]
        unseen = [x for x in rows if x["group"] == "unseen"]
        assert len(unseen) == 1  # frac_unseen 0.2 of 6 clients
        acc = [float(x["test_acc"]) for x in train]
        n = [float(x["test_n"]) for x in train]
        m = r.data.metrics
        assert m["acc/mean"] == pytest.approx(sum(acc) / len(acc), rel=1e-12)
        assert m["acc/weighted"] == pytest.approx(sum(a * k for a, k in zip(acc, n, strict=True)) / sum(n), rel=1e-12)
        assert m["acc/unseen"] == pytest.approx(float(unseen[0]["test_acc"]), rel=1e-12)


@pytest.mark.parametrize("seeds", ["0,0", "1,2,1"])
def test_a_seed_listed_twice_is_refused(seeds):
    """`--seeds 0,0` would run seed 0 twice and report it as two seeds (a std of 0 over one run)."""
    from bench import config as C
    from bench import experiment
    from fedeq_bench.core.errors import BenchError

    cfg = C.apply(C.default_config(), {"methods": "fedavg", "dataset": "synthetic", "seeds": seeds})
    with pytest.raises(BenchError, match=rf"--seeds lists a seed twice: {seeds}; give distinct seeds"):
        experiment.validate(cfg)
