"""Synthetic(alpha, beta): the federated logistic-regression benchmark of FedProx.

Reference: T. Li, A. K. Sahu, M. Zaheer, M. Sanjabi, A. Talwalkar, V. Smith, "Federated
Optimization in Heterogeneous Networks", MLSys 2020 (Section 5.1 and Appendix C.1); code:
github.com/litian96/FedProx, `data/synthetic_*/generate_synthetic.py` and
`data/synthetic_iid/generate_iid.py`. This module follows that code, with d = 60 features and
C = 10 classes, for users k = 1..K (K = 30 by default):

    n_k       = floor(LogNormal(4, 2)) + 50                 samples of user k
    u_k       ~ N(0, alpha^2)                                mean_W[k]; mean_b[k] = mean_W[k]
    B_k       ~ N(0, beta^2)
    Sigma     = diag((j + 1)^-1.2),  j = 0..d-1              cov_x, shared by every user
    v_k       ~ N(B_k, 1)^d                                  mean_x[k] (non-iid)
    W_k       ~ N(u_k, 1)^(d x C),   b_k ~ N(u_k, 1)^C       the user's own softmax model
    x         ~ N(v_k, Sigma)                                n_k draws per user
    y         = argmax softmax(x W_k + b_k)

The iid variant (FedProx's `iid == 1` branch) shares one model, W ~ N(0, 1)^(d x C) and
b ~ N(0, 1)^C, across users and sets v_k = B_k * 1_d; with beta = 0 (as FedProx runs
Synthetic_IID) every user then draws x from the same N(0, Sigma).

Conventions of the original code kept here, since the paper's N(0, alpha) notation hides them:
alpha and beta are standard deviations (`np.random.normal(0, alpha, ...)`), not variances; and
b_k's mean is the same scalar u_k as W_k's. One consequence worth knowing: u_k adds
u_k * sum(x) + u_k to every class's logit alike, so it never changes the argmax; in this
generator alpha changes the drawn W_k and b_k but not a single label. Only beta (through v_k)
and the unit-variance parts of W_k, b_k make users differ.

Differences from the original, none of which changes the distribution:
  * draws come from the run's named `data` stream (`bench.seeding.numpy_rng(seed, "data")`),
    never numpy's global state, so the same seed gives the same data on every machine;
  * x ~ N(v_k, Sigma) is drawn as v_k + z * sqrt(diag Sigma) (Sigma is diagonal), and labels as
    argmax(x W_k + b_k): softmax is monotone, and skipping it avoids exp overflow;
  * each user's samples are shuffled and split `train_frac` / rest into train / test (FedProx
    used 90/10 with `int()`; this harness uses 80/20 by default and rounds, as base.py does for
    validation, keeping at least one sample on each side). The validation split is then carved
    from train by `build_federated`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.ranges import ranged
from fedeq_bench.core.seeding import numpy_rng
from fedeq_bench.datasets.base import DataArgs, DataEstimate, FederatedDataset, build_federated, register_dataset
from fedeq_bench.datasets.partition import require_natural

DIMENSION = 60
"""Feature dimension d of FedProx's Synthetic data."""
NUM_CLASSES = 10
"""Number of classes C of FedProx's Synthetic data."""
DEFAULT_CLIENTS = 30
"""FedProx's NUM_USER; used when `DataArgs.clients` is None."""
MIN_SAMPLES = 50
"""The `+ 50` of FedProx's samples_per_user: every user has at least this many samples."""
MODELS = {"explicit": "mlp", "deq": "deq_mlp"}
"""The model pairing: logistic-regression-sized inputs take the MLP and the DEQ-MLP."""


@dataclass(frozen=True)
class SyntheticConfig:
    """Options of the `synthetic` dataset (`--set synthetic.alpha=1`)."""

    alpha: float = ranged(0.5, ge=0)
    """Std of each user's model-mean u_k (W_k, b_k ~ N(u_k, 1)); raising it spreads users'
    models further apart. Must be >= 0. (u_k shifts all logits equally, so labels do not change.)"""
    beta: float = ranged(0.5, ge=0)
    """Std of each user's feature-mean centre B_k (v_k ~ N(B_k, 1)); raising it makes users'
    inputs, and hence their label distributions, more different. Must be >= 0."""
    iid: bool = False
    """True: FedProx's iid variant, one shared (W, b) and v_k = B_k * 1; set beta=0 (and alpha=0)
    for Synthetic_IID as the paper runs it. False: each user has its own model and feature mean."""
    train_frac: float = ranged(0.8, gt=0, lt=1)
    """Fraction of each user's samples in its training split (the rest is test); raising it
    gives more training and fewer test samples. Must be in (0, 1)."""


def _validate(cfg: SyntheticConfig, n_clients: int) -> None:
    # `not x >= 0` rather than `x < 0` so NaN is rejected too.
    if not cfg.alpha >= 0:
        raise BenchError(f"synthetic.alpha must be >= 0 (a standard deviation), got {cfg.alpha}")
    if not cfg.beta >= 0:
        raise BenchError(f"synthetic.beta must be >= 0 (a standard deviation), got {cfg.beta}")
    if not 0.0 < cfg.train_frac < 1.0:
        raise BenchError(f"synthetic.train_frac must be in (0, 1), got {cfg.train_frac}")
    if n_clients < 1:
        raise BenchError(f"synthetic needs at least 1 client, got clients={n_clients}")


