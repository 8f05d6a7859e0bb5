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
