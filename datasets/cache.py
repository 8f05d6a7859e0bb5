"""Files on disk: the partition cache, and verified downloads of dataset files.

Cache directory: `$BENCH_CACHE_DIR`, else `~/.cache/fedeq-bench`. Layout:

    partitions/<key>.npz   one partition: train_k, test_k (index arrays, k = 0..N-1), n_clients,
                           and sha256 (32 bytes over every index array, see `parts_digest`)
    data/                  where datasets are downloaded when neither --data-dir nor
                           $BENCH_DATA_DIR is set

<key> is the sha256 of everything the partition is a function of (`partition_key`): both label
arrays (dtype, shape, bytes), the number of clients, the canonical spec, the seed and the
partitioner's VERSION. Same arguments -> same file; any changed argument -> another file.

Every file is written to a temporary name in the same directory and moved into place with
os.replace (atomic on POSIX), so a crash or a full disk never leaves a half-written entry under
the final name. A cache entry that fails to read, or whose stored sha256 disagrees with its
arrays, is treated as a miss: the partition is recomputed and the entry rewritten. The cache is an
optimisation only: if it cannot be written (read-only home, full disk) the run goes on.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedeq_bench.core import outputs

log = logging.getLogger(__name__)

CACHE_ENV = "BENCH_CACHE_DIR"
DATA_ENV = "BENCH_DATA_DIR"
DOWNLOAD_TIMEOUT_S = 30
"""Seconds to wait for a download server before treating the network as unavailable."""


def cache_dir() -> Path:
    """`$BENCH_CACHE_DIR`, else `~/.cache/fedeq-bench` (not created here)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedeq-bench"


def data_dirs(data_dir: str | None) -> list[Path]:
    """Where file datasets are looked for, in order: --data-dir, $BENCH_DATA_DIR (each when set)."""
    out = []
    for d in (data_dir, os.environ.get(DATA_ENV)):
        if d:
            out.append(Path(d).expanduser())
    return out


def download_dir(data_dir: str | None) -> Path:
    """Where a download goes: the first of --data-dir, $BENCH_DATA_DIR, <cache dir>/data."""
    dirs = data_dirs(data_dir)
    return dirs[0] if dirs else cache_dir() / "data"


# -- partition cache ------------------------------------------------------------------------------

def _array_hash(h, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())


def partition_key(labels_train, labels_test, n_clients: int, spec: str, seed: int, version: int) -> str:
    """sha256 (hex) of everything a partition depends on."""
    h = hashlib.sha256()
    h.update(json.dumps({"clients": int(n_clients), "spec": spec, "seed": int(seed), "version": int(version)},
                        sort_keys=True).encode())
    for a in (labels_train, labels_test):
        _array_hash(h, np.asarray(a))
    return h.hexdigest()


def _parts_sha256(parts) -> bytes:
    h = hashlib.sha256()
    h.update(str(len(parts)).encode())
    for tr, te in parts:
        _array_hash(h, np.asarray(tr, dtype=np.int64))
        _array_hash(h, np.asarray(te, dtype=np.int64))
    return h.digest()


def parts_digest(parts) -> str:
    """The partition's fingerprint: first 16 hex digits of the sha256 over every index array."""
    return _parts_sha256(parts).hex()[:16]


def partition_path(key: str) -> Path:
    return cache_dir() / "partitions" / f"{key}.npz"


def load_partition(key: str):
    """The cached parts for `key`, or None when absent or corrupt (a corrupt entry is logged)."""
    path = partition_path(key)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            n = int(f["n_clients"])
            parts = [(f[f"train_{k}"], f[f"test_{k}"]) for k in range(n)]
            stored = bytes(f["sha256"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.warning("partition cache entry %s is unreadable (%s: %s); recomputing", path, type(e).__name__, e)
        return None
    if stored != _parts_sha256(parts) or any(a.dtype != np.int64 or a.ndim != 1 for p in parts for a in p):
        log.warning("partition cache entry %s fails its checksum; recomputing", path)
        return None
    return parts


def save_partition(key: str, parts) -> Path | None:
    """Write `parts` under `key` atomically; returns the path, or None if the cache is not writable."""
    arrays: dict[str, npt.ArrayLike] = {
        "n_clients": np.int64(len(parts)),
        "sha256": np.frombuffer(_parts_sha256(parts), dtype=np.uint8),
    }
    for k, (tr, te) in enumerate(parts):
        arrays[f"train_{k}"] = np.asarray(tr, dtype=np.int64)
        arrays[f"test_{k}"] = np.asarray(te, dtype=np.int64)
    path = partition_path(key)
    try:
        # mypy matches **arrays against every keyword of savez, its `allow_pickle: bool` included;
        # the names here are train_k, test_k, n_clients and sha256 only.
        atomic_write(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]
    except OSError as e:
        log.warning("cannot write partition cache %s (%s); continuing without it", path, e)
        return None
    return path


atomic_write = outputs.atomic_write
"""The atomic part of core/outputs.py's writer (temp file beside it, fsync, os.replace; a symbolic
link at the path is not replaced): internal files, not the user's, so no recognising, no `--force`."""


# -- downloads ------------------------------------------------------------------------------------

def file_digest(path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DownloadError(Exception):
    """The server could not be reached or the transfer broke off (the network, not the file)."""


def fetch(url: str, dest: Path, verify: Callable[[Path], None], timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download `url` to `dest`: stream into a temp file beside it, `verify(tmp)` (raises BenchError
    on a checksum mismatch), then os.replace. Nothing is left under `dest` unless it verified.

    Raises DownloadError when the network fails (the caller falls back to its how-to-get-it line).
    """
    dest = Path(dest)
    sys.stderr.write(f"downloading {url} -> {dest}\n")

    def write(f):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as e:  # ValueError: malformed URL
            raise DownloadError(f"{url}: {getattr(e, 'reason', e)}") from None

    atomic_write(dest, write, check=verify)
    return dest
