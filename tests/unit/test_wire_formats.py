"""Wire formats through the engine (bench/loop/wire.py `Codec`): fp32 keeps the numbers the engine gave
before formats existed, bit for bit; a compressed format costs its exact bytes in both directions and
the receiver trains on the decoded values; a method's own `wire` beats the run's."""
import pytest

from bench import config as C
from fedeq_bench.datasets import DataArgs, get_dataset
from tests.helpers import synthetic_run

# Recorded with the engine at commit 501c30e, before wire formats existed (the same config and seed):
# FedAvg and FeDEQ on synthetic, 6 clients, 2 rounds, fraction 0.5, seed 0.
GOLDEN = {
    "fedavg": (0.7340720221606648, 0.42420022816412034, 1307130, 1306944),
    "fedeq": (0.9335180055401662, 0.14973272862386824, 975024, 974952),
}


def run(method, **keys):
    _, r = synthetic_run(method, **keys)
    return r, (r.final["acc/weighted"], r.final["loss/train"], r.ledger.total("up"), r.ledger.total("down"))


@pytest.mark.parametrize("method", sorted(GOLDEN))
def test_fp32_default_gives_the_numbers_from_before_wire_formats(method):
    assert run(method)[1] == GOLDEN[method]
    assert run(method, wire="fp32")[1] == GOLDEN[method]


def test_fp16_halves_every_float_entry_both_ways_and_the_receiver_gets_the_rounding():
    """FedAvg sends its whole float32 model (and an int64 sample count) each way: fp16 saves 2 bytes
    per parameter per message, headers and the count unchanged."""
    full, (_, loss32, up32, down32) = run("fedavg")
    half, (_, loss16, up16, down16) = run("fedavg", wire="fp16")
    params = full.params_shared
    n_up = sum(1 for e in full.ledger.entries if e.direction == "up")
    n_down = sum(1 for e in full.ledger.entries if e.direction == "down")
    assert n_up == n_down == 6  # 3 clients a round (fraction 0.5 of 6), 2 rounds
    assert up32 - up16 == n_up * 2 * params and down32 - down16 == n_down * 2 * params
    assert [e.keys for e in half.ledger.entries] == [e.keys for e in full.ledger.entries]  # same tensors, named alike
    assert loss16 != loss32  # training started from the rounded global model, not the exact one


def test_a_methods_own_wire_beats_the_runs():
    """`fedavg.wire=int8` under a run at fp32: FedAvg's messages shrink, FeDEQ's numbers are untouched."""
    _, fedavg = run("fedavg", **{"fedavg.wire": "int8"})
    assert fedavg[2] < GOLDEN["fedavg"][2] / 3  # about a quarter: int8 entries plus a scale per tensor
    assert run("fedeq", **{"fedavg.wire": "int8"})[1] == GOLDEN["fedeq"]
    _, back = run("fedavg", wire="int8", **{"fedavg.wire": "fp32"})
    assert back == GOLDEN["fedavg"]


def test_a_report_shows_each_wire_format_as_a_row_of_one_comparison(tmp_path):
    """Two comparisons into one experiment, the second at int8: the report pools them into one group
    (the wire format names a row, it does not split the comparison), `fedavg@int8` beside `fedavg`,
    with its own bytes, and its rerun command runs fedavg at int8."""
    from bench import experiment
    from bench.report import collect, tables
    from tests.helpers import new_store

    uri = new_store(tmp_path / "mlflow.db")
    base = {"methods": "fedeq,fedavg", "dataset": "synthetic", "clients": 6, "rounds": 2, "backend": "serial",
            "fraction": 0.5, "tracking_uri": uri, "experiment": "wire"}
    for keys, command in (({}, "python -m bench.run --methods fedeq,fedavg"),
                          ({"methods": "fedavg", "wire": "int8"}, "python -m bench.run --methods fedavg --wire int8"),
                          ({"methods": "fedavg", "wire": "topk", "wire_topk": 0.1, "wire_feedback": True},
                           "python -m bench.run --methods fedavg --wire topk --wire-topk 0.1 --wire-feedback")):
        experiment.compare(experiment.validate(C.apply(C.default_config(), {**base, **keys})), command=command, quiet=True)
    data = collect.collect(uri, "wire")
    (group,) = data.groups
    assert group.methods == ["fedeq", "fedavg", "fedavg@int8", "fedavg@topk0.1+ef"]
    _, comm, *_ = tables.group_tables(group, data.parents)
    mb = {row[0].text: row[comm.columns.index("MB total")].value for row in comm.rows}
    assert mb["fedavg"] * 1e6 == sum(GOLDEN["fedavg"][2:])  # the fp32 run: the golden bytes, up + down
    assert 0.25 < mb["fedavg@int8"] / mb["fedavg"] < 0.26  # 1 byte an entry of 4, plus headers and scales
    (int8,) = [r for r in group.runs if r.method == "fedavg@int8"]
    cmd = tables.rerun_command({p.run_id: p for p in data.parents}, int8)
    assert "--wire int8" in cmd and cmd.endswith("--methods fedavg --seeds 0")


def test_topk_uplinks_cost_their_k_entries_and_downlinks_stay_fp32():
    """FedAvg at topk 0.1 with error feedback: every downlink is the fp32 one (the golden bytes); each
    uplink sends, per float32 tensor of n entries, ceil(0.1 n) int32 indices and float32 values under
    `NAME#idx` / `NAME#val` (2 + len + 1 + 1 + 4 + 8 bytes of header each), and the int64 sample count
    as it is."""
    import math

    from fedeq_bench.methods.nets import build_model

    r, (_, _, up, down) = run("fedavg", wire="topk", wire_topk=0.1, wire_feedback=True)
    assert down == GOLDEN["fedavg"][3]
    ds = get_dataset("synthetic", C.default_config().datasets["synthetic"],
                     DataArgs(seed=0, clients=6, partition=None, val_frac=0.1, frac_unseen=0.0, data_dir=None))
    sd = build_model("mlp", ds.input_shape, ds.num_classes).state_dict()
    per_message = 8 + 2 + len("num_samples") + 1 + 1 + 8 + 8  # the header, the int64 count (0-dim)
    for name, t in sd.items():
        k = math.ceil(0.1 * t.numel())
        per_message += sum(2 + len(name) + len(suffix) + 1 + 1 + 4 + 8 + 4 * k for suffix in ("#idx", "#val"))
    n_up = sum(1 for e in r.ledger.entries if e.direction == "up")
    assert up == n_up * per_message
    # The ledger names the tensors the server got back (dense), not the wire's #idx / #val parts.
    assert all(set(e.keys) == {*sd, "num_samples"} for e in r.ledger.entries if e.direction == "up")
