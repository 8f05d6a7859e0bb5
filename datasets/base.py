"""The one shape every federated dataset takes, and the steps every loader shares.

A loader returns per-client (train_x, train_y, test_x, test_y) arrays; `build_federated` carves the
per-client validation split, picks the unseen (held-out) clients and fingerprints the result, so
these steps are identical for every dataset. Arrays are numpy so Ray's object store holds them
zero-copy; the engine turns one client's arrays into tensors where that client is trained.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.registry import Registry
from fedeq_bench.core.seeding import numpy_rng


@dataclass(frozen=True)
class DataArgs:
    """What every loader receives besides its own config section."""

    seed: int
    """The run seed; loaders draw from its `data` stream."""
    clients: int | None = None
    """Number of clients; None: the dataset's own default (30 for synthetic, all for npz)."""
    partition: str | None = None
    """`dirichlet:ALPHA`, `shards:K` or `natural` (datasets/partition.py); None: the dataset's default."""
    val_frac: float = 0.1
    """Fraction of each client's training samples carved off as its validation split."""
    frac_unseen: float = 0.0
    """Fraction of clients held out of training, personalized after training (`acc/unseen`)."""
    data_dir: str | None = None
    """Where file-based datasets look first."""


@dataclass
class ClientData:
    """One client's splits. x: float32 features/images; y: int64 labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])


@dataclass
class FederatedDataset:
    name: str
    clients: list[ClientData]
    """Indexed by client id."""
    num_classes: int
    input_shape: tuple[int, ...]
    unseen: tuple[int, ...] = ()
    """Client ids held out of training."""
    fingerprint: str = ""
    """sha256 over every client's arrays: two runs with the same fingerprint saw the same data."""
    partition: str = ""
    """How clients were formed, e.g. `synthetic(alpha=0.5,beta=0.5)` or `npz`."""
    default_models: dict[str, str] = field(default_factory=lambda: {"explicit": "mlp", "deq": "deq_mlp"})
    """Model pairing: `explicit` for the baselines, `deq` for FeDEQ."""

    @property
    def train_ids(self) -> list[int]:
        held = set(self.unseen)
        return [c for c in range(len(self.clients)) if c not in held]


# A loader: (its config dataclass instance, DataArgs) -> FederatedDataset.
Loader = Callable[..., FederatedDataset]


@dataclass(frozen=True)
class DatasetEntry:
    loader: Loader
    config: type
    """The dataclass of the dataset's own options (`--set synthetic.alpha=1`)."""


DATASETS: Registry[DatasetEntry] = Registry("dataset")


def register_dataset(name: str, config: type):
    """Register `loader(cfg, args) -> FederatedDataset` under `name` with its config dataclass."""

    def deco(loader: Loader) -> Loader:
        DATASETS.register(name)(DatasetEntry(loader, config))
        return loader

    return deco


def dataset_names() -> list[str]:
    return DATASETS.names()


def split_dataset_name(spec: str) -> tuple[str, str | None]:
    """`npz:/data/x.npz` -> ("npz", "/data/x.npz"); `synthetic` -> ("synthetic", None)."""
    if ":" in spec:
        name, arg = spec.split(":", 1)
        return name, arg
    return spec, None


def get_dataset(spec: str, cfg, args: DataArgs) -> FederatedDataset:
    """Load dataset `spec` (a registered name, or `name:ARG` such as `npz:PATH`)."""
    name, arg = split_dataset_name(spec)
    entry = DATASETS.get(name)
    if arg is not None:
        if not hasattr(cfg, "path"):
            raise BenchError(f"dataset {name!r} takes no ':' argument (got {spec!r})")
        cfg = dataclasses.replace(cfg, path=arg)
    return entry.loader(cfg, args)


def build_federated(
    name: str,
    raw: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    num_classes: int,
    args: DataArgs,
    partition: str,
    default_models: dict[str, str] | None = None,
) -> FederatedDataset:
    """Per-client (train_x, train_y, test_x, test_y) -> FederatedDataset with val split and unseen set.

    `raw` is read once, in client order: a generator (datasets/synthetic.py) need not hold every
    client's arrays at once while they are copied."""
    if not 0.0 <= args.val_frac < 1.0:
        raise BenchError(f"val_frac must be in [0, 1), got {args.val_frac}")
    if not 0.0 <= args.frac_unseen < 1.0:
        raise BenchError(f"frac_unseen must be in [0, 1), got {args.frac_unseen}")
    clients = []
    for cid, (tx, ty, sx, sy) in enumerate(raw):
        tx = np.ascontiguousarray(tx, dtype=np.float32)
        ty = np.ascontiguousarray(ty, dtype=np.int64)
        sx = np.ascontiguousarray(sx, dtype=np.float32)
        sy = np.ascontiguousarray(sy, dtype=np.int64)
        # Validation is carved from training data only, so test never informs a choice.
        perm = numpy_rng(args.seed, "split", cid).permutation(len(ty))
        n_val = int(round(args.val_frac * len(ty)))
        if args.val_frac > 0 and len(ty) >= 2:
            n_val = min(max(n_val, 1), len(ty) - 1)  # keep at least one sample on each side
        else:
            n_val = 0
        val_idx, tr_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        clients.append(ClientData(tx[tr_idx], ty[tr_idx], tx[val_idx], ty[val_idx], sx, sy))
    n = len(clients)
    n_unseen = int(round(args.frac_unseen * n))
    if n_unseen >= n:
        raise BenchError(f"frac_unseen={args.frac_unseen} leaves no training client among {n}")
    unseen = tuple(sorted(int(c) for c in numpy_rng(args.seed, "unseen").permutation(n)[:n_unseen]))
    input_shape = tuple(int(d) for d in clients[0].train_x.shape[1:])
    ds = FederatedDataset(
        name=name,
        clients=clients,
        num_classes=int(num_classes),
        input_shape=input_shape,
        unseen=unseen,
        partition=partition,
        default_models=dict(default_models or {"explicit": "mlp", "deq": "deq_mlp"}),
    )
    ds.fingerprint = fingerprint(ds)
    return ds


def fingerprint(ds: FederatedDataset) -> str:
    """sha256 over shapes, dtypes and bytes of every array, in client order (first 16 hex digits)."""
    h = hashlib.sha256()
    h.update(f"{ds.name}|{ds.num_classes}|{ds.unseen}".encode())
    for c in ds.clients:
        for a in (c.train_x, c.train_y, c.val_x, c.val_y, c.test_x, c.test_y):
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]
