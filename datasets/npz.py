"""`npz:PATH`: bring your own federated partition as one numpy .npz file.

The file holds, for every client k = 0..N-1 (contiguous from 0):

    train_x_k  (n_k, *F)  features, any integer or float dtype (stored as float32)
    train_y_k  (n_k,)     labels, any integer dtype, in [0, num_classes)
    test_x_k   (m_k, *F)  F, the per-sample feature shape, is the same for every array
    test_y_k   (m_k,)

and optionally a scalar integer `num_classes` (otherwise max label + 1 over all clients' train and
test labels). It is read with allow_pickle=False, so an npz file cannot run code. Write one with

    np.savez(path, num_classes=10, train_x_0=..., train_y_0=..., test_x_0=..., test_y_0=..., ...)

`build_federated` then carves each client's validation split from its train arrays and picks the
unseen clients exactly as for every other dataset. Per-sample shape (C, H, W) pairs with the `cnn`
baseline, anything else with `mlp`; FeDEQ uses `deq_mlp` either way.
"""
from __future__ import annotations

import os
import re
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.files import decode_error, one_line, open_input, require_file
from fedeq_bench.datasets.base import DataArgs, DataEstimate, FederatedDataset, build_federated, register_dataset
from fedeq_bench.datasets.partition import require_natural

_SPLITS = ("train_x", "train_y", "test_x", "test_y")
# Canonical client indices only ("0", "17", not "007"), so a key names exactly one client.
_KEY = re.compile(r"^(train_x|train_y|test_x|test_y)_(0|[1-9][0-9]*)$")


@dataclass(frozen=True)
class NpzConfig:
    """Options of the `npz` dataset; usually given as `--dataset npz:PATH`."""

    path: str = ""
    """The .npz file with train_x_k, train_y_k, test_x_k, test_y_k for clients k = 0..N-1 (and an
    optional scalar num_classes). A relative path is looked up in DataArgs.data_dir first."""


EXPECTED = "a .npz archive written by np.savez (train_x_k, train_y_k, test_x_k, test_y_k)"


def _resolve(path: str, data_dir: str | None) -> str:
    path = os.path.expanduser(path)
    if data_dir and not os.path.isabs(path):
        candidate = os.path.join(os.path.expanduser(data_dir), path)
        if os.path.exists(candidate):
            return require_file(candidate, "npz dataset", EXPECTED)
    if not os.path.lexists(path):
        where = f" (also looked in data_dir {data_dir!r})" if data_dir and not os.path.isabs(path) else ""
        raise BenchError(f"npz dataset file not found: {path!r}{where}")
    return require_file(path, "npz dataset", EXPECTED)  # a folder, a broken link, a device: one line each


def _not_npz(path: str, e: BaseException) -> BenchError:
    return BenchError(f"npz dataset {path!r} is not a valid .npz archive ({type(e).__name__}: {one_line(e)})")


def _read_all(path: str) -> dict[str, np.ndarray]:
    """Every array of the archive, read eagerly (so the file is closed before returning). Opened by
    core/files.py's one reader: a pipe never blocks, a device is never read (one line each)."""
    with open_input(path, "npz dataset", EXPECTED) as f:
        try:
            loaded = np.load(f, allow_pickle=False)
        except OSError as e:
            if e.errno is not None:  # the system's: permission denied, an I/O error
                raise decode_error(e, path, "npz dataset", EXPECTED) from None
            raise _not_npz(path, e) from None
        except (ValueError, EOFError, zipfile.BadZipFile) as e:
            raise _not_npz(path, e) from None
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            # np.load also reads a bare .npy file; that holds one array, not a partition.
            raise BenchError(f"npz dataset {path!r} is a single .npy array, not an .npz archive "
                             "(write it with np.savez)")
        with loaded:
            arrays = {}
            for key in loaded.files:
                try:
                    arrays[key] = loaded[key]
                except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                    # allow_pickle=False refuses object arrays here; a truncated member fails here too.
                    raise BenchError(f"npz dataset {path!r}: cannot read array {key!r} "
                                     f"({type(e).__name__}: {one_line(e)})") from None
    return arrays


