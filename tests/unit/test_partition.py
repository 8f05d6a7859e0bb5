"""datasets/partition.py: spec parsing, dirichlet and shards partitioners, the test-split rule."""
from __future__ import annotations

import numpy as np
import pytest

from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.seeding import numpy_rng
from fedeq_bench.datasets.partition import (
    _largest_remainder,
    _test_like_train,
    canonical,
    parse_partition,
    partition,
    require_natural,
)


def balanced(n_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    """`per_class` samples of each class, in shuffled order (so no rule can rely on sorted input)."""
    y = np.repeat(np.arange(n_classes), per_class)
    return np.random.default_rng(seed).permutation(y)


def rng(seed=0):
    return numpy_rng(seed, "data")


def assert_exactly_once(parts, n_train):
    train = np.concatenate([tr for tr, _ in parts])
    np.testing.assert_array_equal(np.sort(train), np.arange(n_train))  # each index once, none missing


# -- specs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,want", [
    ("dirichlet:0.5", ("dirichlet", 0.5)),
    (" Dirichlet : 1e-1 ", ("dirichlet", 0.1)),
    ("shards:2", ("shards", 2)),
    ("natural", ("natural", None)),
])
def test_parse_valid(spec, want):
    assert parse_partition(spec) == want


@pytest.mark.parametrize("spec,msg", [
    ("dirichlet:0", r"partition 'dirichlet:0': alpha must be > 0"),
    ("dirichlet:-1", r"alpha must be > 0"),
    ("dirichlet:nan", r"alpha must be > 0"),
    ("dirichlet:inf", r"alpha must be > 0"),
    ("dirichlet", r"alpha must be a number > 0"),
    ("dirichlet:x", r"alpha must be a number > 0"),
    ("shards:x", r"partition 'shards:x': K must be a whole number >= 1"),
    ("shards:1.5", r"K must be a whole number"),
    ("shards:0", r"K must be >= 1"),
    ("natural:3", r"natural takes no argument"),
    ("iid", r"unknown partition 'iid' \(in 'iid'\); choose from dirichlet:ALPHA, natural, shards:K"),
    ("", r"partition must be one of dirichlet:ALPHA, natural, shards:K"),
])
def test_parse_errors_are_one_line(spec, msg):
    with pytest.raises(BenchError, match=msg) as e:
        parse_partition(spec)
    assert "\n" not in str(e.value)


def test_canonical_spelling_is_shared_by_equal_specs():
    assert canonical("Dirichlet: 0.50") == canonical("dirichlet:0.5") == "dirichlet:0.5"
    assert canonical("shards: 02") == "shards:2"


def test_require_natural_for_datasets_with_their_own_clients():
    require_natural("synthetic", None)
    require_natural("synthetic", "natural")
    with pytest.raises(BenchError, match=r"dataset 'npz' has its own client split; partition must be natural"):
        require_natural("npz", "shards:2")
    with pytest.raises(BenchError, match=r"alpha must be > 0"):  # a malformed spec says what is malformed
        require_natural("npz", "dirichlet:0")


def test_synthetic_and_npz_reject_a_partitioner(tmp_path):
    from fedeq_bench.datasets import DataArgs, get_dataset
    from fedeq_bench.datasets.npz import NpzConfig
    from fedeq_bench.datasets.synthetic import SyntheticConfig
    from tests.helpers import write_tiny_npz

    with pytest.raises(BenchError, match=r"dataset 'synthetic' has its own client split.*'dirichlet:0.5'"):
        get_dataset("synthetic", SyntheticConfig(), DataArgs(seed=0, partition="dirichlet:0.5"))
    path = write_tiny_npz(tmp_path / "t.npz")
    with pytest.raises(BenchError, match=r"dataset 'npz' has its own client split"):
        get_dataset(f"npz:{path}", NpzConfig(), DataArgs(seed=0, partition="shards:1"))
    assert len(get_dataset(f"npz:{path}", NpzConfig(), DataArgs(seed=0, partition="natural")).clients) == 5


# -- shards ---------------------------------------------------------------------------------------