def split_sizes(n: int, train_frac: float) -> tuple[int, int]:
    """(train, test) sizes of a user with `n` samples: train = round(train_frac * n), kept in
    [1, n - 1] so both sides are non-empty (n >= 50 here, so the clamp only matters for extreme
    train_frac)."""
    n_train = min(max(int(round(train_frac * n)), 1), n - 1)
    return n_train, n - n_train


def sample_counts(n_clients: int, rng: np.random.Generator) -> np.ndarray:
    """n_k = floor(LogNormal(4, 2)) + 50 for every user: the first draw `generate` makes, so that
    `estimate_synthetic` can make it alone and know the exact data size without generating it."""
    return rng.lognormal(4, 2, n_clients).astype(np.int64) + MIN_SAMPLES


SAMPLE_BYTES = DIMENSION * 4 + 8
"""Bytes of one sample as a client holds it: 60 float32 features and an int64 label."""


def estimate_synthetic(cfg: SyntheticConfig, args: DataArgs) -> DataEstimate | None:
    """The exact bytes the clients' arrays will take, from the sample counts alone (one lognormal
    draw per user: 100,000 users in milliseconds, where generating them takes minutes and ~11 GB)."""
    n_clients = DEFAULT_CLIENTS if args.clients is None else int(args.clients)
    if n_clients < 1:
        return None  # the loader says what is wrong
    samples = int(sample_counts(n_clients, numpy_rng(args.seed, "data")).sum())
    return DataEstimate(clients=n_clients, samples=samples, bytes=samples * SAMPLE_BYTES,
                        input_shape=(DIMENSION,), num_classes=NUM_CLASSES, default_models=dict(MODELS))


def generate(
    cfg: SyntheticConfig, n_clients: int, rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every user's (x, y), in FedProx's draw order; x float32 (n_k, 60), y int64 (n_k,).

    x is drawn and labelled in float64, as FedProx does, and kept as float32, the dtype every client
    array has (datasets/base.py casts to it anyway): the same numbers at half the memory, which
    matters at 10,000 users (~4.5M samples: 1.1 GB in float32).
    """
    k, d, c = n_clients, DIMENSION, NUM_CLASSES
    samples = sample_counts(k, rng)
    mean_w = rng.normal(0.0, cfg.alpha, k)
    mean_b = mean_w  # FedProx: mean_b = mean_W (the same scalar per user)
    big_b = rng.normal(0.0, cfg.beta, k)
    # sqrt of cov_x's diagonal: x = mean + z * sd is N(mean, diag(sd^2)).
    sd = np.power(np.arange(1, d + 1, dtype=np.float64), -1.2) ** 0.5
    if cfg.iid:
        mean_x = np.ones((k, d)) * big_b[:, None]
        w_global = rng.normal(0.0, 1.0, (d, c))
        b_global = rng.normal(0.0, 1.0, c)
    else:
        # Row i ~ N(B_i, 1)^d, as FedProx's per-user loop draws it.
        mean_x = rng.normal(big_b[:, None], 1.0, (k, d))
    out = []
    for i in range(k):
        if cfg.iid:
            w, b = w_global, b_global
        else:
            w = rng.normal(mean_w[i], 1.0, (d, c))
            b = rng.normal(mean_b[i], 1.0, c)
        x = mean_x[i] + rng.standard_normal((int(samples[i]), d)) * sd
        # argmax of softmax == argmax of the logits (softmax is monotone).
        y = np.argmax(x @ w + b, axis=1).astype(np.int64)
        out.append((x.astype(np.float32), y))
    return out


@register_dataset("synthetic", SyntheticConfig, estimate=estimate_synthetic)
def load_synthetic(cfg: SyntheticConfig, args: DataArgs) -> FederatedDataset:
    """FedProx's Synthetic(alpha, beta) over `args.clients` users (30 if None)."""
    require_natural("synthetic", args.partition)  # users are generated: no partitioner applies
    n_clients = DEFAULT_CLIENTS if args.clients is None else int(args.clients)
    _validate(cfg, n_clients)
    rng = numpy_rng(args.seed, "data")
    users = deque(generate(cfg, n_clients, rng))

    def splits():
        # One user at a time, and each user's unsplit arrays dropped once split, so the data is held
        # about once while build_federated copies it into clients (10,000 users: ~1 GB, not ~4 GB).
        # The permutations are still drawn after every user is generated, in user order.
        for _ in range(n_clients):
            x, y = users.popleft()
            # Shuffle before splitting (as FedProx does) from the same stream, so the split is a
            # pure function of the seed.
            perm = rng.permutation(len(y))
            n_train, _ = split_sizes(len(y), cfg.train_frac)
            tr, te = perm[:n_train], perm[n_train:]
            yield x[tr], y[tr], x[te], y[te]

    return build_federated(
        "synthetic",
        splits(),
        NUM_CLASSES,
        args,
        partition=f"synthetic(alpha={cfg.alpha},beta={cfg.beta},iid={cfg.iid})",
        default_models=dict(MODELS),
    )
