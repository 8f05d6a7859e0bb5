"""Partitioners: how a centralised dataset (one train pool, one test pool) becomes clients.

Specs (`--partition`, `DataArgs.partition`):

    dirichlet:ALPHA   label skew of Hsu, Qi & Brown (arXiv 1909.06335) as NIID-Bench (Li et al.,
                      ICDE 2022) draws it: for every class c, its shuffled train samples are cut
                      over the clients with proportions p_c ~ Dir(ALPHA * 1_n). Small ALPHA: each
                      client sees few classes; large ALPHA: close to iid.
    shards:K          the "pathological" label skew of FedAvg (McMahan et al., AISTATS 2017),
                      LG-FedAvg and FedRep (Collins et al., ICML 2021, `utils/sampling.py: noniid`):
                      n_clients * K shards, each holding one class, dealt K per client at random,
                      so every client holds at most K classes.
    natural           the dataset's own clients (writers, speaking roles, generated users); only
                      datasets that have them accept it, for fmnist/cifar it is an error.

Rules, all pure functions of (labels, n_clients, spec, rng):

* Train pool (dirichlet and shards): every train sample is assigned to exactly one client.
  - dirichlet: class c is split at floor(cumsum(p_c) * n_c) (interior cuts only), so the last
    client's chunk runs to the end of the class and rounding never drops a sample. A draw that leaves some client with fewer than `min_train` samples
    (min(10, n // n_clients), at least 1; NIID-Bench's `min_require_size = 10`) is redrawn, from
    the same stream, up to MAX_DRAWS times; then the partition "cannot be made" (BenchError).
  - shards: FedRep cuts each class into its own shards (so a shard never straddles two classes);
    FedAvg sorts by label and cuts the sorted list into n_clients * K equal shards. Both agree
    whenever every class is a whole number of shards (Fashion-MNIST with 50 clients x 2 shards:
    6000 / 600 = 10 shards per class). This module cuts per class, so "at most K classes per
    client" holds for any class sizes: class c gets s_c shards, s_c proportional to its size
    (largest remainder, at least 1, sum = n_clients * K), and its shuffled samples are cut with
    `np.array_split`, so the remainder n_c mod s_c goes one sample each to the first shards of
    that class. Every class needs a shard, so n_clients * K must be >= the number of classes
    (else some samples would be dropped: BenchError), and <= the number of train samples.
  The shards are dealt by one random permutation: client i gets shards perm[i*K : (i+1)*K].
* Test pool (both): a client's test set has its train set's label proportions and only its
  train classes. For each class c, the shuffled test samples of c are divided among the clients
  in proportion to their train counts of c (largest remainder; ties to the lower client id). So
  test sets are disjoint, and every test sample of a class that some client trains on is used.
  A client left with no test sample (tiny train set, rounding) takes one sample of its largest
  train class from the client holding most test samples of that class (BenchError if none can
  spare one), so accuracy is never 0/0.

`partition(...)` computes; `cached_partition(...)` is what loaders call: the same result, read from
the on-disk cache (datasets/cache.py) when the same arguments were partitioned before. `federate`
turns a centralised dataset into a `FederatedDataset` with it.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.seeding import numpy_rng

PARTITIONS = ("dirichlet:ALPHA", "natural", "shards:K")
"""Valid spec forms, for error messages."""
MAX_DRAWS = 1000
"""Dirichlet redraws before giving up on giving every client `min_train` samples."""
MIN_TRAIN = 10
"""NIID-Bench's `min_require_size`: a dirichlet client needs this many train samples (fewer when
the pool is too small for it, see `_min_train`)."""
VERSION = 1
"""Bumped whenever a rule above changes the result for the same arguments (invalidates the cache)."""

Parts = list[tuple[np.ndarray, np.ndarray]]
"""Per client: (train indices into the train pool, test indices into the test pool), int64, sorted."""


# -- specs ----------------------------------------------------------------------------------------

def parse_partition(spec: str) -> tuple[str, float | int | None]:
    """`"dirichlet:0.5"` -> ("dirichlet", 0.5); `"shards:2"` -> ("shards", 2); `"natural"` -> ("natural", None)."""
    if not isinstance(spec, str) or not spec.strip():
        raise BenchError(f"partition must be one of {', '.join(PARTITIONS)}, got {spec!r}")
    name, sep, arg = spec.strip().partition(":")
    name, arg = name.strip().lower(), arg.strip()
    if name == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise BenchError(f"partition {spec!r}: alpha must be a number > 0, e.g. dirichlet:0.5") from None
        if not (alpha > 0 and math.isfinite(alpha)):  # `not >` so NaN is rejected too
            raise BenchError(f"partition {spec!r}: alpha must be > 0 (and finite), e.g. dirichlet:0.5")
        return "dirichlet", alpha
    if name == "shards":
        try:
            k = int(arg)
        except ValueError:
            raise BenchError(f"partition {spec!r}: K must be a whole number >= 1, e.g. shards:2") from None
        if k < 1:
            raise BenchError(f"partition {spec!r}: K must be >= 1 shard per client, e.g. shards:2")
        return "shards", k
    if name == "natural":
        if sep:
            raise BenchError(f"partition {spec!r}: natural takes no argument; write natural")
        return "natural", None
    raise BenchError(f"unknown partition {name!r} (in {spec!r}); choose from {', '.join(PARTITIONS)}")


def canonical(spec: str) -> str:
    """One spelling per partition (`Dirichlet: 0.50` -> `dirichlet:0.5`), so equal specs share a cache entry."""
    name, param = parse_partition(spec)
    return name if param is None else f"{name}:{param!r}"


def centralised_spec(dataset: str, spec: str | None, default: str) -> str:
    """The canonical spec for a centralised dataset (`default` when unset); `natural` is an error.

    Loaders call it before reading their files, so a bad spec costs no I/O."""
    spec = canonical(spec or default)
    if spec == "natural":
        raise BenchError(
            f"dataset {dataset!r} has no natural client split (it is one train and one test pool); "
            "use --partition dirichlet:ALPHA or shards:K"
        )
    return spec


def require_natural(dataset: str, spec: str | None) -> None:
    """For datasets whose clients are given (synthetic users, npz clients): only `natural` (or unset)."""
    if spec is None or parse_partition(spec)[0] == "natural":  # a malformed spec gets its own message
        return
    raise BenchError(
        f"dataset {dataset!r} has its own client split; partition must be natural (or left out), got {spec!r}"
    )


# -- partitioners ---------------------------------------------------------------------------------

def partition(labels_train, labels_test, n_clients: int, spec: str, rng: np.random.Generator) -> Parts:
    """Split the train and test pools over `n_clients` clients by `spec` (see the module docstring)."""
    kind, param = parse_partition(spec)
    y_tr = _labels(labels_train, "train")
    y_te = _labels(labels_test, "test")
    if isinstance(n_clients, bool) or not isinstance(n_clients, (int, np.integer)) or n_clients < 1:
        raise BenchError(f"clients must be a whole number >= 1, got {n_clients!r}")
    n_clients = int(n_clients)
    if kind == "natural":
        raise BenchError(
            "partition 'natural' needs a dataset with its own clients (synthetic, npz, shakespeare, femnist); "
            "this one is centralised: use dirichlet:ALPHA or shards:K"
        )
    if n_clients > len(y_tr):
        raise BenchError(f"clients={n_clients} but the train set has only {len(y_tr)} samples; use fewer clients")
    assert param is not None  # dirichlet and shards always carry one (parse_partition)
    if kind == "dirichlet":
        train = _dirichlet(y_tr, n_clients, float(param), rng)
    else:
        train = _shards(y_tr, n_clients, int(param), rng)
    test = _test_like_train(y_tr, y_te, train, rng)
    return [(np.sort(tr).astype(np.int64), np.sort(te).astype(np.int64)) for tr, te in zip(train, test, strict=True)]


def _labels(y, which: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise BenchError(f"{which} labels must be a 1-D integer array, got dtype {y.dtype} shape {y.shape}")
    if len(y) and y.min() < 0:
        raise BenchError(f"{which} labels must be >= 0, got {int(y.min())}")
    return y.astype(np.int64, copy=False)


def _min_train(n: int, n_clients: int) -> int:
    return max(1, min(MIN_TRAIN, n // n_clients))


def _dirichlet(y: np.ndarray, n_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(y)
    pools = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    need = _min_train(len(y), n_clients)
    for _ in range(MAX_DRAWS):
        cuts = []
        sizes = np.zeros(n_clients, dtype=np.int64)
        for pool in pools:
            p = rng.dirichlet(np.full(n_clients, alpha))
            # floor(cumsum * n_c): nondecreasing, so client i gets pool[cut[i-1]:cut[i]]; the last
            # cut is n_c exactly (cumsum ends at 1 up to rounding), so no sample is left over.
            cut = np.minimum((np.cumsum(p) * len(pool)).astype(np.int64), len(pool))
            cut[-1] = len(pool)
            cuts.append(cut)
            sizes += np.diff(cut, prepend=0)
        if sizes.min() >= need:
            break
    else:
        raise BenchError(
            f"dirichlet:{alpha!r} over {n_clients} clients left some client with fewer than {need} train samples "
            f"in {MAX_DRAWS} draws; raise alpha or use fewer clients"
        )
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for pool, cut in zip(pools, cuts, strict=True):
        for i, chunk in enumerate(np.split(pool, cut[:-1])):
            parts[i].append(chunk)
    return [np.concatenate(p) for p in parts]


def _shards(y: np.ndarray, n_clients: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    n, total = len(y), n_clients * k
    if total > n:
        raise BenchError(
            f"shards:{k} with {n_clients} clients needs {total} shards but the train set has only {n} samples; "
            "use fewer clients or fewer shards"
        )
    classes, counts = np.unique(y, return_counts=True)
    if total < len(classes):
        raise BenchError(
            f"shards:{k} with {n_clients} clients makes {total} shards, fewer than the {len(classes)} classes, "
            "so some samples would belong to no client; use more clients or a larger K"
        )
    per_class = _largest_remainder(total * counts / n, total)
    # A class smaller than one shard rounds to 0 shards; it takes one from the class with most.
    for c in np.flatnonzero(per_class == 0):
        per_class[int(np.argmax(per_class))] -= 1
        per_class[c] = 1
    shards = []
    for c, s in zip(classes, per_class, strict=True):
        # array_split: the first (n_c mod s) shards of this class get one extra sample.
        shards += np.array_split(rng.permutation(np.flatnonzero(y == c)), int(s))
    order = rng.permutation(total)
    return [np.concatenate([shards[j] for j in order[i * k:(i + 1) * k]]) for i in range(n_clients)]


def _largest_remainder(quota: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to `total`, floor(quota) plus one for the largest fractional parts (ties: lower index)."""
    base = np.floor(quota).astype(np.int64)
    short = int(total - base.sum())
    if short > 0:
        base[np.argsort(-(quota - base), kind="stable")[:short]] += 1
    return base


