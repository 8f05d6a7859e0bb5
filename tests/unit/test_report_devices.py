"""Reports of simulated edge devices (bench/report/: collect.py's default rule for run keys, the devices
table, the accuracy-vs-simulated-time figure, the verdict's sentences), on a real MLflow store.

The runs are logged here with bench.tracking's Tracker, as bench.run logs them (a parent run tagged
`kind=comparison` with the flattened config as params, a child run per method x seed, metrics at
step = round), but with metric histories written by hand, so every expected number below is worked
out from the lists in this file. What the engine logs per round on a device-simulated run:
`sim/time_s`, `sim/time_cumulative_s`, `clients/participated`, `clients/dropped_deadline`,
`clients/dropped_memory`, `clients/dropped_unavailable`, `clients/excluded_memory`; and its parent
records `run.devices` and `run.round_deadline`. A run made before that logs none of them.
"""
from __future__ import annotations

import itertools
import math

import pytest

from bench import config as C
from bench.report import collect, tables, verdict
from bench.report import figures as F
from bench.tracking import Tracker
from tests.helpers import new_store

EXPERIMENT = "devices"
DEVICES = ["method", "sim s", "sim s to target", "participation", "dropped: deadline", "dropped: memory",
           "dropped: unavailable", "excluded by memory"]

# Four rounds, four clients sampled a round. fedeq needs more memory than some devices have: clients
# are dropped for memory; fedavg loses one update to an unavailable device.
ACC = {("fedeq", 0): [0.5, 0.7, 0.8, 0.9], ("fedeq", 1): [0.4, 0.8, 0.9, 0.9],
       ("fedavg", 0): [0.6, 0.8, 0.8, 0.8], ("fedavg", 1): [0.7, 0.7, 0.8, 0.8]}
SIM_S = {("fedeq", 0): [10.0] * 4, ("fedeq", 1): [12.0] * 4, ("fedavg", 0): [5.0] * 4, ("fedavg", 1): [6.0] * 4}
CLIENTS = {  # metric -> (method, seed) -> per round
    "clients/participated": {("fedeq", 0): [2, 2, 3, 2], ("fedeq", 1): [3, 3, 3, 3],
                             ("fedavg", 0): [4, 4, 3, 4], ("fedavg", 1): [4, 4, 3, 4]},
    "clients/dropped_deadline": {("fedeq", 0): [0, 0, 0, 0], ("fedeq", 1): [1, 0, 0, 0],
                                 ("fedavg", 0): [0, 0, 0, 0], ("fedavg", 1): [0, 0, 0, 0]},
    "clients/dropped_memory": {("fedeq", 0): [2, 2, 1, 2], ("fedeq", 1): [0, 1, 1, 1],
                               ("fedavg", 0): [0, 0, 0, 0], ("fedavg", 1): [0, 0, 0, 0]},
    "clients/dropped_unavailable": {("fedeq", 0): [0, 0, 0, 0], ("fedeq", 1): [0, 0, 0, 0],
                                    ("fedavg", 0): [0, 0, 1, 0], ("fedavg", 1): [0, 0, 1, 0]},
    "clients/excluded_memory": {("fedeq", 0): [2, 2, 3, 3], ("fedeq", 1): [0, 1, 1, 1],
                                ("fedavg", 0): [0, 0, 0, 0], ("fedavg", 1): [0, 0, 0, 0]},
}
ALL = list(ACC)
OLD = ("fedavg", 2)
"""A run from before device simulation: accuracy and bytes only."""
ACC[OLD] = [0.6, 0.6, 0.6, 0.6]


def history(method: str, seed: int, sim: bool) -> dict[int, dict[str, float]]:
    """Round -> metrics of one run: accuracy and bytes always; the device metrics when `sim`."""
    out = {}
    cumulative = list(itertools.accumulate(SIM_S[(method, seed)])) if sim else []
    for i, acc in enumerate(ACC[(method, seed)]):
        m = {"acc/weighted": acc, "bytes/cumulative": 1e6 * (i + 1)}
        if sim:
            m.update({"sim/time_s": SIM_S[(method, seed)][i], "sim/time_cumulative_s": cumulative[i],
                      **{k: float(v[(method, seed)][i]) for k, v in CLIENTS.items()}})
        out[i + 1] = m
    return out


def comparison(uri: str, runs: list[tuple[str, int]], keys: dict[str, str] | None = None, drop=(),
               sim: bool = True) -> str:
    """Log one comparison: the parent's params are bench.run's (config.flatten of the default config), with
    `keys` set and `drop` left out (a run made before those options existed); a child run per (method,
    seed), its history from `history`. Returns the parent run id."""
    methods = sorted({m for m, _ in runs})
    params = {k: v for k, v in C.flatten(C.default_config(), methods, "synthetic").items() if k not in drop}
    params.update({"command": "python -m bench.run", **(keys or {})})
    tracker = Tracker(uri, EXPERIMENT)
    with tracker.run("comparison", params, {"kind": "comparison"}) as parent:
        for method, seed in runs:
            child = {"method": method, "seed": str(seed), "dataset": "synthetic", "partition": "p",
                     "dataset_fingerprint": "f", "model": "mlp"}
            with tracker.run(f"{method} seed={seed}", child, {"method": method}, parent=parent) as run_id:
                for rnd, metrics in history(method, seed, sim).items():
                    tracker.log_metrics(run_id, rnd, metrics)
    return parent


