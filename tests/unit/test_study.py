"""bench/tuning/study.py: Optuna studies over the library, read back from Optuna's storage and MLflow.

Every study here is tiny: synthetic data, 6 clients, 2 rounds, the serial backend, FedAvg/FedRep
(the fastest methods), a search space written by the test (configs/sweeps/ is not assumed).
"""
from __future__ import annotations

import os
import time
from itertools import pairwise

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from bench import config as C
from bench import experiment
from bench.tuning import objectives, storage, study
from bench.tuning.study import SweepOptions
from tests.helpers import new_store

SPACE = """
fedavg.lr = {low = 0.01, high = 0.3, log = true}
fedrep.lr = {low = 0.01, high = 0.3, log = true}
fedrep.head_epochs = {low = 1, high = 3}
"""


@pytest.fixture
def env(tmp_path):
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    return {"uri": new_store(tmp_path / "mlflow.db"), "storage": f"sqlite:///{tmp_path}/optuna.db",
            "space": str(space), "tuned": str(tmp_path / "tuned" / "synthetic.toml")}


def make_cfg(env, methods="fedavg", seeds="0"):
    cfg = C.apply(C.default_config(), {"methods": methods, "dataset": "synthetic", "clients": 6, "rounds": 2,
                                       "backend": "serial", "seeds": seeds, "tracking_uri": env["uri"]})
    return experiment.validate(cfg)


def opts(env, **kw):
    base = dict(trials=3, space=env["space"], pruner="none", storage=env["storage"], tuned_out=env["tuned"],
                figures=False)
    base.update(kw)
    return SweepOptions(**base)


def runs(env, kind=None):
    client = MlflowClient(tracking_uri=env["uri"])
    exp = client.get_experiment_by_name("fedeq-bench")
    rs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in rs if kind is None or r.data.tags.get("kind") == kind]


class AlwaysPrune(optuna.pruners.BasePruner):
    """Prunes every trial at its first report: forces the pruned path whatever the values."""

    def prune(self, study, trial):
        return True


def test_three_trials_are_three_child_runs_with_their_params_and_the_best_goes_to_the_parent(env):
    cfg = make_cfg(env)
    (out,), tuned = study.sweep(cfg, opts(env, figures=True))

    trials = runs(env, "trial")
    (parent,) = runs(env, "sweep")
    assert len(trials) == 3 and out.trials == 3
    st = optuna.load_study(study_name="fedavg-synthetic", storage=env["storage"])
    by_number = {t.number: t for t in st.trials}
    for r in trials:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        n = int(r.data.params["trial_number"])
        assert float(r.data.params["trial.fedavg.lr"]) == by_number[n].params["fedavg.lr"]
        assert r.data.params["fedavg.lr"] == str(by_number[n].params["fedavg.lr"])  # the config the trial ran
        # The objective is the final acc/val; the test-named metrics are not logged on the validation view.
        assert r.data.metrics["acc/val"] == pytest.approx(by_number[n].value)
        assert "acc/mean" not in r.data.metrics
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["study"] == "fedavg-synthetic" and parent.data.tags["method"] == "fedavg"
    assert float(parent.data.params["best.fedavg.lr"]) == st.best_params["fedavg.lr"]
    assert parent.data.metrics["best/value"] == pytest.approx(st.best_value)
    # Test accuracy once, after the study, in its own child run, logged apart from the objective.
    (best,) = runs(env, "best-test")
    assert parent.data.metrics["best/test_acc"] == pytest.approx(best.data.metrics["acc/mean"])
    assert out.test_acc == pytest.approx(best.data.metrics["acc/mean"])
    # acc/weighted too, the headline of every report (one seed: the mean is the run's value).
    assert parent.data.metrics["best/test_acc_weighted"] == pytest.approx(best.data.metrics["acc/weighted"])
    assert out.test_weighted == pytest.approx(best.data.metrics["acc/weighted"])
    assert f"test acc/weighted={out.test_weighted:.4f} acc/mean={out.test_acc:.4f}" in study.format_outcomes([out])
    arts = {a.path for a in MlflowClient(tracking_uri=env["uri"]).list_artifacts(parent.info.run_id, "figures")}
    pytest.importorskip("matplotlib")  # figures are skipped silently without it
    # Three completed trials: no importances (fewer than bench/report/sweep.py MIN_IMPORTANCE_TRIALS).
    assert arts == {"figures/optimization_history.png", "figures/slice.png"}
    assert tuned == env["tuned"]


