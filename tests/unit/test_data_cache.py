"""datasets/cache.py and partition caching: hits, misses on any changed argument, corrupt entries,
atomic writes, and the partition string that reaches MLflow."""
from __future__ import annotations

import os

import numpy as np
import pytest

import fedeq_bench.datasets.partition as P
from fedeq_bench.core.errors import BenchError
from fedeq_bench.datasets import DataArgs, cache


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


Y_TR = np.repeat(np.arange(5), 40)  # 5 classes x 40 = 200 train
Y_TE = np.repeat(np.arange(5), 10)  # 5 x 10 = 50 test


def entries(root):
    d = root / "partitions"
    return sorted(os.listdir(d)) if d.is_dir() else []


def count_calls(monkeypatch):
    calls = []
    real = P.partition

    def counting(*a, **kw):
        calls.append(a[2:4])  # (n_clients, spec)
        return real(*a, **kw)

    monkeypatch.setattr(P, "partition", counting)
    return calls


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y)
                                    for pa, pb in zip(a, b, strict=True) for x, y in zip(pa, pb, strict=True))


def test_cache_dir_follows_the_environment(cache_in_tmp, monkeypatch):
    assert cache.cache_dir() == cache_in_tmp
    monkeypatch.delenv("BENCH_CACHE_DIR")
    assert str(cache.cache_dir()).endswith(os.path.join(".cache", "fedeq-bench"))


def test_second_call_reads_the_cache(cache_in_tmp, monkeypatch):
    first, digest = P.cached_partition(Y_TR, Y_TE, 10, "shards:2", seed=0)
    assert len(entries(cache_in_tmp)) == 1 and entries(cache_in_tmp)[0].endswith(".npz")

    def boom(*a, **kw):
        raise AssertionError("partition() recomputed although the cache holds it")

    monkeypatch.setattr(P, "partition", boom)
    again, digest2 = P.cached_partition(Y_TR, Y_TE, 10, "shards:2", seed=0)
    assert same(first, again) and digest == digest2
    # A different spelling of the same spec is the same entry.
    assert same(P.cached_partition(Y_TR, Y_TE, 10, " Shards: 2", seed=0)[0], first)


@pytest.mark.parametrize("change", [
    {"seed": 1}, {"n_clients": 8}, {"spec": "shards:3"}, {"spec": "dirichlet:0.5"},
    {"labels_train": np.roll(Y_TR, 1)}, {"labels_test": Y_TE[:-1]},
])
def test_any_changed_argument_misses_the_cache(cache_in_tmp, monkeypatch, change):
    base = {"labels_train": Y_TR, "labels_test": Y_TE, "n_clients": 10, "spec": "shards:2", "seed": 0}
    P.cached_partition(**base)
    calls = count_calls(monkeypatch)
    P.cached_partition(**{**base, **change})
    assert len(calls) == 1  # computed, not read
    assert len(entries(cache_in_tmp)) == 2


def test_same_arguments_same_key_and_key_covers_the_version():
    k = cache.partition_key(Y_TR, Y_TE, 10, "shards:2", 0, P.VERSION)
    assert k == cache.partition_key(Y_TR.copy(), Y_TE.copy(), 10, "shards:2", 0, P.VERSION) and len(k) == 64
    assert k != cache.partition_key(Y_TR, Y_TE, 10, "shards:2", 0, P.VERSION + 1)


def test_garbage_entry_is_recomputed_and_rewritten(cache_in_tmp, monkeypatch):
    good, _ = P.cached_partition(Y_TR, Y_TE, 10, "dirichlet:1", seed=0)
    path = cache_in_tmp / "partitions" / entries(cache_in_tmp)[0]
    path.write_bytes(path.read_bytes()[:100])  # truncated: not a readable zip any more
    calls = count_calls(monkeypatch)
    again, _ = P.cached_partition(Y_TR, Y_TE, 10, "dirichlet:1", seed=0)
    assert len(calls) == 1 and same(good, again)
    assert cache.load_partition(path.stem) is not None  # rewritten whole


def test_readable_entry_with_a_changed_index_fails_its_checksum(cache_in_tmp, monkeypatch):
    good, _ = P.cached_partition(Y_TR, Y_TE, 10, "shards:2", seed=0)
    path = cache_in_tmp / "partitions" / entries(cache_in_tmp)[0]
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["train_0"] = arrays["train_0"].copy()
    arrays["train_0"][0] = arrays["train_1"][0]  # one sample now in two clients; sha256 left as it was
    np.savez(path, **arrays)
    assert cache.load_partition(path.stem) is None
    calls = count_calls(monkeypatch)
    again, _ = P.cached_partition(Y_TR, Y_TE, 10, "shards:2", seed=0)
    assert len(calls) == 1 and same(good, again)


def test_a_failed_write_leaves_neither_entry_nor_temp_file(cache_in_tmp, monkeypatch):
    def half_write(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", half_write)
    parts = P.partition(Y_TR, Y_TE, 10, "shards:2", np.random.default_rng(0))
    assert cache.save_partition("k" * 64, parts) is None  # reported, not raised: the cache is optional
    assert entries(cache_in_tmp) == []  # no final file and no .tmp left behind


def test_atomic_write_replaces_only_after_a_complete_write(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(BenchError):
        cache.atomic_write(target, lambda f: f.write(b"new"), check=lambda p: (_ for _ in ()).throw(BenchError("bad")))
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]
    cache.atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.bin"]


def test_a_partition_that_cannot_be_made_writes_nothing(cache_in_tmp):
    # 150 clients x 2 = 300 shards > 200 samples.
    with pytest.raises(BenchError, match=r"needs 300 shards but the train set has only 200 samples"):
        P.cached_partition(Y_TR, Y_TE, 150, "shards:2", seed=0)
    assert entries(cache_in_tmp) == []


def test_partition_string_names_spec_clients_seed_and_hash(cache_in_tmp):
    x_tr = np.arange(200, dtype=np.uint8).reshape(200, 1)
    x_te = np.arange(50, dtype=np.uint8).reshape(50, 1)
    args = DataArgs(seed=3, clients=None, partition="shards:2")
    ds = P.federate("t", (x_tr, Y_TR), (x_te, Y_TE), 5, args, "dirichlet:0.5", 10,
                    lambda x: x.astype(np.float32), {"explicit": "mlp", "deq": "deq_mlp"})
    parts, digest = P.cached_partition(Y_TR, Y_TE, 10, "shards:2", seed=3)
    assert digest == cache.parts_digest(parts) and len(digest) == 16
    assert ds.partition == f"shards:2(clients=10,seed=3,sha256={digest})"
    # Another seed draws another partition, so another hash (and the dataset default applies when unset).
    other = P.federate("t", (x_tr, Y_TR), (x_te, Y_TE), 5, DataArgs(seed=4), "dirichlet:0.5", 10,
                       lambda x: x.astype(np.float32), {})
    assert other.partition.startswith("dirichlet:0.5(clients=10,seed=4,sha256=") and digest not in other.partition
