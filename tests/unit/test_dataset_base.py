"""datasets/base.py: the validation carve, unseen clients, fingerprint and dataset lookup that every
loader shares (exercised through build_federated with hand-made arrays)."""
from __future__ import annotations

import numpy as np
import pytest

from fedeq_bench.core.errors import BenchError
from fedeq_bench.datasets import DataArgs, get_dataset
from fedeq_bench.datasets.base import build_federated, split_dataset_name
from fedeq_bench.datasets.synthetic import SyntheticConfig


def client(n_train: int, n_test: int = 4, d: int = 3, start: int = 0):
    """Column 0 is a unique sample id (start, start+1, ...) so rows can be traced; label = id % 5."""
    x = np.zeros((n_train, d))
    x[:, 0] = np.arange(start, start + n_train)
    sx = np.ones((n_test, d))
    return x, (np.arange(start, start + n_train) % 5), sx, np.zeros(n_test, dtype=np.int64)


def build(raw, **kw):
    return build_federated("t", raw, 5, DataArgs(**{"seed": 0, **kw}), partition="hand")


def test_val_carve_100_samples_at_0_1_is_10_val_90_train():
    ds = build([client(100)], val_frac=0.1)
    c = ds.clients[0]
    assert (len(c.val_y), c.num_train) == (10, 90)  # round(0.1 * 100) = 10; 100 - 10 = 90
    assert len(c.test_y) == 4  # test is never carved


@pytest.mark.parametrize(
    "n,val_frac,n_val",
    [
        (37, 0.2, 7),  # round(7.4) = 7
        (5, 0.01, 1),  # round(0.05) = 0, raised to 1: val_frac > 0 keeps one val sample
        (2, 0.9, 1),  # round(1.8) = 2, lowered to n - 1 = 1: train keeps one sample
        (1, 0.5, 0),  # a single sample cannot be split: all train
        (50, 0.0, 0),  # val_frac = 0: no validation split
    ],
)
def test_val_carve_rounding_and_clamps(n, val_frac, n_val):
    c = build([client(n)], val_frac=val_frac).clients[0]
    assert len(c.val_y) == n_val and c.num_train == n - n_val


def test_val_and_train_are_disjoint_and_cover_the_original():
    x, y, _, _ = raw = client(100)
    c = build([raw], val_frac=0.25).clients[0]
    tr_ids, val_ids = set(c.train_x[:, 0].tolist()), set(c.val_x[:, 0].tolist())
    assert not tr_ids & val_ids
    assert tr_ids | val_ids == set(range(100))
    # Each row keeps its own label (label = id % 5 by construction).
    np.testing.assert_array_equal(c.train_y, c.train_x[:, 0].astype(np.int64) % 5)
    np.testing.assert_array_equal(c.val_y, c.val_x[:, 0].astype(np.int64) % 5)
    # The carve is random (not the first 25 rows), and rows keep their original order within a split.
    assert val_ids != set(range(25))
    assert np.all(np.diff(c.train_x[:, 0]) > 0) and np.all(np.diff(c.val_x[:, 0]) > 0)


def test_arrays_are_cast_to_float32_and_int64():
    x, y, sx, sy = client(10)
    c = build([(x.astype(np.float64), y.astype(np.int16), sx.astype(np.int32), sy.astype(np.uint8))]).clients[0]
    assert (c.train_x.dtype, c.train_y.dtype, c.test_x.dtype, c.test_y.dtype) == (
        np.float32, np.int64, np.float32, np.int64,
    )


def test_frac_unseen_0_2_of_30_clients_holds_out_6():
    raw = [client(20, start=100 * k) for k in range(30)]
    ds = build(raw, frac_unseen=0.2)
    assert len(ds.unseen) == 6  # round(0.2 * 30) = 6
    assert list(ds.unseen) == sorted(set(ds.unseen)) and all(0 <= u < 30 for u in ds.unseen)
    assert len(ds.train_ids) == 24 and not set(ds.train_ids) & set(ds.unseen)
    assert sorted(ds.train_ids + list(ds.unseen)) == list(range(30))
    # The held-out set is a function of the seed: same seed, same set.
    assert build(raw, frac_unseen=0.2).unseen == ds.unseen
    assert build(raw).unseen == () and build(raw).train_ids == list(range(30))