def _test_like_train(y_tr: np.ndarray, y_te: np.ndarray, train: list[np.ndarray], rng) -> list[np.ndarray]:
    n_clients = len(train)
    n_classes = int(max(y_tr.max(initial=-1), y_te.max(initial=-1))) + 1
    counts = np.stack([np.bincount(y_tr[t], minlength=n_classes) for t in train])  # (clients, classes)
    by_class: dict[int, list[np.ndarray]] = {}
    for c in range(n_classes):
        held = counts[:, c]
        pool = np.flatnonzero(y_te == c)
        if held.sum() == 0 or len(pool) == 0:
            continue  # no client trains on c (or no test sample of c): nothing to evaluate it on
        pool = rng.permutation(pool)
        take = _largest_remainder(len(pool) * held / held.sum(), len(pool))
        by_class[c] = np.split(pool, np.cumsum(take)[:-1])
    test = [[by_class[c][i] for c in sorted(by_class)] for i in range(n_clients)]
    for i in range(n_clients):
        if sum(len(a) for a in test[i]) == 0:
            _give_one_test_sample(i, counts, by_class, test)
    return [np.concatenate(t) if t else np.zeros(0, np.int64) for t in test]


def _give_one_test_sample(i: int, counts, by_class, test) -> None:
    order = sorted(by_class)
    for c in sorted((c for c in order if counts[i, c] > 0), key=lambda c: (-counts[i, c], c)):
        sizes = [len(test[j][order.index(c)]) for j in range(len(test))]
        donor = int(np.argmax(sizes))  # lowest id among the largest
        if sizes[donor] >= 2:
            pos = order.index(c)
            test[i][pos] = test[donor][pos][-1:]
            test[donor][pos] = test[donor][pos][:-1]
            return
    raise BenchError(
        f"client {i} trains on classes no other client can spare a test sample of; "
        "use fewer clients or a partition with larger clients"
    )


