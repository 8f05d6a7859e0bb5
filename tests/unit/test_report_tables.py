"""bench/report/collect.py and tables.py on a real MLflow store (the `report_store` fixture: fedeq,
fedavg, fedrep on synthetic, 6 clients, 3 rounds, seeds 0 and 1).

Every expected number is read back here with MLflow's own client (`MlflowClient.search_runs`,
`get_metric_history`), independently of bench/report/collect.py, and reduced with the standard
library (`statistics.mean`, `statistics.stdev`: the sample std, ddof=1).
"""
from __future__ import annotations

import math
import shutil
import statistics

import pytest
from mlflow.tracking import MlflowClient

from bench import commands
from bench.report import collect, provenance, tables, verdict
from bench.report.model import Group
from bench.tracking import Tracker
from fedeq_bench.core.errors import BenchError

METHODS = ["fedeq", "fedavg", "fedrep"]
ACCURACY = ["method", "model", "seeds", "acc/weighted last-k", "acc/weighted final", "acc/weighted best round",
            "acc/mean", "acc/bottom10", "acc/unseen"]
COMMUNICATION = ["method", "MB up/round", "MB down/round", "MB up", "MB down", "MB total", "MB to target",
                 "bytes vs FeDEQ"]
COST = ["method", "peak train MB", "memory vs FeDEQ", "GFLOP/update", "FLOPs vs FeDEQ", "params shared",
        "params personal", "wall s"]


@pytest.fixture(scope="module")
def data(report_store):
    return collect.collect(report_store["uri"], report_store["experiment"])


@pytest.fixture(scope="module")
def mlflow_runs(report_store):
    """{(method, seed): (Run, {metric: [values in step order]})}, straight from MLflow."""
    client = MlflowClient(tracking_uri=report_store["uri"])
    exp = client.get_experiment_by_name(report_store["experiment"])
    out = {}
    for r in client.search_runs([exp.experiment_id]):
        if r.data.tags.get("mlflow.parentRunId") == report_store["parent"]:
            hist = {k: [m.value for m in sorted(client.get_metric_history(r.info.run_id, k), key=lambda m: m.step)]
                    for k in r.data.metrics}
            steps = {k: [m.step for m in sorted(client.get_metric_history(r.info.run_id, k), key=lambda m: m.step)]
                     for k in ("acc/weighted", "bytes/cumulative")}
            out[(r.data.params["method"], int(r.data.params["seed"]))] = (r, hist, steps)
    assert len(out) == 6  # 3 methods x 2 seeds
    return out


def row_of(tables_, method):
    """{column: cell} of `method` over the accuracy, communication and cost tables (a table or a list)."""
    out = {}
    for table in tables_ if isinstance(tables_, list) else [tables_]:
        (row,) = [row for row in table.rows if row[0].text == method]
        out.update(zip(table.columns, row, strict=True))
    return out


def numbers(group, parents, **kw):
    """The accuracy, communication and cost tables of a group (group_tables without the devices table that
    runs simulating edge devices add, and without the runs table)."""
    acc, comm, cost, *_ = tables.group_tables(group, parents, **kw)
    return [acc, comm, cost]


def per_method(mlflow_runs, method, value):
    return [value(*mlflow_runs[(method, s)]) for s in (0, 1)]


def test_the_methods_table_has_every_method_and_every_column(data):
    (group,) = data.groups
    assert (group.dataset, group.methods, group.seeds) == ("synthetic", METHODS, [0, 1])
    acc, comm, cost, *_, runs = tables.group_tables(group, data.parents)
    assert (acc.columns, comm.columns, cost.columns) == (ACCURACY, COMMUNICATION, COST)
    assert [t.title for t in (acc, comm, cost)] == [f"synthetic / {group.partition}: {w}"
                                                    for w in ("accuracy", "communication", "cost")]
    for table in (acc, comm, cost):
        assert [row[0].text for row in table.rows] == METHODS
        for row in table.rows:
            assert all(cell.text not in ("", "—") for cell in row), [c.text for c in row]  # every column filled
    assert len(runs.rows) == 6