def test_fingerprint_is_stable_and_changes_with_one_value():
    raw = [client(20, start=100 * k) for k in range(3)]
    a, b = build(raw), build(raw)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    changed = [tuple(np.array(t, copy=True) for t in r) for r in raw]
    changed[2][2][3, 1] += 1e-3  # one feature of one test sample of the last client
    assert build(changed).fingerprint != a.fingerprint
    # The split seed decides the val carve, so another seed gives other arrays, other fingerprint.
    assert build(raw, seed=1).fingerprint != a.fingerprint


@pytest.mark.parametrize("kw,msg", [({"val_frac": 1.0}, r"val_frac must be in \[0, 1\)"),
                                    ({"frac_unseen": -0.1}, r"frac_unseen must be in \[0, 1\)")])
def test_bad_fractions(kw, msg):
    with pytest.raises(BenchError, match=msg):
        build([client(10)], **kw)


def test_frac_unseen_that_leaves_no_training_client():
    # round(0.75 * 2) = 2 >= 2 clients.
    with pytest.raises(BenchError, match=r"leaves no training client among 2"):
        build([client(10), client(10)], frac_unseen=0.75)


def test_dataset_name_lookup():
    assert split_dataset_name("npz:/data/x.npz") == ("npz", "/data/x.npz")
    assert split_dataset_name("synthetic") == ("synthetic", None)
    with pytest.raises(BenchError, match=r"unknown dataset 'nope'; choose from .*npz.*synthetic"):
        get_dataset("nope", SyntheticConfig(), DataArgs(seed=0))
    with pytest.raises(BenchError, match=r"dataset 'synthetic' takes no ':' argument"):
        get_dataset("synthetic:x", SyntheticConfig(), DataArgs(seed=0))


# -- every loader's output is checked in one place -------------------------------------------------

def load_raw(monkeypatch, raw, **kw):
    """`raw` through get_dataset, as every loader's output goes: a hand-made loader registered as `t`."""
    from dataclasses import dataclass

    from fedeq_bench.datasets.base import DATASETS, DatasetEntry

    @dataclass(frozen=True)
    class RawCfg:
        pass

    monkeypatch.setitem(DATASETS._items, "t", DatasetEntry(lambda cfg, args: build(raw, **kw), RawCfg))
    return get_dataset("t", RawCfg(), DataArgs(seed=0))


def with_change(k: int, part: int, value, n: int = 2):
    """n clients of client(10) with element `part` (0 train_x, 1 train_y, 2 test_x, 3 test_y) of
    client k replaced by `value`."""
    raw = [list(client(10, start=10 * i)) for i in range(n)]
    raw[k][part] = value
    return [tuple(r) for r in raw]