# -- the default rule ---------------------------------------------------------------------------------


def test_a_run_key_the_parent_did_not_record_reads_as_its_default(tmp_path):
    """An invocation recorded before four options existed (a str, a None, a float and a bool key) pools
    with one recorded since at their defaults: the default's text is the param bench.run records. One
    that set another value is its own group, both labelled by that key, never `unrecorded`."""
    uri = new_store(tmp_path / "mlflow.db")
    old = ("run.cpu_memory", "run.eval_clients", "run.wire_topk", "run.memory_every_round")
    assert {k: collect.run_defaults()[k] for k in old} == {"run.cpu_memory": "live", "run.eval_clients": "None",
                                                            "run.wire_topk": "0.01", "run.memory_every_round": "False"}
    comparison(uri, [("fedavg", 0)], drop=old, sim=False)
    comparison(uri, [("fedavg", 1)], sim=False)
    (group,) = collect.collect(uri, EXPERIMENT).groups
    assert group.seeds == [0, 1] and group.label == ""
    comparison(uri, [("fedavg", 0)], {"run.cpu_memory": "parts"}, sim=False)
    groups = collect.collect(uri, EXPERIMENT).groups
    assert [g.seeds for g in groups] == [[0, 1], [0]]
    assert [g.label for g in groups] == ["cpu_memory=live", "cpu_memory=parts"]


def test_runs_from_before_devices_pool_with_uniform_and_another_profile_set_is_a_group(tmp_path):
    uri = new_store(tmp_path / "mlflow.db")
    old = comparison(uri, [OLD], drop=("run.devices", "run.round_deadline"), sim=False)
    uniform = comparison(uri, ALL, {"run.devices": "uniform", "run.round_deadline": "None"})
    (group,) = collect.collect(uri, EXPERIMENT).groups
    assert group.seeds == [0, 1, 2] and {r.parent_id for r in group.runs} == {old, uniform}
    comparison(uri, [("fedavg", 0)], {"run.devices": "mobile-mix", "run.round_deadline": "30.0"})
    groups = collect.collect(uri, EXPERIMENT).groups
    assert [g.seeds for g in groups] == [[0, 1, 2], [0]]
    assert [g.label for g in groups] == ["devices=uniform, round_deadline=None",
                                         "devices=mobile-mix, round_deadline=30.0"]
    # The devices table says which profile set its numbers are under.
    notes = [t for t in tables.group_tables(groups[1], target=0.85) if t.title.endswith(": devices")][0].notes
    assert "device profile set: mobile-mix; round deadline: 30.0 simulated s" in notes


# -- the devices table --------------------------------------------------------------------------------


@pytest.fixture
def sim_group(tmp_path):
    """fedeq and fedavg, seeds 0 and 1, with device metrics (ALL), as collect reads them back."""
    uri = new_store(tmp_path / "mlflow.db")
    comparison(uri, ALL, {"run.devices": "mobile-mix"})
    (group,) = collect.collect(uri, EXPERIMENT).groups
    return group


def cells(table, method):
    (row,) = [r for r in table.rows if r[0].text == method]
    return dict(zip(table.columns, row, strict=True))