class Artifacts:
    """A tracker stand-in for `pareto.log_figures`: records the names it logs."""

    def __init__(self):
        self.client, self.logged = self, []

    def log_artifact(self, run_id, path, folder):
        self.logged.append(f"{folder}/{os.path.basename(path)}")


@pytest.mark.parametrize("completed", [4, 5])
def test_importances_are_drawn_only_from_5_completed_trials(completed):
    pytest.importorskip("matplotlib")
    from bench.report.sweep import MIN_IMPORTANCE_TRIALS
    from bench.tuning.pareto import log_figures

    st = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    st.optimize(lambda t: t.suggest_float("a", 0, 1) + t.suggest_float("b", 0, 1), n_trials=completed)

    def pruned(t):
        t.suggest_float("a", 0, 1), t.suggest_float("b", 0, 1)
        raise optuna.TrialPruned()

    st.optimize(pruned, n_trials=1)
    assert [t.state for t in st.trials].count(TrialState.COMPLETE) == completed  # the pruned one does not count
    tracker = Artifacts()
    log_figures(tracker, "run", st)
    drawn = "figures/param_importances.png" in tracker.logged
    assert drawn == (completed >= MIN_IMPORTANCE_TRIALS)
    assert {"figures/optimization_history.png", "figures/slice.png"} <= set(tracker.logged)


def test_a_pruned_trial_is_pruned_in_optuna_and_killed_with_a_tag_in_mlflow(env):
    (out,), tuned = study.sweep(make_cfg(env), opts(env, trials=2, pruner=AlwaysPrune()))

    st = optuna.load_study(study_name="fedavg-synthetic", storage=env["storage"])
    assert [t.state for t in st.trials] == [TrialState.PRUNED] * 2
    assert [t.last_step for t in st.trials] == [1, 1]  # pruned at its first evaluated round
    trials = runs(env, "trial")
    assert len(trials) == 2
    for r in trials:
        assert r.info.status == "KILLED" and r.data.tags["pruned"] == "true"
    assert out.best_value is None and tuned is None  # nothing completed: no winner to write


def test_resuming_adds_only_the_missing_trials_to_the_same_study(env):
    cfg = make_cfg(env)
    study.sweep(cfg, opts(env, trials=2, final_test=False))
    first = optuna.load_study(study_name="fedavg-synthetic", storage=env["storage"]).trials
    (out,), _ = study.sweep(cfg, opts(env, trials=3, final_test=False))

    st = optuna.load_study(study_name="fedavg-synthetic", storage=env["storage"])
    assert [t.number for t in st.trials] == [0, 1, 2] and out.trials == 3
    assert [t.params for t in st.trials[:2]] == [t.params for t in first]  # trials 0 and 1 untouched
    numbers = sorted(int(r.data.params["trial_number"]) for r in runs(env, "trial"))
    assert numbers == [0, 1, 2]  # one run per trial: none redone
    assert len(runs(env, "sweep")) == 2  # one parent per invocation, both under the same study tag


def test_methods_get_equal_budgets_and_a_tuned_preset_that_bench_run_loads(env):
    cfg = make_cfg(env, methods="fedavg,fedrep")
    outcomes, tuned = study.sweep(cfg, opts(env, trials=2, final_test=False, sampler_seed=7,
                                            configs=("configs/study/x.toml",)))
    # The header's rerun layers the sweep's own --config under the tuned values (their setting).
    assert f"Rerun on test: python -m bench.run --config configs/study/x.toml --config {tuned}\n" in open(tuned).read()

    assert [(o.method, o.trials) for o in outcomes] == [("fedavg", 2), ("fedrep", 2)]
    for o in outcomes:
        st = optuna.load_study(study_name=o.study_name, storage=env["storage"])
        assert len(st.trials) == 2
        assert st.study_name == f"{o.method}-synthetic"
    # The preset as `python -m bench.run --config FILE` reads it: load_toml, then apply.
    loaded = experiment.validate(C.apply(C.default_config(), C.load_toml(tuned)))
    assert loaded.run.methods == ("fedavg", "fedrep") and loaded.run.dataset == "synthetic"
    fedavg, fedrep = outcomes
    assert loaded.methods["fedavg"].lr == fedavg.best_params["fedavg.lr"]
    assert loaded.methods["fedrep"].lr == fedrep.best_params["fedrep.lr"]
    assert loaded.methods["fedrep"].head_epochs == fedrep.best_params["fedrep.head_epochs"]