# column -> the value of one run, from MLflow's run (latest metric values), histories and params.
FROM_MLFLOW = {
    "acc/weighted final": lambda run, h, _: run.data.metrics["acc/weighted"],
    # 3 evaluated rounds (rounds 1..3): k = max(1, 3 // 10) = 1, the final round's value.
    "acc/weighted last-k": lambda run, h, _: h["acc/weighted"][-1],
    "acc/weighted best round": lambda run, h, _: max(h["acc/weighted"]),
    "acc/mean": lambda run, h, _: run.data.metrics["acc/mean"],
    "acc/bottom10": lambda run, h, _: run.data.metrics["acc/bottom10"],
    "acc/unseen": lambda run, h, _: run.data.metrics["acc/unseen"],
    "MB up/round": lambda run, h, _: sum(h["bytes/up"]) / len(h["bytes/up"]) / 1e6,
    "MB down/round": lambda run, h, _: sum(h["bytes/down"]) / len(h["bytes/down"]) / 1e6,
    "MB up": lambda run, h, _: sum(h["bytes/up"]) / 1e6,
    "MB down": lambda run, h, _: sum(h["bytes/down"]) / 1e6,
    "MB total": lambda run, h, _: run.data.metrics["bytes/cumulative"] / 1e6,
    "peak train MB": lambda run, h, _: max(h["mem/peak_train_bytes"]) / 1e6,
    "GFLOP/update": lambda run, h, _: sum(h["compute/flops_update"]) / len(h["compute/flops_update"]) / 1e9,
    "params shared": lambda run, h, _: int(run.data.params["params/shared"]),
    "params personal": lambda run, h, _: int(run.data.params["params/personal"]),
    "wall s": lambda run, h, _: sum(h["time/round_s"]),
}


def test_every_number_is_the_mean_and_sample_std_of_the_mlflow_metrics(data, mlflow_runs):
    table = numbers(data.groups[0], data.parents)
    for m in METHODS:
        row = row_of(table, m)
        assert row["seeds"].text == "2" and row["model"].text == mlflow_runs[(m, 0)][0].data.params["model"]
        for col, get in FROM_MLFLOW.items():
            vals = per_method(mlflow_runs, m, get)
            assert row[col].value == pytest.approx(statistics.mean(vals), rel=1e-12, abs=1e-15), (m, col)
            if col == "acc/weighted final":  # 4 decimals, then the sample std over the two seeds
                assert row[col].text == f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}"
        # MB total is up + down over the run, as bytes/cumulative says.
        assert row["MB total"].value == pytest.approx(row["MB up"].value + row["MB down"].value)


def mb_to_target_by_hand(run, hist, steps, target):
    """Walk acc/weighted round by round; MB sent (bytes/cumulative) at the first round reaching target."""
    sent = dict(zip(steps["bytes/cumulative"], hist["bytes/cumulative"], strict=True))
    for rnd, acc in zip(steps["acc/weighted"], hist["acc/weighted"], strict=True):
        if acc >= target:
            return sent[rnd] / 1e6
    return None


@pytest.mark.parametrize("fraction", [0.95, 0.5, 1.0])
def test_mb_to_target_walks_the_accuracy_and_bytes_histories(data, mlflow_runs, fraction):
    table = numbers(data.groups[0], data.parents, target=fraction)
    best = max(statistics.mean(per_method(mlflow_runs, m, FROM_MLFLOW["acc/weighted last-k"])) for m in METHODS)
    target = fraction * best
    assert any(f"first reaches {target:.4f} = {fraction:.0%}" in n for n in table[1].notes)
    for m in METHODS:
        mbs = per_method(mlflow_runs, m, lambda *a: mb_to_target_by_hand(*a, target))
        cell = row_of(table, m)["MB to target"]
        if all(x is None for x in mbs):
            assert cell.text == "never" and cell.value is None
        elif any(x is None for x in mbs):
            assert cell.text == "never in 1 of 2 seeds" and cell.value is None
        else:
            assert cell.value == pytest.approx(statistics.mean(mbs), rel=1e-12)
    if fraction == 0.5:  # half the best accuracy: every method gets there
        assert all(row_of(table, m)["MB to target"].value is not None for m in METHODS)


