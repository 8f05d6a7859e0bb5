"""Synthetic(alpha, beta) of FedProx (datasets/synthetic.py): shape, sizes, split, determinism, and
that the labels really are argmax of a linear (softmax) model of x."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import linprog

from fedeq_bench.core.errors import BenchError
from fedeq_bench.datasets import DataArgs, get_dataset
from fedeq_bench.datasets.base import DATASETS
from fedeq_bench.datasets.synthetic import SyntheticConfig, split_sizes


def load(cfg: SyntheticConfig | None = None, **kw):
    return get_dataset("synthetic", cfg or SyntheticConfig(), DataArgs(**{"seed": 0, **kw}))


def whole(c) -> tuple[np.ndarray, np.ndarray]:
    """One client's samples, all splits together."""
    return np.concatenate([c.train_x, c.val_x, c.test_x]), np.concatenate([c.train_y, c.val_y, c.test_y])


def separable(x: np.ndarray, s: np.ndarray) -> bool:
    """Is there (v, t) with s_i (v.x_i + t) >= 1 for all i? An LP feasibility problem (HiGHS)."""
    a = -s[:, None] * np.hstack([x.astype(np.float64), np.ones((len(x), 1))])
    res = linprog(np.zeros(a.shape[1]), A_ub=a, b_ub=-np.ones(len(x)), bounds=(None, None), method="highs")
    assert res.status in (0, 2), res.message  # 0 feasible, 2 infeasible; anything else is inconclusive
    return res.status == 0