class NoTestClient:
    """A client whose train and validation splits are real and whose test split raises when read."""

    def __init__(self, c):
        self.train_x, self.train_y, self.val_x, self.val_y = c.train_x, c.train_y, c.val_x, c.val_y

    @property
    def num_train(self):
        return int(self.train_y.shape[0])

    @property
    def test_x(self):
        raise AssertionError("a sweep read test_x")

    @property
    def test_y(self):
        raise AssertionError("a sweep read test_y")


def test_the_objective_never_reads_test_data(env):
    cfg = make_cfg(env, methods="fedavg", seeds="0,1")
    real = experiment.load_checked(cfg)
    for ds in real.values():
        ds.clients = [NoTestClient(c) for c in ds.clients]

    (out,), _ = study.sweep(cfg, opts(env, trials=2, final_test=False, pruner="median"), datasets=real)
    assert out.trials == 2 and out.best_value is not None
    # The trap is armed: the one step that must read test (the best trial on test) trips it.
    with pytest.raises(AssertionError, match="a sweep read test_"):
        study.sweep(cfg, opts(env, trials=2, final_test=True), datasets=real)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask() on a heartbeat storage, on purpose
def test_a_dead_process_trial_is_failed_in_optuna_and_its_mlflow_run_too(env):
    from bench.tracking import Tracker

    st = optuna.create_study(study_name="s", storage=storage.make_storage(env["storage"], heartbeat_s=1, grace_s=1))
    trial = st.ask()  # a trial whose process then died: RUNNING, heartbeat stops
    st._storage.record_heartbeat(trial._trial_id)
    tracker = Tracker(env["uri"], "fedeq-bench")
    orphan = tracker.start("trial 0", {}, tags={"study": "s", "trial_number": "0", "kind": "trial"})
    time.sleep(2.5)

    assert storage.end_orphans(tracker, st, "s") == 1
    assert st.trials[0].state == TrialState.FAIL
    assert tracker.client.get_run(orphan).info.status == "FAILED"


def test_bad_pruner_and_bad_space_are_bench_errors_before_anything_is_recorded(env, tmp_path):
    from fedeq_bench.core.errors import BenchError

    with pytest.raises(BenchError, match="unknown pruner 'medain'; choose from"):
        study.sweep(make_cfg(env), opts(env, pruner="medain"))
    bad = tmp_path / "bad.toml"
    bad.write_text("fedavg.lr = {low = 0.3, high = 0.01}\n")
    with pytest.raises(BenchError, match="low must be below high"):
        study.sweep(make_cfg(env), opts(env, space=str(bad)))
    with pytest.raises(BenchError, match="no entry for fedavg"):
        study.sweep(make_cfg(env), opts(env, params=("fedrep.lr",)))


