"""bench/experiment/sizing.py: the memory a run will need, estimated before any data is made, and the one-line
refusal when it cannot fit (before it, `--clients 100000` on synthetic was killed by the kernel at 24 GB)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench import config as C
from bench.experiment import load_checked, load_dataset, sizing, validate
from bench.loop import engine
from bench.loop.backends import SerialBackend
from bench.loop.store import ClientStore, state_bytes
from fedeq_bench.core.errors import BenchError
from fedeq_bench.datasets.base import DataArgs, estimate_dataset
from fedeq_bench.datasets.synthetic import SyntheticConfig

GB = 10**9


def cfg_of(**run):
    run = {"methods": "fedavg", **{k: str(v) for k, v in run.items()}}
    return validate(C.from_cli(None, run, []))


def test_synthetic_estimate_is_the_exact_size_of_the_loaded_data():
    cfg = cfg_of(clients=40, seeds=3, backend="serial")
    est = estimate_dataset("synthetic", SyntheticConfig(), DataArgs(seed=3, clients=40))
    ds = load_dataset(cfg, 3)
    samples = sum(len(c.train_y) + len(c.val_y) + len(c.test_y) for c in ds.clients)
    assert (est.clients, est.samples) == (40, samples)
    assert est.bytes == sizing.dataset_bytes(ds) == samples * (60 * 4 + 8)  # float32 x 60 features + int64 label
    assert (est.input_shape, est.num_classes, est.default_models) == (ds.input_shape, ds.num_classes, ds.default_models)


def test_kept_states_arithmetic():
    run = cfg_of(clients=100, rounds=3, fraction=0.1, frac_unseen=0.2).run
    # 20 held out, 80 training; cohort round(0.1 * 80) = 8 a round, 3 rounds: at most 24 trained.
    assert sizing.kept_states(run, 100) == 24 + 20
    run = cfg_of(clients=100, rounds=30).run
    assert sizing.kept_states(run, 100) == 100  # fraction 1: every client trains in round 1


@pytest.mark.parametrize("method", ["fedavg", "fedrep", "lg_fedavg", "ditto", "fedeq"])
def test_state_per_client_is_what_the_engine_really_keeps(method, monkeypatch):
    """The estimate (personal part, plus FeDEQ's theta_i and dual) equals the bytes of the states the
    engine's client store holds after a round of real training."""
    cfg = cfg_of(methods=method, clients=2, rounds=1, backend="serial", checkpoint_every=0)
    ds = load_dataset(cfg, 0)
    kept: dict[int, int] = {}
    setitem = ClientStore.__setitem__

    def record(self, cid, state):
        kept[cid] = state_bytes(state)
        setitem(self, cid, state)

    monkeypatch.setattr(ClientStore, "__setitem__", record)
    engine.run_method(cfg, method, 0, ds, SerialBackend())
    assert sorted(kept) == [0, 1]  # fraction 1: both clients trained and were stored
    est = sizing.state_bytes_per_client(cfg, method, ds.default_models, ds.input_shape, ds.num_classes)
    assert est == max(kept.values())
    if method == "fedavg":
        assert est == 0


def test_refusal_says_the_estimate_what_is_available_and_what_to_lower():
    cfg = cfg_of(methods="fedavg,fedeq", clients=100_000)  # backend ray (the default), no state budget
    with pytest.raises(BenchError) as e:
        sizing.check_before_load(cfg, available=20 * GB)
    msg = str(e.value)
    est = estimate_dataset("synthetic", SyntheticConfig(), DataArgs(seed=0, clients=100_000))
    assert est.samples > 40_000_000  # E[LogNormal(4, 2)] + 50 = e^6 + 50 ~ 453 per client
    assert "\n" not in msg and msg.startswith("this run needs about ")
    assert f"data {est.bytes / GB:.1f} GB ({est.samples:,} samples)" in msg
    assert f"Ray object-store copy {est.bytes / GB:.1f} GB" in msg
    assert "fedeq client states" in msg and "100,000 clients x 330 kB" in msg  # theta_i + dual + head of deq_mlp
    assert "but only 20.0 GB is available" in msg
    for fix in ("lower --clients (now 100,000)", "--state-budget-gb N", "--backend serial"):
        assert fix in msg


def test_a_state_budget_caps_the_states_counted():
    cfg = cfg_of(methods="fedeq", clients=100_000, backend="serial", state_budget_gb=1)
    sizing.check_before_load(cfg, available=14 * GB)  # 11.2 GB of data + at most 1 GB of states: fits
    with pytest.raises(BenchError, match=r"fedeq client states 1\.0 GB \(100,000 clients x 330 kB, capped by "
                                         r"--state-budget-gb 1\.0\)"):
        sizing.check_before_load(cfg, available=12 * GB)


@pytest.mark.parametrize("run,available_gb", [
    ({"methods": "fedavg,fedrep"}, 0.05),  # the default task: 30 clients, about 4 MB of data
    ({"methods": "all", "clients": 10_000, "backend": "serial", "state_budget_gb": 0.5,
      "fraction": 0.01}, 2.0),  # bench/perf/scale.py's largest size, with a state budget
    ({"methods": "all", "clients": 10_000, "fraction": 0.01, "rounds": 30}, 4.0),  # 3,000 states at most
])
def test_the_normal_workloads_fit_on_a_small_machine(run, available_gb):
    sizing.check_before_load(cfg_of(**run), available=int(available_gb * GB))


def test_fmnist_50_clients_every_method_fits_after_loading():
    """Fashion-MNIST (no estimate before loading) is checked with the loaded size: 50 clients of
    every method, the cnn's 6.65 MB per Ditto/APFL/pFedMe client, Ray's copy of 220 MB of images."""
    from fedeq_bench.datasets.base import ClientData, FederatedDataset

    cfg = cfg_of(methods="all", dataset="fmnist")
    x, y = np.zeros((1200, 1, 28, 28), np.float32), np.zeros(1200, np.int64)  # 60,000 / 50 per client
    ds = FederatedDataset("fmnist", [ClientData(x, y, x[:0], y[:0], x[:200], y[:200])] * 50, 10, (1, 28, 28),
                          default_models={"explicit": "cnn", "deq": "deq_mlp"})
    from fedeq_bench.methods.nets import build_model

    cnn = sum(v.nbytes for v in build_model("cnn", (1, 28, 28), 10).state_dict().values())  # 6.65 MB
    total, method, per, model = sizing.states_in_memory(cfg, 50, ds.default_models, ds.input_shape, ds.num_classes)
    assert per == model == cnn and total == 50 * cnn  # the whole cnn, kept by Ditto, APFL, pFedMe, Local, FedAvg-FT
    sizing.check_after_load(cfg, {0: ds}, available=2 * GB)
    # Ray's copy: 50 x 1,400 samples x (784 x 4 + 8) bytes = 0.22 GB; states 50 x 6.65 MB = 0.33 GB;
    # 6 copies of the cnn, 0.04 GB: 0.59 GB.
    with pytest.raises(BenchError, match=r"needs about 0\.6 GB more memory \(Ray object-store copy 0\.2 GB \+ apfl "
                                         r"client states 0\.3 GB \(50 clients x 6,653 kB\) \+ apfl's model 7 MB x 6 "
                                         r"copies\) but only 0\.5 GB"):
        sizing.check_after_load(cfg, {0: ds}, available=GB // 2)


def test_load_checked_refuses_ten_million_clients_before_generating_anything():
    """1.1 TB of data: refused from the sample counts alone, whatever memory the test's machine has."""
    cfg = cfg_of(clients=10_000_000, backend="serial")
    with pytest.raises(BenchError, match=r"^this run needs about \d+\.\d GB memory \(data \d+\.\d GB "
                                         r"\(4,5\d\d,\d{3},\d{3} samples\)\) but only .* is available"):
        load_checked(cfg)


def test_available_bytes_reads_this_machine():
    got = sizing.available_bytes()
    assert got is None or got > 0


def test_a_model_made_huge_by_its_labels_is_refused_before_it_is_built(tmp_path):
    """An npz whose labels are ids up to 10^9 (no num_classes key: max label + 1 classes) would make
    an mlp with a 200 x 10^9 output layer, 804 GB: refused with the model named, before check_models
    builds it (it would be killed, or take the machine down, first)."""
    from tests.helpers import write_tiny_npz

    path = write_tiny_npz(tmp_path / "ids.npz", clients=2)
    arrays = dict(np.load(path))
    arrays["train_y_1"] = arrays["train_y_1"].copy()
    arrays["train_y_1"][0] = 10**9
    np.savez(path, **arrays)
    cfg = cfg_of(dataset=f"npz:{path}", backend="serial")
    # (200 + 1) x (10^9 + 1) x 4 bytes of the output layer: 804 GB.
    with pytest.raises(BenchError, match=r"^this run needs about \d+\.\d GB more memory \(fedavg's model 804\.0 GB "
                                         r"x 6 copies\) but only .* is available .*; to fit, choose a smaller "
                                         r"--model, or check the labels"):
        load_checked(cfg)


def test_ray_client_does_not_count_an_object_store_copy_here():
    near = cfg_of(clients=100_000)
    # Not through validate, which would try to reach the (made-up) cluster.
    far = dataclasses.replace(near, run=dataclasses.replace(near.run, address="ray://head:10001"))
    with pytest.raises(BenchError, match="Ray object-store copy"):
        sizing.check_before_load(near, available=20 * GB)
    sizing.check_before_load(far, available=20 * GB)  # 11.2 GB of data here; the store is the cluster's


def test_every_seed_is_counted_since_load_checked_holds_them_all():
    one = estimate_dataset("synthetic", SyntheticConfig(), DataArgs(seed=0, clients=10_000))
    three = sum(estimate_dataset("synthetic", SyntheticConfig(), DataArgs(seed=s, clients=10_000)).bytes for s in range(3))
    cfg = cfg_of(clients=10_000, seeds="0,1,2", backend="serial")
    sizing.check_before_load(cfg, available=three + GB)  # fits (states of fedavg: none)
    with pytest.raises(BenchError, match=r"samples over 3 seeds, all held at once\)\) but only .*; to fit, lower "
                                         r"--clients \(now 10,000\), or run fewer seeds at once \(now 3"):
        sizing.check_before_load(cfg, available=three - 1)
    assert 2.5 * one.bytes < three < 3.5 * one.bytes  # three draws of about 4.5M samples