# -- cached entry point and the centralised -> federated step -------------------------------------

def cached_partition(labels_train, labels_test, n_clients: int, spec: str, seed: int) -> tuple[Parts, str]:
    """`partition(...)` with rng = the seed's `data` stream, through the on-disk cache.

    Returns (parts, digest): digest is the first 16 hex digits of the sha256 over every index array
    (datasets/cache.py `parts_digest`), the partition's fingerprint.
    """
    from fedeq_bench.datasets import cache

    spec = canonical(spec)
    key = cache.partition_key(labels_train, labels_test, n_clients, spec, seed, VERSION)
    hit = cache.load_partition(key)
    if hit is not None and len(hit) == n_clients:
        return hit, cache.parts_digest(hit)
    parts = partition(labels_train, labels_test, n_clients, spec, numpy_rng(seed, "data"))
    cache.save_partition(key, parts)
    return parts, cache.parts_digest(parts)


def federate(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    args,
    default_partition: str,
    default_clients: int,
    to_float: Callable[[np.ndarray], np.ndarray],
    default_models: dict[str, str],
    note: str = "",
):
    """A centralised dataset -> `FederatedDataset`: partition (cached), then `build_federated`.

    `note` (e.g. `subset=0.25`) goes into the partition's label, which runs record and reports show.

    `to_float` maps a stored batch (e.g. uint8 images) to float32 features; it is applied per client,
    so the whole pool is never held as float32 twice.
    """
    from fedeq_bench.datasets.base import build_federated

    spec = centralised_spec(name, args.partition, default_partition)
    n_clients = default_clients if args.clients is None else args.clients
    (tx, ty), (sx, sy) = train, test
    parts, digest = cached_partition(ty, sy, n_clients, spec, args.seed)
    raw = [(to_float(tx[tr]), ty[tr], to_float(sx[te]), sy[te]) for tr, te in parts]
    label = f"{spec}(clients={n_clients},seed={args.seed},{note + ',' if note else ''}sha256={digest})"
    return build_federated(name, raw, num_classes, args, partition=label, default_models=default_models)