def test_shards_2_of_10_classes_each_client_two_classes_at_most_and_test_within_them():
    # 10 classes x 60 = 600 train, 10 x 20 = 200 test; 30 clients x 2 shards = 60 shards of 600/60 = 10.
    y_tr, y_te = balanced(10, 60), balanced(10, 20, seed=1)
    parts = partition(y_tr, y_te, 30, "shards:2", rng())
    assert_exactly_once(parts, 600)
    for tr, te in parts:
        assert len(tr) == 2 * 10
        classes = set(y_tr[tr].tolist())
        assert len(classes) <= 2
        assert set(y_te[te].tolist()) <= classes
    # Test sets are disjoint and use the whole test pool (every class is trained on by someone).
    np.testing.assert_array_equal(np.sort(np.concatenate([te for _, te in parts])), np.arange(200))


def test_shards_remainder_goes_to_the_first_shards_of_a_class():
    # Class sizes 26, 25, 25, 24 (n = 100); 10 clients x 2 = 20 shards.
    # Shards per class: quotas 20 * (26, 25, 25, 24) / 100 = (5.2, 5, 5, 4.8) -> floors (5, 5, 5, 4) = 19,
    # the 20th to the largest fraction (0.8, class 3) -> (5, 5, 5, 5).
    # Class 0: 26 = 6 + 5 + 5 + 5 + 5 (first shard +1); class 3: 24 = 5 + 5 + 5 + 5 + 4.
    # So shard sizes are {6, 4, and 18 fives}, and a client's two shards sum to 9, 10 or 11.
    y_tr = np.random.default_rng(0).permutation(np.repeat(np.arange(4), [26, 25, 25, 24]))
    np.testing.assert_array_equal(_largest_remainder(np.array([5.2, 5.0, 5.0, 4.8]), 20), [5, 5, 5, 5])
    parts = partition(y_tr, balanced(4, 5), 10, "shards:2", rng())
    assert_exactly_once(parts, 100)
    sizes = sorted(len(tr) for tr, _ in parts)
    assert set(sizes) <= {9, 10, 11} and sum(sizes) == 100
    assert all(len(set(y_tr[tr].tolist())) <= 2 for tr, _ in parts)


def test_shards_tiny_class_still_gets_one_shard():
    # 3 classes of sizes 97, 2, 1: quotas 4 * (97, 2, 1) / 100 = (3.88, 0.08, 0.04) -> (4, 0, 0) by largest
    # remainder, then each empty class takes a shard from the largest: (2, 1, 1). Every sample assigned.
    y_tr = np.repeat(np.arange(3), [97, 2, 1])
    parts = partition(y_tr, np.repeat(np.arange(3), 20), 4, "shards:1", rng())
    assert_exactly_once(parts, 100)
    assert sorted(len(tr) for tr, _ in parts) == [1, 2, 48, 49]  # 97 -> 49 + 48 by array_split


@pytest.mark.parametrize("n_clients,spec,msg", [
    (30, "shards:2", r"shards:2 with 30 clients needs 60 shards but the train set has only 50 samples"),
    (2, "shards:2", r"makes 4 shards, fewer than the 5 classes"),
    (0, "shards:1", r"clients must be a whole number >= 1, got 0"),
    (51, "dirichlet:1", r"clients=51 but the train set has only 50 samples"),
    (3, "natural", r"partition 'natural' needs a dataset with its own clients"),
])
def test_partitions_that_cannot_be_made(n_clients, spec, msg):
    with pytest.raises(BenchError, match=msg) as e:
        partition(balanced(5, 10), balanced(5, 2), n_clients, spec, rng())
    assert "\n" not in str(e.value)


# -- dirichlet ------------------------------------------------------------------------------------

def test_dirichlet_assigns_every_sample_once_and_test_follows_train_proportions():
    y_tr, y_te = balanced(10, 200), balanced(10, 50, seed=1)  # test pool = train pool / 4 per class
    parts = partition(y_tr, y_te, 8, "dirichlet:0.5", rng())
    assert_exactly_once(parts, 2000)
    np.testing.assert_array_equal(np.sort(np.concatenate([te for _, te in parts])), np.arange(500))
    train_counts = np.stack([np.bincount(y_tr[tr], minlength=10) for tr, _ in parts])
    test_counts = np.stack([np.bincount(y_te[te], minlength=10) for _, te in parts])
    # Each class's 50 test samples are split in proportion to the clients' train counts of it:
    # quota = 50 * a_ic / 200 = a_ic / 4, rounded by largest remainder, so within 1 of the quota.
    assert np.all(np.abs(test_counts - train_counts / 4) < 1)
    assert np.all(test_counts[train_counts == 0] == 0)  # only train classes
    assert all(len(te) >= 1 for _, te in parts)