def _client_count(arrays: dict[str, np.ndarray], path: str) -> int:
    ids: set[int] = set()
    unexpected = []
    for key in arrays:
        m = _KEY.match(key)
        if m:
            ids.add(int(m.group(2)))
        elif key != "num_classes":
            unexpected.append(key)
    if unexpected:
        # Ignoring them would hide typos such as `train_X_0` or `train_x_01`.
        raise BenchError(
            f"npz dataset {path!r}: unexpected keys {sorted(unexpected)}; "
            "expected train_x_k, train_y_k, test_x_k, test_y_k (k = 0..N-1) and optional num_classes"
        )
    if not ids:
        raise BenchError(
            f"npz dataset {path!r} has no client arrays; expected train_x_k, train_y_k, test_x_k, test_y_k for k = 0..N-1"
        )
    n = max(ids) + 1
    for k in range(n):
        for split in _SPLITS:
            if f"{split}_{k}" not in arrays:
                raise BenchError(f"npz dataset {path!r}: missing key {split}_{k} (clients must be numbered 0..{n - 1})")
    return n


def _check_client(arrays: dict[str, np.ndarray], k: int, path: str) -> None:
    for part in ("train", "test"):
        x, y = arrays[f"{part}_x_{k}"], arrays[f"{part}_y_{k}"]
        xk, yk = f"{part}_x_{k}", f"{part}_y_{k}"
        if x.dtype.kind not in "biuf":
            raise BenchError(f"npz dataset {path!r}: {xk} has dtype {x.dtype}; features must be integer or float")
        if x.ndim < 2:
            raise BenchError(f"npz dataset {path!r}: {xk} has shape {x.shape}; expected (samples, features...)")
        if y.ndim != 1:
            raise BenchError(f"npz dataset {path!r}: {yk} has shape {y.shape}; labels must be 1-D (samples,)")
        if y.dtype.kind not in "iu":
            raise BenchError(f"npz dataset {path!r}: {yk} has dtype {y.dtype}; labels must be an integer dtype")
        if x.shape[0] != y.shape[0]:
            raise BenchError(
                f"npz dataset {path!r}: {xk} has {x.shape[0]} samples but {yk} has {y.shape[0]}; lengths must match"
            )
        if y.shape[0] == 0:
            # An empty train split cannot be trained on; an empty test split makes accuracy 0/0.
            raise BenchError(f"npz dataset {path!r}: client {k} has no {part} samples; every split needs at least one")
        if y.min() < 0:
            raise BenchError(f"npz dataset {path!r}: {yk} has negative label {int(y.min())}; labels must be >= 0")
        if x.dtype.kind == "f":
            _check_finite(x, xk, k, path)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_finite(x: np.ndarray, key: str, k: int, path: str) -> None:
    """Features the models can train on: finite, and within float32 (they train in float32, where
    1e300 becomes inf). A NaN or inf feature otherwise trains silently to chance accuracy."""
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(np.argwhere(bad)[0])
        raise BenchError(f"npz dataset {path!r}: {key} (client {k}) has {int(bad.sum())} non-finite feature "
                         f"value(s), the first in sample {first[0]} ({x[first]}); features must be finite")
    big = float(np.abs(x).max())
    if big > FLOAT32_MAX:
        raise BenchError(f"npz dataset {path!r}: {key} (client {k}) has a feature of magnitude {big:.3g}, beyond "
                         f"float32's {FLOAT32_MAX:.3g}; the models train in float32, so scale the features")