@pytest.mark.parametrize("raw,msg", [
    # Labels a 5-class model cannot use (client(...) labels are id % 5, in 0..4).
    (with_change(1, 1, np.array([0, 1, 2, -1, 4, 0, 1, 2, 3, 4])), r"t: client 1 (train|val)_y has label -1; labels must be in \[0, 5\)"),
    (with_change(0, 3, np.array([0, 0, 5, 0])), r"t: client 0 test_y has label 5; labels must be in \[0, 5\) \(num_classes=5\)"),
    (with_change(1, 1, np.arange(10) % 5 + 0.5), r"t: client 1 train_y has label 0\.5, not a whole number"),
    (with_change(0, 3, np.array([0.0, np.nan, 1.0, 2.0])), r"t: client 0 test_y has label nan, not a whole number"),
    (with_change(0, 1, np.array(list("abcdeabcde"))), r"t: client 0 train_y has dtype <U1; labels must be integers"),
    (with_change(1, 0, np.array([["a"] * 3] * 10)), r"t: client 1 train_x has dtype <U1; features must be numbers"),
    # Shapes: one label per sample, one feature shape and one label shape for all clients.
    (with_change(1, 1, np.arange(9) % 5), r"t: client 1 train_x has shape \(10, 3\) but train_y has shape \(9,\); "
                                          r"one label \(row\) per sample"),
    (with_change(1, 3, np.zeros((4, 2), dtype=np.int64)), r"t: client 1 test_y has per-sample label shape \(2,\) but "
                                                          r"client 0 train_y has \(\)"),
    (with_change(1, 2, np.ones((4, 4))), r"t: client 1 test_x has per-sample shape \(4,\) but client 0 train_x has \(3,\)"),
    # Empty clients.
    ([client(10), (np.ones((3, 3)), np.zeros(3, int), np.ones((0, 3)), np.zeros(0, int))],
     r"t: client 1 has no test samples; every client needs at least one train and one test sample"),
    ([client(10), (np.ones((0, 3)), np.zeros(0, int), np.ones((2, 3)), np.zeros(2, int))],
     r"t: client 1 has no train samples"),
    ([], r"t: the loader produced no clients"),
    # Features the models (float32) cannot train on: NaN, inf, and 1e300 (finite in float64, inf in float32).
    (with_change(0, 2, np.array([[0, 0, 0], [0, np.nan, 0], [0, 0, 0], [0, 0, 0]])),
     r"t: client 0 test_x has 1 non-finite feature value\(s\) \(NaN, inf, or beyond float32's 3\.4e38\)"),
    (with_change(1, 2, np.full((4, 3), 1e300)), r"t: client 1 test_x has 12 non-finite feature value\(s\)"),
])
def test_labels_shapes_empty_clients_and_features_a_model_cannot_use_are_one_line(raw, msg, monkeypatch):
    with pytest.raises(BenchError, match=msg) as e:
        load_raw(monkeypatch, raw, val_frac=0.2)
    assert "\n" not in str(e.value)


def test_whole_number_float_and_bool_labels_are_accepted_as_classes():
    x, _, sx, _ = client(6)
    ds = build([(x, np.array([0.0, 1.0, 2.0, 3.0, 4.0, 0.0]), sx, np.array([True, False, True, False]))], val_frac=0)
    np.testing.assert_array_equal(ds.clients[0].train_y, [0, 1, 2, 3, 4, 0])
    np.testing.assert_array_equal(ds.clients[0].test_y, [1, 0, 1, 0])
    assert ds.clients[0].train_y.dtype == np.int64


def test_a_loader_that_bypasses_build_federated_is_checked_by_get_dataset(monkeypatch):
    """The check sits in get_dataset, so it covers a plugin loader that builds FederatedDataset itself."""
    from dataclasses import dataclass

    from fedeq_bench.datasets.base import DATASETS, ClientData, DatasetEntry, FederatedDataset

    @dataclass(frozen=True)
    class HandCfg:
        pass

    def loader(cfg, args):
        f = np.zeros((4, 3), dtype=np.float32)
        good = ClientData(f, np.array([0, 1, 2, 3]), f[:0], np.zeros(0, np.int64), f, np.array([0, 1, 2, 3]))
        bad = ClientData(f, np.array([0, 1, 7, 3]), f[:0], np.zeros(0, np.int64), f, np.array([0, 1, 2, 3]))
        return FederatedDataset("hand", [good, bad], num_classes=4, input_shape=(3,))

    monkeypatch.setitem(DATASETS._items, "hand", DatasetEntry(loader, HandCfg))
    with pytest.raises(BenchError, match=r"^hand: client 1 train_y has label 7; labels must be in \[0, 4\)"):
        get_dataset("hand", HandCfg(), DataArgs(seed=0))


def test_data_dir_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "data.txt"
    f.write_text("not a folder")
    with pytest.raises(BenchError, match=r"^--data-dir '.*data\.txt' is a file, not a folder; expected a folder"):
        get_dataset("synthetic", SyntheticConfig(), DataArgs(seed=0, data_dir=str(f)))