def test_best_marks_the_highest_accuracy_and_the_fewest_bytes(data):
    best_of = {"acc/weighted final": max, "acc/weighted last-k": max, "acc/weighted best round": max, "acc/mean": max, "acc/bottom10": max, "acc/unseen": max, "MB up": min,
               "MB down": min, "MB total": min, "MB up/round": min, "MB down/round": min, "peak train MB": min,
               "GFLOP/update": min, "wall s": min}
    three = numbers(data.groups[0], data.parents)
    for col, better in best_of.items():
        (table,) = [t for t in three if col in t.columns]
        j = table.columns.index(col)
        values = [row[j].value for row in table.rows]
        marked = [row[0].text for row in table.rows if row[j].best]
        assert marked == [row[0].text for row in table.rows if row[j].value == better(values)], col
    for col in ("method", "params shared", "params personal", "bytes vs FeDEQ", "memory vs FeDEQ",
                "FLOPs vs FeDEQ"):  # no best
        for table in [t for t in three if col in t.columns]:
            assert not any(row[table.columns.index(col)].best for row in table.rows)


def test_the_ratio_columns_are_total_mb_and_peak_memory_over_fedeq_s(data, mlflow_runs):
    _, comm, cost = numbers(data.groups[0], data.parents)
    for col, ratio_col, table, note in (
            ("MB total", "bytes vs FeDEQ", comm, "fedrep sends {:.2f}x the bytes of fedeq (MB total, mean over seeds)"),
            ("peak train MB", "memory vs FeDEQ", cost,
             "fedrep needs {:.2f}x the peak training memory of fedeq (peak train MB, mean over seeds)"),
            ("GFLOP/update", "FLOPs vs FeDEQ", cost,
             "fedrep computes {:.2f}x the FLOPs per local update of fedeq (GFLOP/update, mean over seeds)")):
        means = {m: statistics.mean(per_method(mlflow_runs, m, FROM_MLFLOW[col])) for m in METHODS}
        for m in METHODS:
            ratio = means[m] / means["fedeq"]
            cell = row_of(table, m)[ratio_col]
            assert cell.value == pytest.approx(ratio) and cell.text == f"{ratio:.2f}x"
        assert row_of(table, "fedeq")[ratio_col].text == "1.00x"
        assert note.format(means["fedrep"] / means["fedeq"]) in table.notes

    # Without FeDEQ in the group there is nothing to compare with: no ratio columns.
    g = data.groups[0]
    without = Group(g.dataset, g.partition, [r for r in g.runs if r.method != "fedeq"], g.seeds, ["fedavg", "fedrep"])
    _, comm, cost = numbers(without, data.parents)
    assert "bytes vs FeDEQ" not in comm.columns and not any("bytes of fedeq" in n for n in comm.notes)
    assert "memory vs FeDEQ" not in cost.columns and not any("memory of fedeq" in n for n in cost.notes)
    assert "FLOPs vs FeDEQ" not in cost.columns and not any("FLOPs per local update of fedeq" in n for n in cost.notes)


def test_collect_reads_histories_and_the_clients_csv(data, mlflow_runs, report_store):
    for r in data.groups[0].runs:
        run, hist, _ = mlflow_runs[(r.method, r.seed)]
        assert r.status == "FINISHED" and r.parent_id == report_store["parent"]
        assert {k: [v for _, v in h] for k, h in r.history.items()} == hist
        assert r.final("acc/weighted") == run.data.metrics["acc/weighted"]
        assert r.fingerprint == run.data.params["dataset_fingerprint"]
        # 6 clients, one held out (frac_unseen 0.2): the final evaluation of each, from clients.csv.
        assert [c["cid"] for c in r.clients] == list(range(6))
        assert [c["group"] for c in r.clients].count("unseen") == 1
        n = sum(c["test_n"] for c in r.clients if c["group"] != "unseen")
        weighted = sum(c["test_acc"] * c["test_n"] for c in r.clients if c["group"] != "unseen") / n
        assert weighted == pytest.approx(run.data.metrics["acc/weighted"])