def test_the_devices_table_by_hand(sim_group):
    acc, comm, cost, devices, runs = tables.group_tables(sim_group, target=0.85)
    assert devices.title.endswith(": devices") and devices.columns == DEVICES
    fedeq, fedavg = cells(devices, "fedeq"), cells(devices, "fedavg")
    # sim s: the sum of sim/time_s. fedeq 4 x 10 = 40 and 4 x 12 = 48: mean 44, sample std sqrt(2 x 4^2 / 1)
    # = 5.657; fedavg 20 and 24: 22 ± 2.828.
    assert fedeq["sim s"].text == "44.00 ± 5.66" and fedavg["sim s"].text == "22.00 ± 2.83"
    assert fedavg["sim s"].best and not fedeq["sim s"].best
    # Target: 4 rounds, k = 1; best mean last-1 accuracy fedeq's (0.9 + 0.9) / 2 = 0.9; 0.85 x 0.9 = 0.765.
    # fedeq reaches 0.8 >= 0.765 at round 3 (seed 0: 30 s cumulative) and round 2 (seed 1: 24 s): 27 ± 4.243;
    # fedavg at round 2 (seed 0: 10 s) and round 3 (seed 1: 18 s): 14 ± 5.657.
    assert fedeq["sim s to target"].text == "27.00 ± 4.24" and fedavg["sim s to target"].text == "14.00 ± 5.66"
    assert fedavg["sim s to target"].best
    assert any("sim s to target: simulated seconds (sim/time_cumulative_s at the window's last round) until "
               "acc/weighted first reaches 0.7650 = 85%" in n for n in devices.notes)
    # participation: fedeq seed 0 aggregated 2+2+3+2 = 9 of 16 sampled (7 dropped for memory), seed 1
    # 12 of 16 (1 late, 3 for memory): (9/16 + 12/16) / 2 = 0.65625; fedavg 15 of 16 in both seeds.
    assert fedeq["participation"].value == pytest.approx(0.65625)
    assert fedeq["participation"].text.endswith(f" ± {abs(12 / 16 - 9 / 16) / math.sqrt(2):.4f}")
    assert fedavg["participation"].text == "0.9375 ± 0.0000" and fedavg["participation"].best
    # Drops summed over the run, then over seeds: fedeq deadline 0 and 1, memory 7 and 3, unavailable none;
    # fedavg 1 unavailable in each seed (equal seeds: the count alone).
    assert [fedeq[c].text for c in DEVICES[4:7]] == ["0.50 ± 0.71", "5.00 ± 2.83", "0"]
    assert [fedavg[c].text for c in DEVICES[4:7]] == ["0", "0", "1"]
    # excluded by memory: the final round's clients/excluded_memory, 3 and 1.
    assert fedeq["excluded by memory"].text == "2.00 ± 1.41" and fedavg["excluded by memory"].text == "0"


def test_a_run_without_device_metrics_in_a_group_with_them_is_a_dash(tmp_path):
    """fedavg seed 2 comes from before device simulation (pooled by the default rule): fedavg's device
    cells over seeds 0..2 have no value for it, so they are a dash; fedeq's stay."""
    uri = new_store(tmp_path / "mlflow.db")
    comparison(uri, [OLD], drop=("run.devices", "run.round_deadline"), sim=False)
    comparison(uri, ALL)
    (group,) = collect.collect(uri, EXPERIMENT).groups
    devices = tables.group_tables(group, target=0.85)[3]
    assert devices.columns == DEVICES
    assert all(cell.text == "—" for cell in list(cells(devices, "fedavg").values())[1:])
    assert cells(devices, "fedeq")["sim s"].text == "44.00 ± 5.66"


def test_runs_without_device_metrics_have_no_devices_table_figure_or_sentence(tmp_path):
    uri = new_store(tmp_path / "mlflow.db")
    comparison(uri, ALL, sim=False)
    (group,) = collect.collect(uri, EXPERIMENT).groups
    assert [t.title.rsplit(": ", 1)[1] for t in tables.group_tables(group)] == [
        "accuracy", "communication", "cost", "every run"]
    assert "acc_vs_sim_time" not in {f.name for f in F.group_figures(group)}
    text = verdict.verdict(group, 1, 0.85)
    assert "simulated time" not in text and "excluded by memory" not in text


# -- the figure and the verdict -----------------------------------------------------------------------


def test_accuracy_vs_simulated_time_is_the_mean_curve_over_seeds(sim_group):
    fig = {f.name: f for f in F.group_figures(sim_group)}["acc_vs_sim_time"]
    assert fig.kind == "line" and fig.xlabel == "cumulative simulated seconds"
    (fedeq,) = [s for s in fig.series if s.label == "fedeq"]
    # x: the mean cumulative simulated time, (10 + 12) / 2 = 11 s a round; y: mean accuracy, band min..max.
    assert fedeq.x == pytest.approx([11.0, 22.0, 33.0, 44.0])
    assert fedeq.y == pytest.approx([0.45, 0.75, 0.85, 0.9])
    assert fedeq.lo == pytest.approx([0.4, 0.7, 0.8, 0.9]) and fedeq.hi == pytest.approx([0.5, 0.8, 0.9, 0.9])
    assert "round 2, 22 simulated s" in fedeq.hover[1]
    trace = [t for t in F.to_plotly(fig)["data"] if t["name"] == "fedeq"][0]
    assert trace["x"] == fedeq.x
    pytest.importorskip("matplotlib")
    assert fig.title in F.to_svg(fig)


def test_the_verdict_names_the_first_to_the_target_in_simulated_time_and_the_exclusions(sim_group):
    text = verdict.verdict(sim_group, 1, 0.85)
    # From the table's numbers: fedavg 14 s, fedeq 27 s; 14 / 27 = 0.5185.
    assert "First to the target accuracy (0.7650) in simulated time: fedavg (14.00 s, 0.52x fedeq's time)." in text
    # excluded by memory, mean over seeds: fedeq (3 + 1) / 2 = 2, fedavg 0.
    assert "Clients excluded by memory (device memory below the method's peak training memory; mean over " \
           "seeds): fedeq 2, fedavg 0." in text
    # At 100% of fedeq's 0.9 fedavg (0.8) never gets there: fedeq is first, with no multiple of itself.
    assert "in simulated time: fedeq (38.00 s)." in verdict.verdict(sim_group, 1, 1.0)