def pair_of_classes(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The samples of the two most frequent classes, labelled +1 / -1."""
    a, b = np.argsort(np.bincount(y, minlength=10))[::-1][:2]
    m = (y == a) | (y == b)
    return x[m], np.where(y[m] == a, 1.0, -1.0)


def test_registered_with_partition_and_models():
    ds = load()
    assert "synthetic" in DATASETS.names()
    assert ds.name == "synthetic"
    assert ds.partition == "synthetic(alpha=0.5,beta=0.5,iid=False)"
    assert ds.default_models == {"explicit": "mlp", "deq": "deq_mlp"}


def test_default_shapes_30_clients_60_features_10_classes():
    ds = load()
    assert len(ds.clients) == 30  # FedProx's NUM_USER, the default when DataArgs.clients is None
    assert ds.input_shape == (60,) and ds.num_classes == 10
    for c in ds.clients:
        for x, y in ((c.train_x, c.train_y), (c.val_x, c.val_y), (c.test_x, c.test_y)):
            assert x.dtype == np.float32 and y.dtype == np.int64
            assert x.ndim == 2 and x.shape[1] == 60 and x.shape[0] == y.shape[0]
            assert y.min() >= 0 and y.max() <= 9
    # Labels are not all one class overall (10 classes drawn from 30 different models).
    all_y = np.concatenate([whole(c)[1] for c in ds.clients])
    assert len(np.unique(all_y)) >= 5


def test_clients_argument_sets_the_number_of_users():
    assert len(load(clients=5).clients) == 5
    assert len(load(clients=1).clients) == 1


def test_every_client_has_at_least_50_samples():
    # samples_per_user = int(lognormal(4, 2)) + 50 >= 50, over several seeds (30 users each).
    for seed in range(5):
        ds = load(seed=seed)
        sizes = [len(whole(c)[1]) for c in ds.clients]
        assert min(sizes) >= 50, sizes
        # lognormal(4, 2) is heavy-tailed: median e^4 ~ 55, so sizes are far from equal.
        assert max(sizes) > 2 * min(sizes)


def test_split_sizes_rule_by_hand():
    # train = round(0.8 n), test = n - train.
    assert split_sizes(913, 0.8) == (730, 183)  # 0.8 * 913 = 730.4 -> 730
    assert split_sizes(55, 0.8) == (44, 11)  # 0.8 * 55 = 44
    assert split_sizes(51, 0.8) == (41, 10)  # 40.8 -> 41
    assert split_sizes(50, 0.999) == (49, 1)  # 49.95 -> 50, clamped to n - 1: test keeps 1 sample
    assert split_sizes(50, 0.001) == (1, 49)  # 0.05 -> 0, clamped to 1


def expected_sizes(n: int, train_frac: float, val_frac: float) -> tuple[int, int, int]:
    """(train, val, test) from the two rules: synthetic's train/test split, then base.py's val carve."""
    pre = min(max(int(round(train_frac * n)), 1), n - 1)
    test = n - pre
    val = min(max(int(round(val_frac * pre)), 1), pre - 1)
    return pre - val, val, test


@pytest.mark.parametrize("train_frac,val_frac", [(0.8, 0.1), (0.5, 0.2), (0.9, 0.0)])
def test_split_arithmetic_per_client(train_frac, val_frac):
    ds = load(SyntheticConfig(train_frac=train_frac), val_frac=val_frac)
    for c in ds.clients:
        n = len(whole(c)[1])
        if val_frac == 0:
            want = (split_sizes(n, train_frac)[0], 0, split_sizes(n, train_frac)[1])
        else:
            want = expected_sizes(n, train_frac, val_frac)
        assert (c.num_train, len(c.val_y), len(c.test_y)) == want, n
        assert len(c.test_y) >= 1
    # One worked example, so the rule above is visibly right: n = 64 at 0.8 / 0.1 gives
    # pre = round(51.2) = 51, test = 13, val = round(5.1) = 5, train = 46.
    assert expected_sizes(64, 0.8, 0.1) == (46, 5, 13)


def test_splits_are_disjoint_rows_of_one_sample_set():
    # The features are continuous, so two identical rows would mean one sample in two splits.
    for c in load().clients:
        x, _ = whole(c)
        assert len(np.unique(x, axis=0)) == len(x)


def test_same_seed_same_data_other_seed_other_data():
    a, b, other = load(seed=3), load(seed=3), load(seed=4)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    for ca, cb in zip(a.clients, b.clients, strict=True):
        for field in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
            np.testing.assert_array_equal(getattr(ca, field), getattr(cb, field))
    assert other.fingerprint != a.fingerprint
    assert not np.array_equal(other.clients[0].train_x[:5], a.clients[0].train_x[:5])
    # Options change the data too (beta moves the feature means).
    assert load(SyntheticConfig(beta=1.0), seed=3).fingerprint != a.fingerprint


def test_iid_labels_come_from_one_shared_linear_model():
    # With iid=True every user labels by argmax(x W + b) with the same (W, b). For the two most
    # frequent classes a, b, the pooled points then lie on either side of the hyperplane
    # (w_a - w_b).x + (b_a - b_b) = 0, so the LP finds a separator. The same points with the labels
    # shuffled (hundreds of points in 60 dimensions, far above the 2(d+1) = 122 that random labels
    # can be split in) must not be separable: that control shows the LP can say no.
    ds = load(SyntheticConfig(alpha=0.0, beta=0.0, iid=True), clients=10)
    x = np.concatenate([whole(c)[0] for c in ds.clients])
    y = np.concatenate([whole(c)[1] for c in ds.clients])
    px, ps = pair_of_classes(x, y)
    assert len(ps) > 300
    assert separable(px, ps)
    assert not separable(px, np.random.default_rng(1).permutation(ps))


def test_non_iid_labels_come_from_the_clients_own_linear_model():
    # Non-iid users each have their own (W_k, b_k), so the check holds within a client. Some users
    # hold a single class; take the one whose second most frequent class is largest.
    ds = load()

    def second(c):
        return np.sort(np.bincount(whole(c)[1], minlength=10))[-2]

    c = max(ds.clients, key=second)
    assert second(c) >= 100
    px, ps = pair_of_classes(*whole(c))
    assert separable(px, ps)
    assert not separable(px, np.random.default_rng(1).permutation(ps))


def test_alpha_never_changes_a_label():
    # W_k = u_k + Z and b_k = u_k + z with u_k ~ N(0, alpha); the u_k part adds u_k * (sum(x) + 1) to
    # every class's logit alike, so argmax(x W_k + b_k) does not depend on alpha. Generator.normal
    # draws loc + scale * N(0, 1), so the same seed gives the same Z, z and x for any alpha: the data
    # must come out identical. (This is FedProx's generator as written; see the module docstring.)
    lo = load(SyntheticConfig(alpha=0.0, beta=0.5))
    hi = load(SyntheticConfig(alpha=2.0, beta=0.5))
    for a, b in zip(lo.clients, hi.clients, strict=True):
        np.testing.assert_array_equal(whole(a)[0], whole(b)[0])
        np.testing.assert_array_equal(whole(a)[1], whole(b)[1])


def test_feature_covariance_is_diag_j_plus_1_to_minus_1_2():
    # Within a client x ~ N(v_k, diag((j+1)^-1.2)); pool each client's centred squares. With about
    # 8800 samples the relative standard error of a variance is sqrt(2/8800) ~ 1.5%, so 10% is wide.
    ds = load()
    xs = [whole(c)[0].astype(np.float64) for c in ds.clients]
    ss = sum(((x - x.mean(0)) ** 2).sum(0) for x in xs)
    dof = sum(len(x) - 1 for x in xs)
    want = np.arange(1, 61, dtype=np.float64) ** -1.2  # 1, 0.435, ..., 60^-1.2 = 0.0074
    np.testing.assert_allclose(ss / dof, want, rtol=0.1)


def test_iid_feature_mean_is_constant_across_features():
    # iid: v_k = B_k * 1, so a client's 60 feature means agree up to sampling noise
    # (sd <= 1/sqrt(50) ~ 0.14). Non-iid: v_k ~ N(B_k, 1)^60, so they spread with sd ~ 1.
    iid = load(SyntheticConfig(alpha=0.0, beta=3.0, iid=True))
    niid = load(SyntheticConfig(alpha=0.0, beta=3.0))
    assert max(float(whole(c)[0].mean(0).std()) for c in iid.clients) < 0.2
    assert float(np.median([whole(c)[0].mean(0).std() for c in niid.clients])) > 0.6
    # And beta = 3 really moves the iid clients' centres apart: B_k ~ N(0, 3) over 30 users.
    centres = [float(whole(c)[0].mean()) for c in iid.clients]
    assert np.std(centres) > 1.0


@pytest.mark.parametrize(
    "cfg,clients,msg",
    [
        (SyntheticConfig(alpha=-0.1), None, r"alpha must be >= 0"),
        (SyntheticConfig(beta=-1.0), None, r"beta must be >= 0"),
        (SyntheticConfig(alpha=math.nan), None, r"alpha must be >= 0"),
        (SyntheticConfig(train_frac=0.0), None, r"train_frac must be in \(0, 1\)"),
        (SyntheticConfig(train_frac=1.0), None, r"train_frac must be in \(0, 1\)"),
        (SyntheticConfig(train_frac=1.5), None, r"train_frac must be in \(0, 1\)"),
        (SyntheticConfig(), 0, r"at least 1 client"),
    ],
)
def test_bad_options_raise_bench_error(cfg, clients, msg):
    with pytest.raises(BenchError, match=msg):
        load(cfg, clients=clients)