def test_provenance_holds_the_command_commit_versions_and_fingerprints(data, mlflow_runs, report_store):
    prov, config = provenance.provenance_tables(data)
    what = {row[0].text: row[1].text for row in prov.rows}
    assert what["command"] == report_store["command"] and what["run id"] == report_store["parent"]
    assert what["git commit"] and what["version: mlflow"] and what["version: torch"]
    fps = "; ".join(f"seed {s}: {mlflow_runs[('fedeq', s)][0].data.params['dataset_fingerprint']}" for s in (0, 1))
    assert what[f"dataset fingerprint: synthetic / {data.groups[0].partition}"] == fps
    keys = [row[0].text for row in config.rows]
    assert "run.rounds" in keys or "rounds" in keys
    assert provenance.provenance_tables(data, config=False) == [prov]


@pytest.fixture
def damaged(report_store, tmp_path):
    """A copy of the store where fedrep seed 1 FAILED, and a pruned fedavg seed 2 (which claims a
    perfect accuracy: a run that did not finish must not move any number)."""
    shutil.copy(f"{report_store['dir']}/mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(report_store["experiment"])
    children = {(r.data.params["method"], r.data.params["seed"]): r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get("mlflow.parentRunId") == report_store["parent"]}
    client.set_terminated(children[("fedrep", "1")].info.run_id, "FAILED")
    tracker = Tracker(uri, report_store["experiment"])
    params = {k: v for k, v in children[("fedavg", "0")].data.params.items() if not k.startswith("params/")}
    run = tracker.start("fedavg seed=2", {**params, "seed": "2"}, {"method": "fedavg", "seed": "2"},
                        parent=report_store["parent"])
    tracker.log_metrics(run, 1, {"acc/weighted": 1.0, "bytes/cumulative": 1.0})
    tracker.end(run, "PRUNED")
    return uri, children


def test_failed_and_pruned_runs_are_shown_and_a_missing_seed_is_said(damaged, report_store, mlflow_runs):
    uri, children = damaged
    data = collect.collect(uri, report_store["experiment"])
    (group,) = data.groups
    assert group.seeds == [0, 1, 2]
    *table, runs = tables.group_tables(group, data.parents)
    fedrep = row_of(table, "fedrep")
    assert fedrep["seeds"].text == "1"
    assert fedrep["acc/weighted final"].text == f"{mlflow_runs[('fedrep', 0)][0].data.metrics['acc/weighted']:.4f}"  # no ±
    for note in ["fedrep: no FINISHED run for seed 1 (FAILED)", "fedavg: no FINISHED run for seed 2 (PRUNED)",
                 "fedeq: no FINISHED run for seed 2 (no run)", "fedrep: no FINISHED run for seed 2 (no run)"]:
        assert note in table[0].notes
    # The pruned run's accuracy of 1.0 sets no target: the best FINISHED mean does.
    best = max(statistics.mean(per_method(mlflow_runs, m, FROM_MLFLOW["acc/weighted last-k"])) for m in ("fedeq", "fedavg"))
    best = max(best, mlflow_runs[("fedrep", 0)][0].data.metrics["acc/weighted"])
    assert any(f"first reaches {0.95 * best:.4f}" in n for n in table[1].notes)

    shown = {(row[0].text, row[1].text): {c: cell.text for c, cell in zip(runs.columns, row, strict=True)}
             for row in runs.rows}
    assert len(shown) == 7
    assert shown[("fedrep", "1")]["status"] == "FAILED" and shown[("fedrep", "1")]["acc/weighted"] == "—"
    assert shown[("fedavg", "2")]["status"] == "PRUNED"
    assert shown[("fedrep", "1")]["run id"] == children[("fedrep", "1")].info.run_id
    # The recorded command (tests/conftest.py) less its --methods and --seeds, then this run's, once each;
    # `python` is this interpreter, by path (bench/commands.py: runnable).
    assert report_store["command"].startswith("python -m bench.run --methods fedeq,fedavg,fedrep --dataset")
    assert shown[("fedrep", "1")]["command"] == commands.runnable(
        "python -m bench.run --dataset synthetic --clients 6 --rounds 3 --methods fedrep --seeds 1")
    assert any("2 run(s) not FINISHED (FAILED, PRUNED)" in n for n in runs.notes)


def test_bad_input_is_one_line(report_store, damaged, tmp_path):
    uri = report_store["uri"]
    with pytest.raises(BenchError, match=r"^unknown MLflow experiment 'nope' in .*experiments there: .*report-test"):
        collect.collect(uri, "nope")
    with pytest.raises(BenchError, match=r"^no comparison run 'abc' in experiment 'report-test'; comparison runs"):
        collect.collect(uri, "report-test", ["abc"])
    with pytest.raises(BenchError, match=r"^unknown study 'nope' in experiment 'report-test'.*studies there: none"):
        collect.collect_sweep(uri, "report-test", "nope")
    with pytest.raises(BenchError, match=r"^no MLflow store at .*does not exist"):
        collect.collect(f"sqlite:///{tmp_path}/typo.db", "report-test")
    assert not (tmp_path / "typo.db").exists()  # reading never creates a store
    empty_uri = damaged[0]
    MlflowClient(tracking_uri=empty_uri).create_experiment("empty")
    with pytest.raises(BenchError, match=r"^experiment 'empty' in .* has no comparison runs .*it has no runs$"):
        collect.collect(empty_uri, "empty")
    for call in (lambda: collect.collect(uri, "nope"), lambda: collect.collect(empty_uri, "empty")):
        with pytest.raises(BenchError) as e:
            call()
        assert "\n" not in str(e.value)


def test_a_single_seed_has_no_std():
    assert tables.stat_cell([0.5], "acc").text == "0.5000"
    assert tables.stat_cell([0.5, 0.7], "acc").text == f"0.6000 ± {statistics.stdev([0.5, 0.7]):.4f}"
    assert tables.stat_cell([0.5, math.nan], "acc").text == "—"
    # MB: at least 3 decimals and 4 significant digits, so small and large totals both compare.
    assert [tables.fmt(x, "mb") for x in (0.061234, 12.3, 1234.5678)] == ["0.06123", "12.300", "1234.568"]


def test_a_seed_run_twice_counts_once_the_newest(report_store, mlflow_runs, tmp_path):
    """Two comparisons with one config in one experiment both ran fedavg seed 0: the newer run's numbers
    are used, not an average of two runs, and a note says which run."""
    shutil.copy(f"{report_store['dir']}/mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, report_store["experiment"])
    old = mlflow_runs[("fedavg", 0)][0]
    same = dict(MlflowClient(tracking_uri=uri).get_run(report_store["parent"]).data.params)
    with tracker.run("again", same, {"kind": "comparison"}) as parent:
        with tracker.run("fedavg seed=0", dict(old.data.params), {"method": "fedavg"}, parent=parent) as new:
            tracker.log_metrics(new, 3, {"acc/weighted": 0.25})
    data = collect.collect(uri, report_store["experiment"])
    (group,) = data.groups  # one config: one group, no label
    assert group.label == ""
    (*table, runs) = tables.group_tables(group, data.parents)
    fedavg = row_of(table, "fedavg")
    seed1 = mlflow_runs[("fedavg", 1)][0].data.metrics["acc/weighted"]
    assert fedavg["seeds"].text == "2" and fedavg["acc/weighted final"].value == pytest.approx((0.25 + seed1) / 2)
    assert f"fedavg seed 0: 2 FINISHED runs (several comparisons); the numbers use the newest, {new}" in table[0].notes
    assert len(runs.rows) == 7  # both runs listed


def test_unlike_runs_are_never_pooled(report_store, tmp_path):
    """The mix a user's experiment held: the comparison (fedeq, fedavg, fedrep; 3 rounds; seeds 0, 1),
    a `--rounds 2 --seeds 5` FedRep run, and FedRep seed 0 rerun with a tuned preset (`--config`). Each is
    its own group, labelled by what differs; the comparison's tables are exactly those of its own report."""
    from bench import config as C
    from bench import experiment

    shutil.copy(f"{report_store['dir']}/mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "tuned.toml").write_text("[fedrep]\nlr = 0.02\n")
    base = {"dataset": "synthetic", "clients": 6, "backend": "serial", "tracking_uri": uri,
            "experiment": report_store["experiment"], "frac_unseen": 0.2}
    for config_file, flags, command in (
            (None, {"methods": "fedrep", "rounds": 2, "seeds": "5"}, "python -m bench.run --rounds 2 --seeds 5"),
            (str(tmp_path / "tuned.toml"), {"methods": "fedrep", "rounds": 3, "seeds": "0"},
             f"python -m bench.run --config {tmp_path / 'tuned.toml'} --methods fedrep")):
        cfg = experiment.validate(C.from_cli(config_file, {**base, **flags}, []))
        experiment.compare(cfg, command=command, quiet=True)

    data = collect.collect(uri, report_store["experiment"])
    first, rounds2, tuned = data.groups
    assert [g.methods for g in data.groups] == [METHODS, ["fedrep"], ["fedrep"]]
    assert [g.seeds for g in data.groups] == [[0, 1], [5], [0]]
    assert first.label == "rounds=3, fedrep.lr=None"  # None: the run's lr (0.05), as the tuned group's is not
    assert rounds2.label == "rounds=2, fedrep.lr=None"
    assert tuned.label == f"config {tmp_path / 'tuned.toml'}; rounds=3, fedrep.lr=0.02"
    assert first.title.endswith(" [rounds=3, fedrep.lr=None]")

    # The comparison's numbers are those of its own report, to the last digit, and no note of repeats.
    (alone,) = collect.collect(uri, report_store["experiment"], [report_store["parent"]]).groups
    assert alone.label == ""
    mixed, own = numbers(first, data.parents), numbers(alone, data.parents)
    for t_mixed, t_own in zip(mixed, own, strict=True):
        assert [[c.text for c in row] for row in t_mixed.rows] == [[c.text for c in row] for row in t_own.rows]
        assert [n for n in t_mixed.notes if "FINISHED runs (several" in n] == []
    fedrep = row_of(mixed, "fedrep")
    assert fedrep["seeds"].text == "2"
    # The other groups stand alone: one seed each, no FeDEQ to compare with.
    for g in (rounds2, tuned):
        acc, comm, cost, *_, runs = tables.group_tables(g, data.parents)
        assert row_of(acc, "fedrep")["seeds"].text == "1" and "bytes vs FeDEQ" not in comm.columns
        assert len(runs.rows) == 1


def test_groups_are_labelled_only_by_the_keys_that_differ():
    """Hand-made runs (collect.comparable_groups reads only params): fedeq's own key never labels a group
    that did not run fedeq, and an invocation agreeing with an earlier one on every key joins it."""
    from bench.report.model import Provenance, RunRecord

    def parent(pid, rounds, command=""):
        return Provenance(pid, pid, "FINISHED", command, "c", {"run.rounds": rounds, "run.seeds": pid,
                                                              "run.backend": "ray", "synthetic.alpha": "0.5"}, {})

    def run(pid, method, seed, **keys):
        return RunRecord(f"{pid}-{method}-{seed}", pid, method, seed, "FINISHED", "synthetic", "p", "f", "m",
                         {f"{method}.{k}": v for k, v in keys.items()})

    parents = [parent("a", "30"), parent("b", "30"), parent("c", "2"), parent("d", "30", "x --config t.toml")]
    parents[1].config["run.backend"] = "serial"  # how it ran: the same numbers
    records = [run("a", "fedeq", 0, rho="1"), run("a", "fedrep", 0, lr="None"), run("b", "fedrep", 1, lr="None"),
               run("c", "fedrep", 0, lr="None"), run("d", "fedrep", 0, lr="0.01")]
    groups = collect.comparable_groups(records, parents)
    assert [[r.run_id for r in g.runs] for g in groups] == [["a-fedeq-0", "a-fedrep-0", "b-fedrep-1"],
                                                            ["c-fedrep-0"], ["d-fedrep-0"]]
    assert [g.label for g in groups] == ["rounds=30, fedrep.lr=None", "rounds=2, fedrep.lr=None",
                                         "config t.toml; rounds=30, fedrep.lr=0.01"]
    assert collect.comparable_groups(records[:3], parents)[0].label == ""


def test_last_k_and_mb_to_target_by_hand():
    """A hand-made run: acc/weighted over 10 evaluated rounds, bytes/cumulative 10 MB a round. The
    expected values are worked out here by hand, not with the functions under test."""
    from bench.report.model import RunRecord

    acc = [0.10, 0.90, 0.20, 0.50, 0.60, 0.70, 0.80, 0.70, 0.90, 0.60]
    r = RunRecord("r", "p", "fedeq", 0, "FINISHED", "synthetic", "p", "f", "m", {},
                  {"acc/weighted": list(enumerate(acc, 1)),
                   "bytes/cumulative": [(i, 10e6 * i) for i in range(1, 11)]})
    assert tables.last_k_mean(r, "acc/weighted", 1) == 0.60
    assert tables.last_k_mean(r, "acc/weighted", 3) == pytest.approx((0.70 + 0.90 + 0.60) / 3)  # 0.7333
    assert tables.last_k_mean(r, "acc/weighted", 50) == pytest.approx(sum(acc) / 10)  # fewer rounds: all of them
    assert tables.peak(r, "acc/weighted") == 0.90
    # k = 1: round 2's lucky 0.90 reaches 0.85 at 20 MB. k = 3: windows end at rounds 3..10, means
    # 0.4, 0.533, 0.433, 0.6, 0.7, 0.733, 0.8 (rounds 7-9: 0.8+0.7+0.9 = 2.4 / 3), so 0.75 at round 9: 90 MB.
    assert tables.mb_to_target(r, 0.85, 1) == 20.0
    assert tables.mb_to_target(r, 0.75, 3) == 90.0
    assert tables.mb_to_target(r, 0.85, 3) is None
    # k: a tenth of the evaluated rounds, at least 1; or as given, at most the rounds there are.
    group = Group("synthetic", "p", [r], [0], ["fedeq"])
    assert tables.last_k(group) == (1, 10) and tables.last_k(group, 3) == (3, 10) and tables.last_k(group, 99) == (10, 10)
    r.history["acc/weighted"] = [(i, 0.5) for i in range(1, 31)]
    assert tables.last_k(group) == (3, 30)


def test_the_pareto_set_of_a_hand_made_table():
    """accuracy up, cost down. c is dominated by b (more accurate, cheaper); e ties d on cost and is less
    accurate; a and b and d trade accuracy against cost; f has a nan (no memory logged) and is left out."""
    points = {"a": (0.70, 10.0), "b": (0.80, 20.0), "c": (0.75, 30.0), "d": (0.90, 40.0), "e": (0.85, 40.0),
              "f": (0.99, math.nan)}
    front = verdict.pareto(points)
    assert front == ["a", "b", "d"]
    # c: b gains 0.05 at no more cost (a is cheaper but less accurate: 0.70 < 0.75); b needs 20/30 of its cost.
    gain, ratio = verdict.distance(points, front, "c")
    assert gain == pytest.approx(0.05) and ratio == pytest.approx(20 / 30)
    # e: at cost <= 40 the best front accuracy is d's 0.90 (+0.05); at accuracy >= 0.85 only d, at 40/40.
    gain, ratio = verdict.distance(points, front, "e")
    assert gain == pytest.approx(0.05) and ratio == pytest.approx(1.0)
    assert verdict.pareto({"x": (0.5, 1.0), "y": (0.5, 1.0)}) == ["x", "y"]  # equal points dominate neither


def test_the_verdict_names_the_best_and_the_fronts(data, mlflow_runs):
    """The paragraph is generated from the numbers in the tables (k = 1 here: 3 rounds)."""
    group = data.groups[0]
    text = verdict.verdict(group)
    acc = {m: statistics.mean(per_method(mlflow_runs, m, FROM_MLFLOW["acc/weighted last-k"])) for m in METHODS}
    mb = {m: statistics.mean(per_method(mlflow_runs, m, FROM_MLFLOW["MB total"])) for m in METHODS}
    mem = {m: statistics.mean(per_method(mlflow_runs, m, FROM_MLFLOW["peak train MB"])) for m in METHODS}
    best = max(acc, key=acc.get)
    assert text.startswith("Accuracy is acc/weighted, the mean of the last 1 evaluated round (mean over seeds).")
    assert f"Most accurate: {best} ({acc[best]:.4f})." in text
    assert f"Fewest MB sent: {min(mb, key=mb.get)} (" in text
    assert f"Least peak training memory: {min(mem, key=mem.get)} (" in text
    gflop = {m: statistics.mean(per_method(mlflow_runs, m, FROM_MLFLOW["GFLOP/update"])) for m in METHODS}
    low = min(gflop, key=gflop.get)
    assert f"Fewest FLOPs per local update: {low} ({tables.fmt(gflop[low], 'mb')} GFLOP" in text
    for cost, means in (("MB total", mb), ("peak train MB", mem), ("GFLOP/update", gflop)):
        front = [m for m in METHODS if not any(acc[o] >= acc[m] and means[o] <= means[m]
                                               and (acc[o] > acc[m] or means[o] < means[m]) for o in METHODS)]
        assert f"Pareto set on accuracy vs {cost}: {', '.join(front)}" in text


def test_bad_report_options_are_one_line(tmp_path):
    from bench import report

    uri = f"sqlite:///{tmp_path}/none.db"  # never opened: the options are checked first
    with pytest.raises(BenchError, match=r"^--last-k is a number of evaluated rounds, at least 1; got 0$"):
        report.build(uri, "x", last_k=0)
    with pytest.raises(BenchError, match=r"^--target is a fraction of the best mean last-k accuracy, in \(0, 1\]"):
        report.build(uri, "x", target=1.5)
    assert not (tmp_path / "none.db").exists()


def test_a_commands_config_files_are_named_in_their_order():
    from bench.report.collect import config_file

    assert config_file("python -m bench.run --config a.toml --rounds 2") == "a.toml"
    assert config_file("python -m bench.run --config a.toml --config=b.toml") == "a.toml + b.toml"
    assert config_file("python -m bench.run --rounds 2") is None


def test_shared_plotly_is_written_once_beside_the_report_folders_and_each_page_loads_it(report_store, tmp_path):
    """`--shared-plotly`: two report folders under one parent; each index.html has a `<script src>` to
    ../plotly.min.js and no copy of its own, and the one copy is the installed package's bundle."""
    from bench import report
    from bench.report import html

    bundle = html.plotly_js()
    pages = []
    for name in ("a", "b"):
        paths = report.build(report_store["uri"], report_store["experiment"], out=str(tmp_path / name),
                             shared_plotly=True)
        pages.append(open(paths.html).read())
    shared = tmp_path / "plotly.min.js"
    assert shared.read_text() == bundle
    for page in pages:
        assert '<script src="../plotly.min.js"></script>' in page
        assert len(page) < len(bundle) // 10  # the bundle is not inside (it is 4.8 MB; a page far less)
    # Without the flag the page carries the bundle itself, as before.
    inline = open(report.build(report_store["uri"], report_store["experiment"], out=str(tmp_path / "c")).html).read()
    assert bundle in inline
    # A file at ../plotly.min.js that no report wrote is not replaced without --force.
    shared.write_text("my own script\n")
    with pytest.raises(BenchError, match="plotly.js"):
        report.build(report_store["uri"], report_store["experiment"], out=str(tmp_path / "a"), shared_plotly=True)
    assert shared.read_text() == "my own script\n"


def test_seeds_of_a_drawn_partition_are_one_group(tmp_path, monkeypatch):
    """Fashion-MNIST's shards are drawn from the seed, so each seed's partition label names its seed
    and digest (`shards:2(clients=5,seed=1,sha256=...)`): the report pools the seeds of one comparison
    all the same, as one group of the split's recipe, `shards:2(clients=5)`."""
    from bench import config as C
    from bench import experiment
    from tests.helpers import new_store
    from tests.unit.test_fmnist import write_idx_set

    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    write_idx_set(tmp_path / "data")
    uri = new_store(tmp_path / "mlflow.db")
    cfg = C.apply(C.default_config(), {"methods": "fedavg", "dataset": "fmnist", "data_dir": str(tmp_path / "data"),
                                       "partition": "shards:2", "clients": 5, "rounds": 1, "seeds": "0,1",
                                       "backend": "serial", "tracking_uri": uri, "experiment": "drawn",
                                       "fmnist.download": False})
    experiment.compare(experiment.validate(cfg), command="python -m bench.run", quiet=True)
    labels = {r.data.params["partition"] for r in MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("drawn").experiment_id]) if "partition" in r.data.params}
    assert len(labels) == 2 and all(", " not in x and "seed=" in x for x in labels)  # one label per seed
    (group,) = collect.collect(uri, "drawn").groups
    assert group.partition == "shards:2(clients=5)" and group.seeds == [0, 1]
