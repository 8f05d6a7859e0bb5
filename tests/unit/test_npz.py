"""`npz:PATH` (datasets/npz.py): a round trip through build_federated, and every error case."""
from __future__ import annotations

import os

import numpy as np
import pytest

from fedeq_bench.core.errors import BenchError
from fedeq_bench.datasets import DataArgs, get_dataset
from fedeq_bench.datasets.base import DATASETS
from fedeq_bench.datasets.npz import NpzConfig


def make_clients(sizes=((20, 5), (13, 4), (31, 7)), feat=(5,), seed=0) -> dict[str, np.ndarray]:
    """Client k gets (n_train, n_test) = sizes[k]. Column 0 of every row is a unique sample id, so a
    row can be traced through the split; labels are int32 in 0..5."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    next_id = 0
    for k, (ntr, nte) in enumerate(sizes):
        for part, n in (("train", ntr), ("test", nte)):
            x = rng.normal(size=(n, *feat))
            x.reshape(n, -1)[:, 0] = np.arange(next_id, next_id + n)
            next_id += n
            arrays[f"{part}_x_{k}"] = x
            arrays[f"{part}_y_{k}"] = rng.integers(0, 6, n).astype(np.int32)
    return arrays


def write(tmp_path, arrays, name="part.npz") -> str:
    path = os.path.join(tmp_path, name)
    np.savez(path, **arrays)
    return path


def load(path: str, **kw):
    return get_dataset("npz:" + path, NpzConfig(), DataArgs(**{"seed": 0, **kw}))


def rows_sorted(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(x[:, 0])  # column 0 is the unique id
    return x[order], y[order]


def test_registered():
    assert "npz" in DATASETS.names()


def test_round_trip(tmp_path):
    arrays = make_clients()
    path = write(tmp_path, arrays)
    ds = load(path)
    assert ds.name == "npz" and len(ds.clients) == 3
    assert ds.partition == "npz(part.npz)"
    assert ds.input_shape == (5,)
    # No num_classes key: max label + 1 over all clients' train and test labels.
    want_nc = 1 + max(int(arrays[k].max()) for k in arrays if "_y_" in k)
    assert ds.num_classes == want_nc == 6  # labels are drawn from 0..5 and 113 of them hit 5
    assert ds.default_models == {"explicit": "mlp", "deq": "deq_mlp"}
    for k, c in enumerate(ds.clients):
        tx, ty = arrays[f"train_x_{k}"], arrays[f"train_y_{k}"]
        # Train and val together are exactly the original train set (same rows, same labels).
        got_x, got_y = rows_sorted(np.concatenate([c.train_x, c.val_x]), np.concatenate([c.train_y, c.val_y]))
        want_x, want_y = rows_sorted(tx.astype(np.float32), ty.astype(np.int64))
        np.testing.assert_array_equal(got_x, want_x)
        np.testing.assert_array_equal(got_y, want_y)
        # Val carve of base.py: round(0.1 * n), at least 1: 20 -> 2, 13 -> round(1.3) = 1, 31 -> 3.
        assert len(c.val_y) == {0: 2, 1: 1, 2: 3}[k]
        # Test is passed through untouched, in order.
        np.testing.assert_array_equal(c.test_x, arrays[f"test_x_{k}"].astype(np.float32))
        np.testing.assert_array_equal(c.test_y, arrays[f"test_y_{k}"].astype(np.int64))
        assert c.train_x.dtype == np.float32 and c.train_y.dtype == np.int64


def test_num_classes_key_is_used(tmp_path):
    path = write(tmp_path, {**make_clients(), "num_classes": np.int64(12)})
    assert load(path).num_classes == 12


def test_integer_images_pick_the_cnn(tmp_path):
    # uint8 (n, 1, 4, 4) images, uint16 labels: per-sample shape (C, H, W) -> explicit model `cnn`.
    rng = np.random.default_rng(0)
    arrays = {}
    for k in range(2):
        for part, n in (("train", 10), ("test", 3)):
            arrays[f"{part}_x_{k}"] = rng.integers(0, 256, (n, 1, 4, 4)).astype(np.uint8)
            arrays[f"{part}_y_{k}"] = rng.integers(0, 3, n).astype(np.uint16)
    ds = load(write(tmp_path, arrays))
    assert ds.input_shape == (1, 4, 4)
    assert ds.default_models == {"explicit": "cnn", "deq": "deq_mlp"}
    np.testing.assert_array_equal(ds.clients[1].test_x, arrays["test_x_1"].astype(np.float32))


def test_clients_subset_takes_the_first_ones(tmp_path):
    arrays = make_clients(sizes=((10, 3), (11, 3), (12, 3), (13, 3)))
    arrays["test_y_3"][0] = 9  # the only label 9 is in the last client
    path = write(tmp_path, arrays)
    ds = load(path, clients=2)
    assert len(ds.clients) == 2
    np.testing.assert_array_equal(ds.clients[1].test_y, arrays["test_y_1"])
    # num_classes comes from every client in the file, so it does not depend on `clients`.
    assert ds.num_classes == 10 == load(path).num_classes
    with pytest.raises(BenchError, match=r"has 4 clients; clients must be in 1\.\.4, got 5"):
        load(path, clients=5)


def test_relative_path_is_found_in_data_dir(tmp_path):
    write(tmp_path, make_clients(), name="rel.npz")
    ds = get_dataset("npz:rel.npz", NpzConfig(), DataArgs(seed=0, data_dir=str(tmp_path)))
    assert len(ds.clients) == 3 and ds.partition == "npz(rel.npz)"


def test_empty_path():
    with pytest.raises(BenchError, match=r"npz dataset needs a path: --dataset npz:PATH"):
        get_dataset("npz", NpzConfig(), DataArgs(seed=0))


def test_missing_file(tmp_path):
    with pytest.raises(BenchError, match=r"not found: .*nope\.npz"):
        load(str(tmp_path / "nope.npz"))


def test_not_an_npz_archive(tmp_path):
    p = tmp_path / "junk.npz"
    p.write_bytes(b"this is not a zip file at all" * 10)
    with pytest.raises(BenchError, match=r"not a valid \.npz archive"):
        load(str(p))


def test_a_bare_npy_file(tmp_path):
    p = str(tmp_path / "one.npy")
    np.save(p, np.zeros(3))
    with pytest.raises(BenchError, match=r"single \.npy array, not an \.npz archive"):
        load(p)


def test_object_arrays_are_refused(tmp_path):
    # np.savez pickles object arrays; loading with allow_pickle=False must refuse, not run pickle.
    arrays = make_clients()
    arrays["train_y_0"] = np.array([1, "a"], dtype=object)
    with pytest.raises(BenchError, match=r"cannot read array 'train_y_0'"):
        load(write(tmp_path, arrays))


def test_no_client_arrays(tmp_path):
    with pytest.raises(BenchError, match=r"has no client arrays"):
        load(write(tmp_path, {"num_classes": np.int64(3)}))


def test_unexpected_key(tmp_path):
    with pytest.raises(BenchError, match=r"unexpected keys \['train_X_3'\]"):
        load(write(tmp_path, {**make_clients(), "train_X_3": np.zeros((2, 5))}))


def test_missing_key_is_named(tmp_path):
    arrays = make_clients()
    del arrays["test_y_1"]
    with pytest.raises(BenchError, match=r"missing key test_y_1"):
        load(write(tmp_path, arrays))


def test_client_numbers_must_be_contiguous(tmp_path):
    arrays = make_clients()
    for split in ("train_x", "train_y", "test_x", "test_y"):
        del arrays[f"{split}_1"]  # clients 0 and 2 only
    with pytest.raises(BenchError, match=r"missing key train_x_1 \(clients must be numbered 0\.\.2\)"):
        load(write(tmp_path, arrays))


def test_mismatched_lengths(tmp_path):
    arrays = make_clients()
    arrays["train_y_2"] = arrays["train_y_2"][:-1]  # 31 x rows, 30 labels
    with pytest.raises(BenchError, match=r"train_x_2 has 31 samples but train_y_2 has 30"):
        load(write(tmp_path, arrays))


def test_inconsistent_feature_shapes(tmp_path):
    arrays = make_clients()
    arrays["test_x_1"] = np.zeros((4, 6))  # 6 features where every other array has 5
    with pytest.raises(BenchError, match=r"test_x_1 has per-sample shape \(6,\) but train_x_0 has \(5,\)"):
        load(write(tmp_path, arrays))


def test_float_labels(tmp_path):
    arrays = make_clients()
    arrays["train_y_0"] = arrays["train_y_0"].astype(np.float64)
    with pytest.raises(BenchError, match=r"train_y_0 has dtype float64; labels must be an integer dtype"):
        load(write(tmp_path, arrays))


def test_negative_labels(tmp_path):
    arrays = make_clients()
    arrays["test_y_2"][3] = -1
    with pytest.raises(BenchError, match=r"test_y_2 has negative label -1"):
        load(write(tmp_path, arrays))


def test_labels_at_or_above_num_classes(tmp_path):
    arrays = {**make_clients(), "num_classes": np.int64(4)}
    arrays["train_y_1"][0] = 4  # == num_classes, so out of range [0, 4)
    for k in arrays:  # keep every other label in range so the error names train_y_1
        if "_y_" in k and k != "train_y_1":
            arrays[k] %= 4
    arrays["train_y_1"][1:] %= 4
    with pytest.raises(BenchError, match=r"train_y_1 has label 4 >= num_classes=4"):
        load(write(tmp_path, arrays))


def test_num_classes_must_be_a_scalar_integer(tmp_path):
    with pytest.raises(BenchError, match=r"num_classes must be a scalar integer"):
        load(write(tmp_path, {**make_clients(), "num_classes": np.array([6, 6])}))


def test_empty_split(tmp_path):
    arrays = make_clients()
    arrays["test_x_0"], arrays["test_y_0"] = np.zeros((0, 5)), np.zeros(0, dtype=np.int64)
    with pytest.raises(BenchError, match=r"client 0 has no test samples"):
        load(write(tmp_path, arrays))


def test_features_must_be_numeric_and_2d(tmp_path):
    arrays = make_clients()
    arrays["train_x_0"] = np.array(["a"] * 20)
    with pytest.raises(BenchError, match=r"train_x_0 has dtype <U1; features must be integer or float"):
        load(write(tmp_path, arrays))
    arrays = make_clients()
    arrays["train_x_0"] = np.zeros(20)
    with pytest.raises(BenchError, match=r"train_x_0 has shape \(20,\); expected \(samples, features\.\.\.\)"):
        load(write(tmp_path, arrays))


@pytest.mark.parametrize("value, fragment", [
    (np.nan, r"train_x_1 \(client 1\) has 1 non-finite feature value\(s\), the first in sample 4 \(nan\)"),
    (-np.inf, r"train_x_1 \(client 1\) has 1 non-finite feature value\(s\), the first in sample 4 \(-inf\)"),
    (1e300, r"train_x_1 \(client 1\) has a feature of magnitude 1e\+300, beyond float32's 3.4e\+38"),
])
def test_features_that_cannot_train_are_refused_with_key_and_client(tmp_path, value, fragment):
    """A NaN, inf or float32-overflowing feature used to train silently to chance accuracy."""
    arrays = make_clients()  # float64 features
    arrays["train_x_1"][4, 2] = value
    with pytest.raises(BenchError, match=fragment):
        load(write(tmp_path, arrays))


def test_large_but_representable_features_still_load(tmp_path):
    arrays = make_clients()
    arrays["test_x_0"][0, 1] = 3e38  # below float32's max: the data is valid (scaling is the user's call)
    assert load(write(tmp_path, arrays)).num_classes == 6


def test_size_estimate_reads_only_the_headers_and_is_the_loaded_size(tmp_path):
    """bench/experiment/sizing.py's estimate before loading: from the archive's npy headers, the bytes the
    clients' arrays take once loaded (x float32, y int64), here exact (float64 x and int32 y on disk)."""
    from bench.experiment.sizing import dataset_bytes
    from fedeq_bench.datasets.npz import estimate_npz

    path = write(tmp_path, make_clients())  # (20 + 5) + (13 + 4) + (31 + 7) = 80 samples of 5 features
    est = estimate_npz(NpzConfig(path=path), DataArgs(seed=0))
    assert (est.clients, est.samples, est.bytes) == (3, 80, 80 * (5 * 4 + 8))
    assert est.bytes == dataset_bytes(load(path))
    assert estimate_npz(NpzConfig(path=str(tmp_path / "nope.npz")), DataArgs(seed=0)) is None  # the loader says why


@pytest.mark.parametrize("change,fragment", [
    (lambda a: a.update(train_x_1=np.full_like(a["train_x_1"], np.nan)), "train_x_1 (client 1) has 65 non-finite"),
    (lambda a: a.update(test_y_0=np.full_like(a["test_y_0"], 9), num_classes=np.int64(6)),
     "test_y_0 has label 9 >= num_classes=6; labels must be in [0, 6)"),
    (lambda a: a.update(train_y_2=a["train_y_2"][:-1]), "train_x_2 has 31 samples but train_y_2 has 30"),
    (lambda a: a.update(train_y_1=a["train_y_1"] + 0.5), "train_y_1 has dtype float64; labels must be an integer dtype"),
    (lambda a: a.update(test_x_2=a["test_x_2"][:0], test_y_2=a["test_y_2"][:0]), "client 2 has no test samples"),
])
def test_bad_arrays_name_the_key_and_the_client(tmp_path, change, fragment):
    arrays = make_clients()
    change(arrays)
    with pytest.raises(BenchError) as e:
        load(write(tmp_path, arrays))
    assert fragment in str(e.value) and "\n" not in str(e.value)