def test_a_trial_whose_training_fails_is_fail_and_the_study_still_gets_its_trials(env, monkeypatch, capsys):
    from fedeq_bench.core.errors import BenchError

    real_run_one, calls = experiment.run_one, []

    def run_one(*args, on_round=None, **kw):
        def failing(rnd, metrics):
            calls.append(rnd)
            if len(calls) == 1:  # trial 0, round 1: as a diverging solver would
                raise BenchError("fedavg diverged in round 1 (server)")
            return on_round(rnd, metrics) if on_round else None
        return real_run_one(*args, on_round=failing, **kw)

    monkeypatch.setattr(experiment, "run_one", run_one)
    (out,), _ = study.sweep(make_cfg(env), opts(env, trials=2, final_test=False))

    st = optuna.load_study(study_name="fedavg-synthetic", storage=env["storage"])
    assert [t.state for t in st.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert st.trials[0].user_attrs["error"] == "fedavg diverged in round 1 (server)"
    assert out.trials == 2
    status = {int(r.data.params["trial_number"]): r.info.status for r in runs(env, "trial")}
    assert status == {0: "FAILED", 1: "FINISHED", 2: "FINISHED"}
    assert "trial 0 failed: fedavg diverged in round 1 (server)" in capsys.readouterr().err


# -- several objectives -----------------------------------------------------------------------------

LG_SPACE = """
# global_layers changes what is sent (1 or 2 of the mlp's 3 weight layers), so bytes vary by trial.
lg_fedavg.global_layers = {low = 1, high = 2}
lg_fedavg.lr = {low = 0.01, high = 0.3, log = true}
"""


def dominated(a, b) -> bool:
    """(acc, bytes) `a` is dominated by `b`: b is no worse in both and better in one."""
    return b[0] >= a[0] and b[1] <= a[1] and (b[0] > a[0] or b[1] < a[1])


def test_acc_bytes_runs_nsga2_and_writes_the_pareto_front_it_finds(env, tmp_path):
    space = tmp_path / "lg.toml"
    space.write_text(LG_SPACE)
    cfg = make_cfg(env, methods="lg_fedavg")
    (out,), tuned = study.sweep(cfg, opts(env, trials=5, space=str(space), pruner=None,
                                          objectives=("acc", "bytes"), figures=True))

    st = optuna.load_study(study_name="lg_fedavg-synthetic-acc-bytes", storage=env["storage"])
    assert [d.name for d in st.directions] == ["MAXIMIZE", "MINIMIZE"]
    (parent,) = runs(env, "sweep")
    assert parent.data.params["sampler"] == "nsga2" and parent.data.params["pruner"] == "none"
    assert parent.data.params["objective"] == "acc/val,bytes/cumulative"
    # Each trial's values are its child run's final acc/val and bytes/cumulative (one seed).
    by_number = {t.number: t for t in st.trials}
    for r in runs(env, "trial"):
        t = by_number[int(r.data.params["trial_number"])]
        assert t.values == [pytest.approx(r.data.metrics["acc/val"]), r.data.metrics["bytes/cumulative"]]
    assert len({t.values[1] for t in st.trials}) == 2  # one and two shared layers: two byte counts

    # The front, recomputed by brute force: every completed trial that no other dominates.
    done = [t for t in st.trials if t.state == TrialState.COMPLETE]
    front = {t.number for t in done if not any(dominated(t.values, u.values) for u in done)}
    assert {row["trial"] for row in out.pareto} == front
    for row in out.pareto:
        assert row["MB sent"] == by_number[row["trial"]].values[1] / 1e6
    # The chosen trial is the front's most accurate; its values are the preset's.
    chosen = max((by_number[n] for n in front), key=lambda t: (t.values[0], -t.values[1]))
    assert out.best_value == chosen.values[0]
    assert C.load_toml(tuned)["lg_fedavg.global_layers"] == chosen.params["lg_fedavg.global_layers"]
    # The front is an artifact (csv read back equals the rows) and a figure.
    client = MlflowClient(tracking_uri=env["uri"])
    path = client.download_artifacts(parent.info.run_id, "pareto.csv", str(tmp_path))
    lines = open(path).read().splitlines()
    assert lines[0].split(",")[:3] == ["trial", "acc/val", "MB sent"]
    assert [int(x.split(",")[0]) for x in lines[1:]] == [row["trial"] for row in out.pareto]
    assert parent.data.metrics["pareto/size"] == len(front)
    pytest.importorskip("matplotlib")
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert "figures/pareto_front.png" in arts


def test_objective_and_pruner_mistakes_are_one_line_errors(env):
    from fedeq_bench.core.errors import BenchError

    with pytest.raises(BenchError, match="unknown objective 'latency'"):
        objectives.parse_objectives("acc,latency")
    with pytest.raises(BenchError, match="acc among them"):
        objectives.parse_objectives("bytes")
    assert objectives.parse_objectives(" acc, bytes ,memory") == ("acc", "bytes", "memory")
    with pytest.raises(BenchError, match="cannot prune a multi-objective study"):
        study.sweep(make_cfg(env), opts(env, pruner="median", objectives=("acc", "bytes")))
    with pytest.raises(BenchError, match="give --backend ray"):
        study.sweep(make_cfg(env), opts(env, n_jobs=2))
    assert MlflowClient(tracking_uri=env["uri"]).get_experiment_by_name("fedeq-bench") is None  # nothing recorded


def test_a_study_keeps_its_objectives(env):
    from fedeq_bench.core.errors import BenchError

    study.sweep(make_cfg(env), opts(env, trials=1, final_test=False, study_name="s"))
    with pytest.raises(BenchError, match="created for other objectives"):
        study.sweep(make_cfg(env), opts(env, trials=1, study_name="s", objectives=("acc", "bytes")))


# -- trials at once ---------------------------------------------------------------------------------

FIXED = [{"fedrep.lr": 0.02, "fedrep.head_epochs": 1}, {"fedrep.lr": 0.2, "fedrep.head_epochs": 3},
         {"fedrep.lr": 0.05, "fedrep.head_epochs": 2}, {"fedrep.lr": 0.1, "fedrep.head_epochs": 1}]


class FixedSampler(optuna.samplers.BaseSampler):
    """Trial number n gets FIXED[n], whichever thread asks: the trials of two studies are the same
    whatever order they start in. (Enqueued trials would do, but Optuna's SQLite queue can hand one
    waiting trial to two threads.)"""

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, name, distribution):
        return FIXED[trial.number][name]