def test_dirichlet_rounding_never_drops_the_last_sample_of_a_class():
    # Proportions that sum to 1 - 1e-9 (float rounding can do that): floor(cumsum * 200) would end
    # at floor(199.9999998) = 199, leaving the class's last sample with no client.
    class ShortSums:
        def __init__(self):
            self.rng = rng()

        def dirichlet(self, alpha):
            return self.rng.dirichlet(alpha) * (1 - 1e-9)

        def __getattr__(self, name):
            return getattr(self.rng, name)

    parts = partition(balanced(3, 200), balanced(3, 10), 4, "dirichlet:1", ShortSums())
    assert_exactly_once(parts, 600)


def test_dirichlet_small_alpha_gives_fewer_classes_per_client_than_large_alpha():
    y_tr, y_te = balanced(10, 100), balanced(10, 20)

    def classes_per_client(alpha):
        parts = partition(y_tr, y_te, 10, f"dirichlet:{alpha}", rng())
        return np.mean([len(np.unique(y_tr[tr])) for tr, _ in parts])

    skewed, flat = classes_per_client(0.05), classes_per_client(100.0)
    # alpha = 100: each client's share of a class ~ Dir(100 * 1_10), i.e. 0.1 +- 0.003: all 10 classes.
    assert flat == 10
    # alpha = 0.05: a class lands almost entirely on one or two clients.
    assert skewed < 5 < flat


def test_dirichlet_that_cannot_give_every_client_enough_samples():
    # 10 samples over 10 clients: each needs min(10, 10 // 10) = 1; alpha = 1e-4 puts each class
    # (5 classes x 2 samples) on a single client, so at most 5 clients get any sample.
    with pytest.raises(BenchError, match=r"dirichlet:0.0001 over 10 clients left some client with fewer than 1 "
                                         r"train samples in 1000 draws; raise alpha or use fewer clients"):
        partition(balanced(5, 2), balanced(5, 2), 10, "dirichlet:0.0001", rng())


# -- determinism ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["dirichlet:0.5", "shards:2"])
def test_same_seed_same_partition_other_seed_other_partition(spec):
    y_tr, y_te = balanced(10, 60), balanced(10, 20)
    a = partition(y_tr, y_te, 20, spec, rng(0))
    b = partition(y_tr, y_te, 20, spec, rng(0))
    c = partition(y_tr, y_te, 20, spec, rng(1))
    for (ta, sa), (tb, sb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_array_equal(sa, sb)
    assert any(not np.array_equal(ta, tc) for (ta, _), (tc, _) in zip(a, c, strict=True))


# -- the test-split rule, by hand -----------------------------------------------------------------

def test_client_without_a_test_sample_takes_one_from_the_largest_holder():
    # Client 0 trains on 10 samples of class 0, client 1 on 1; the test pool has 3 of class 0.
    # Quotas 3 * 10/11 = 2.73 and 3 * 1/11 = 0.27 -> floors (2, 0); the spare one goes to the larger
    # fraction (client 0) -> (3, 0). Client 1 then takes one from client 0 -> (2, 1).
    y_tr, y_te = np.zeros(11, np.int64), np.zeros(3, np.int64)
    test = _test_like_train(y_tr, y_te, [np.arange(10), np.array([10])], rng())
    assert [len(t) for t in test] == [2, 1]
    assert sorted(np.concatenate(test).tolist()) == [0, 1, 2]


def test_no_test_sample_to_spare_is_an_error():
    # Both clients train on class 0 only, and the test pool has a single sample of it.
    with pytest.raises(BenchError, match=r"client 1 trains on classes no other client can spare a test sample of"):
        _test_like_train(np.zeros(4, np.int64), np.zeros(1, np.int64), [np.arange(2), np.arange(2, 4)], rng())
