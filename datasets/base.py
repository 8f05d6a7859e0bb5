"""The one shape every federated dataset takes, and the steps every loader shares.

A loader returns per-client (train_x, train_y, test_x, test_y) arrays; `build_federated` carves the
per-client validation split, picks the unseen (held-out) clients and fingerprints the result, so
these steps are identical for every dataset. `get_dataset` then checks every loader's output in one
place (`check_dataset`): labels a model can use, matching lengths, no empty split, finite features.
A loader may also register a cheap `estimate` of the memory its data will take, which bench/experiment/sizing.py
compares with the memory available before anything is generated or read. Arrays are numpy so Ray's
object store holds them zero-copy; the engine turns one client's arrays into tensors where that
client is trained.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from fedeq_bench.core.errors import BenchError, unknown
from fedeq_bench.core.files import require_dir
from fedeq_bench.core.registry import Registry
from fedeq_bench.core.seeding import numpy_rng

UNSEEN_PICKS = ("random", "last")


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
    unseen_pick: str = "random"
    """Which clients are held out: `random` (stream `unseen`) or `last`, the round(frac_unseen * n)
    highest client ids, as the FeDEQ reference holds out its last client indices (trainers/base.py)."""
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
class DataEstimate:
    """What a dataset will hold once loaded, estimated without generating or reading its samples."""

    clients: int
    samples: int
    """Samples over every client and split."""
    bytes: int
    """Bytes of every client's arrays as FederatedDataset holds them (float32 x, int64 y)."""
    input_shape: tuple[int, ...] | None = None
    """Per-sample feature shape, where known before loading (sizes the models' client states)."""
    num_classes: int | None = None
    default_models: dict[str, str] | None = None
    """The dataset's model pairing (as FederatedDataset.default_models), where known before loading."""


# (its config dataclass instance, DataArgs) -> DataEstimate, or None where it cannot tell cheaply.
Estimator = Callable[..., "DataEstimate | None"]


@dataclass(frozen=True)
class DatasetEntry:
    loader: Loader
    config: type
    """The dataclass of the dataset's own options (`--set synthetic.alpha=1`)."""
    estimate: Estimator | None = None
    """Cheap size estimate before loading (see `estimate_dataset`); None: none is made."""


DATASETS: Registry[DatasetEntry] = Registry("dataset")


def register_dataset(name: str, config: type, estimate: Estimator | None = None):
    """Register `loader(cfg, args) -> FederatedDataset` under `name` with its config dataclass, and
    optionally `estimate(cfg, args) -> DataEstimate | None`, which must be cheap (no samples made)."""

    def deco(loader: Loader) -> Loader:
        DATASETS.register(name)(DatasetEntry(loader, config, estimate))
        return loader

    return deco


def split_dataset_name(spec: str) -> tuple[str, str | None]:
    """`npz:/data/x.npz` -> ("npz", "/data/x.npz"); `synthetic` -> ("synthetic", None)."""
    if ":" in spec:
        name, arg = spec.split(":", 1)
        return name, arg
    return spec, None


def _entry_and_config(spec: str, cfg, args: DataArgs):
    name, arg = split_dataset_name(spec)
    entry = DATASETS.get(name)
    if arg is not None:
        if not hasattr(cfg, "path"):
            raise BenchError(f"dataset {name!r} takes no ':' argument (got {spec!r})")
        cfg = dataclasses.replace(cfg, path=arg)
    if args.data_dir and os.path.lexists(os.path.expanduser(args.data_dir)):
        # A file, or a folder that cannot be listed, is one line here. A --data-dir that does not exist
        # yet is where downloads go; a loader that finds nothing names it among the places it looked.
        require_dir(os.path.expanduser(args.data_dir), "--data-dir",
                    "a folder holding the dataset's files (or where downloads go)")
    return entry, cfg


def get_dataset(spec: str, cfg, args: DataArgs) -> FederatedDataset:
    """Load dataset `spec` (a registered name, or `name:ARG` such as `npz:PATH`), checked by
    `check_dataset` whichever loader made it."""
    entry, cfg = _entry_and_config(spec, cfg, args)
    ds = entry.loader(cfg, args)
    check_dataset(ds)
    return ds


def estimate_dataset(spec: str, cfg, args: DataArgs) -> DataEstimate | None:
    """The dataset's own cheap estimate of its size (None where it registered none or cannot tell)."""
    entry, cfg = _entry_and_config(spec, cfg, args)
    return entry.estimate(cfg, args) if entry.estimate is not None else None


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
        # Checked before the casts below, which would turn label 1.5 into 1 and "a" into an error, and
        # before the carve, which indexes x by y's length (a longer x would lose rows silently).
        for split, x, y in (("train", tx, ty), ("test", sx, sy)):
            _check_raw(name, cid, split, np.asarray(x), np.asarray(y))
        with np.errstate(over="ignore"):  # 1e300 becomes inf here; check_dataset names it
            tx = np.ascontiguousarray(tx, dtype=np.float32)
            sx = np.ascontiguousarray(sx, dtype=np.float32)
        ty = np.ascontiguousarray(ty, dtype=np.int64)
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
    if n == 0:
        raise BenchError(f"{name}: the loader produced no clients; a federated dataset needs at least one")
    n_unseen = int(round(args.frac_unseen * n))
    if n_unseen >= n:
        raise BenchError(f"frac_unseen={args.frac_unseen} leaves no training client among {n}")
    if args.unseen_pick == "last":
        unseen = tuple(range(n - n_unseen, n))
    elif args.unseen_pick == "random":
        unseen = tuple(sorted(int(c) for c in numpy_rng(args.seed, "unseen").permutation(n)[:n_unseen]))
    else:
        raise unknown("unseen_pick", args.unseen_pick, UNSEEN_PICKS)
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