@pytest.mark.ray
def test_two_trials_at_once_on_ray_give_the_values_of_one_at_a_time(env, tmp_path, ray_head, monkeypatch):
    """The same four trials (FixedSampler), n_jobs 2 and 1, on two Ray actors: every trial's value
    and every round's metrics are equal, and with n_jobs 2 two trials really ran at once (their
    start-to-end intervals overlap). Both sweeps attach to the session's running Ray
    (tests/conftest.py: ray_head) rather than start one each."""
    ray_head.attach(monkeypatch)
    cfg = experiment.validate(C.apply(make_cfg(env, methods="fedrep"), {"backend": "ray", "workers": 2}))
    got = {}
    for n_jobs in (2, 1):
        storage = f"sqlite:///{tmp_path}/optuna-{n_jobs}.db"
        (out,), _ = study.sweep(cfg, opts(env, trials=4, storage=storage, study_name=f"n{n_jobs}",
                                          final_test=False, n_jobs=n_jobs, sampler=FixedSampler()))
        assert out.trials == 4
        trials = optuna.load_study(study_name=f"n{n_jobs}", storage=storage).trials
        got[n_jobs] = {(t.params["fedrep.lr"], t.params["fedrep.head_epochs"]): t for t in trials}
    assert set(got[2]) == set(got[1]) == {(p["fedrep.lr"], p["fedrep.head_epochs"]) for p in FIXED}
    for key, t in got[1].items():
        assert got[2][key].value == t.value  # bit for bit, not approx
    spans = sorted((t.datetime_start, t.datetime_complete) for t in got[2].values())
    assert any(b[0] < a[1] for a, b in pairwise(spans))  # some trial started before another ended
    # Every round's logged metrics agree too (child runs, by trial params).
    client = MlflowClient(tracking_uri=env["uri"])
    curves = {}
    for r in runs(env, "trial"):
        n = r.data.tags["study"]
        key = (float(r.data.params["trial.fedrep.lr"]), int(r.data.params["trial.fedrep.head_epochs"]))
        curves[(n, key)] = [m.value for m in client.get_metric_history(r.info.run_id, "acc/val")]
    for key in got[1]:
        assert curves[("n2", key)] == curves[("n1", key)] and len(curves[("n1", key)]) == 2


def test_acc_time_scores_each_trial_by_its_simulated_seconds_on_the_fleet(env, tmp_path):
    """`--objective acc,time --devices mobile-mix`: a trial's second value is its run's simulated seconds
    (sim/time_cumulative_s), which the layers it sends change (fewer bytes, a shorter round)."""
    space = tmp_path / "lg.toml"
    space.write_text(LG_SPACE)
    cfg = experiment.validate(C.apply(make_cfg(env, methods="lg_fedavg"), {"devices": "mobile-mix"}))
    (out,), _ = study.sweep(cfg, opts(env, trials=3, space=str(space), pruner=None, objectives=("acc", "time")))
    st = optuna.load_study(study_name="lg_fedavg-synthetic-acc-time", storage=env["storage"])
    assert [d.name for d in st.directions] == ["MAXIMIZE", "MINIMIZE"]
    by_number = {t.number: t for t in st.trials}
    for r in runs(env, "trial"):
        t = by_number[int(r.data.params["trial_number"])]
        assert t.values == [pytest.approx(r.data.metrics["acc/val"]), r.data.metrics["sim/time_cumulative_s"]]
        assert t.values[1] > 0
    assert all(row["sim s"] == by_number[row["trial"]].values[1] for row in out.pareto)