def _num_classes(arrays: dict[str, np.ndarray], n: int, path: str) -> int:
    top = max(int(arrays[f"{p}_y_{k}"].max()) for k in range(n) for p in ("train", "test"))
    if "num_classes" not in arrays:
        return top + 1
    given = arrays["num_classes"]
    if given.ndim != 0 or given.dtype.kind not in "iu":
        raise BenchError(f"npz dataset {path!r}: num_classes must be a scalar integer, "
                         f"got dtype {given.dtype} shape {given.shape}")
    nc = int(given)
    if nc < 1:
        raise BenchError(f"npz dataset {path!r}: num_classes must be >= 1, got {nc}")
    if top >= nc:
        for k in range(n):
            for p in ("train", "test"):
                if int(arrays[f"{p}_y_{k}"].max()) >= nc:
                    raise BenchError(
                        f"npz dataset {path!r}: {p}_y_{k} has label {int(arrays[f'{p}_y_{k}'].max())} "
                        f">= num_classes={nc}; labels must be in [0, {nc})"
                    )
    return nc


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def estimate_npz(cfg: NpzConfig, args: DataArgs) -> DataEstimate | None:
    """Bytes the clients' arrays will take (x as float32, y as int64), from the archive's npy headers
    alone (a few hundred bytes per array, no array read); None when the file cannot tell (the loader
    then says what is wrong with it)."""
    if not cfg.path:
        return None
    try:
        path = _resolve(cfg.path, args.data_dir)
        samples, nbytes, clients = 0, 0, set()
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                m = _KEY.match(info.filename.removesuffix(".npy"))
                if not m:
                    continue
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = _HEADER_READERS.get(version)
                    if read_header is None:
                        return None
                    shape, _, _ = read_header(f)
                n = int(np.prod(shape, dtype=np.int64))
                nbytes += n * (4 if m.group(1).endswith("_x") else 8)
                if m.group(1).endswith("_y"):
                    samples += int(shape[0]) if shape else 0
                clients.add(int(m.group(2)))
    except (BenchError, OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error):
        return None
    used = len(clients) if args.clients is None else min(int(args.clients), len(clients))
    if not clients or used < 1:
        return None
    scale = used / len(clients)  # the first `used` clients; their share of the bytes, roughly
    return DataEstimate(clients=used, samples=int(samples * scale), bytes=int(nbytes * scale))


@register_dataset("npz", NpzConfig, estimate=estimate_npz)
def load_npz(cfg: NpzConfig, args: DataArgs) -> FederatedDataset:
    """Clients 0..N-1 of `cfg.path` (the first `args.clients` of them when that is given)."""
    require_natural("npz", args.partition)  # the file's clients are the split
    if not cfg.path:
        raise BenchError("npz dataset needs a path: --dataset npz:PATH")
    path = _resolve(cfg.path, args.data_dir)
    arrays = _read_all(path)
    n = _client_count(arrays, path)
    for k in range(n):
        _check_client(arrays, k, path)
    # Every client, used or not, must agree on the feature shape and the label range, so that
    # num_classes (and hence the model's output size) does not depend on args.clients.
    feat = arrays["train_x_0"].shape[1:]
    for k in range(n):
        for p in ("train", "test"):
            shape = arrays[f"{p}_x_{k}"].shape[1:]
            if shape != feat:
                raise BenchError(
                    f"npz dataset {path!r}: {p}_x_{k} has per-sample shape {shape} but train_x_0 has {feat}; "
                    "all clients must share one feature shape"
                )
    num_classes = _num_classes(arrays, n, path)
    used = n
    if args.clients is not None:
        if not 1 <= args.clients <= n:
            raise BenchError(f"npz dataset {path!r} has {n} clients; clients must be in 1..{n}, got {args.clients}")
        used = int(args.clients)
    raw = [
        (arrays[f"train_x_{k}"], arrays[f"train_y_{k}"], arrays[f"test_x_{k}"], arrays[f"test_y_{k}"])
        for k in range(used)
    ]
    explicit = "cnn" if len(feat) == 3 else "mlp"
    return build_federated(
        "npz",
        raw,
        num_classes,
        args,
        partition=f"npz({os.path.basename(path)})",
        default_models={"explicit": explicit, "deq": "deq_mlp"},
    )