def _check_raw(name: str, cid: int, split: str, x: np.ndarray, y: np.ndarray) -> None:
    """One label per sample, features a float32 model can take and labels that are whole numbers,
    before any cast."""
    if y.ndim < 1 or x.ndim < 1 or x.shape[0] != y.shape[0]:
        raise BenchError(f"{name}: client {cid} {split}_x has shape {x.shape} but {split}_y has shape {y.shape}; "
                         "one label (row) per sample: lengths must match")
    if x.dtype.kind not in "biuf":
        raise BenchError(f"{name}: client {cid} {split}_x has dtype {x.dtype}; "
                         "features must be numbers (integer or float)")
    if y.dtype.kind in "biu":
        return
    if y.dtype.kind != "f":
        raise BenchError(f"{name}: client {cid} {split}_y has dtype {y.dtype}; "
                         "labels must be integers 0..num_classes-1")
    frac = ~np.isfinite(y) | (y != np.round(y)) if y.size else np.zeros(0, dtype=bool)
    if frac.any():
        raise BenchError(f"{name}: client {cid} {split}_y has label {float(y[frac].flat[0])}, not a whole number; "
                         "labels must be integers 0..num_classes-1 (class ids, not regression targets)")


def check_dataset(ds: FederatedDataset) -> None:
    """What every model needs of every client, whichever loader made the dataset: x float32 and y
    int64 with one label per sample (len(x) == len(y)), one per-sample shape for all clients, labels
    in [0, num_classes), finite features (float32: beyond 3.4e38 is inf), and at least one train and
    one test sample per client. One BenchError line naming the client and the array otherwise; it
    runs before a backend starts or anything is recorded (a NaN feature would otherwise train
    silently to chance accuracy, a label >= num_classes fail in round 1, an empty client divide 0/0)."""
    if not ds.clients:
        raise BenchError(f"{ds.name}: no clients; a federated dataset needs at least one")
    if ds.num_classes < 1:
        raise BenchError(f"{ds.name}: num_classes is {ds.num_classes}; it must be >= 1")
    first = ds.clients[0]
    x_shape, y_shape = tuple(first.train_x.shape[1:]), tuple(first.train_y.shape[1:])
    for cid, c in enumerate(ds.clients):
        for split in ("train", "val", "test"):
            x, y = getattr(c, f"{split}_x"), getattr(c, f"{split}_y")
            where = f"{ds.name}: client {cid} {split}"
            if x.dtype != np.float32 or y.dtype != np.int64:
                raise BenchError(f"{where}: arrays are {x.dtype} / {y.dtype}; a loader must give float32 x and int64 y "
                                 "(build_federated converts them)")
            if y.ndim < 1 or x.ndim < 1 or x.shape[0] != y.shape[0]:
                raise BenchError(f"{where}_x has shape {x.shape} but {split}_y has shape {y.shape}; "
                                 "one label (row) per sample: lengths must match")
            if tuple(x.shape[1:]) != x_shape:
                raise BenchError(f"{where}_x has per-sample shape {tuple(x.shape[1:])} but client 0 train_x has "
                                 f"{x_shape}; every client must share one feature shape")
            if tuple(y.shape[1:]) != y_shape:
                raise BenchError(f"{where}_y has per-sample label shape {tuple(y.shape[1:])} but client 0 train_y has "
                                 f"{y_shape}; every client must share one label shape")
            if y.size:
                lo, hi = int(y.min()), int(y.max())
                if lo < 0 or hi >= ds.num_classes:
                    bad = lo if lo < 0 else hi
                    raise BenchError(f"{where}_y has label {bad}; labels must be in [0, {ds.num_classes}) "
                                     f"(num_classes={ds.num_classes})")
            if x.size and not np.isfinite(x).all():
                bad = int((~np.isfinite(x)).sum())
                raise BenchError(f"{where}_x has {bad} non-finite feature value(s) (NaN, inf, or beyond float32's "
                                 "3.4e38); features must be finite: clean or scale them")
        for split in ("train", "test"):
            if getattr(c, f"{split}_y").shape[0] == 0:
                raise BenchError(f"{ds.name}: client {cid} has no {split} samples; every client needs at least one "
                                 f"train and one test sample (an empty {split} split cannot be "
                                 f"{'trained on' if split == 'train' else 'scored'})")


def fingerprint(ds: FederatedDataset) -> str:
    """sha256 over shapes, dtypes and bytes of every array, in client order (first 16 hex digits)."""
    h = hashlib.sha256()
    h.update(f"{ds.name}|{ds.num_classes}|{ds.unseen}".encode())
    for c in ds.clients:
        for a in (c.train_x, c.train_y, c.val_x, c.val_y, c.test_x, c.test_y):
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]
