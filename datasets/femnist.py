"""`femnist`: LEAF's Federated EMNIST, 62 classes, one client per writer (the natural split).

Reference: S. Caldas et al., "LEAF: A Benchmark for Federated Settings", arXiv 1812.01097; code:
github.com/TalwalkarLab/leaf, `data/femnist/preprocess/data_to_json.py` (pixels and labels) and
`data/utils/split_data.py` (the per-writer split). FeDEQ (Le et al., CIKM 2024, arXiv 2309.15659)
trains ResNet-20 / DEQ-ResNet-S on it.

Input: LEAF's JSON output, read offline from a directory holding `train/*.json` and `test/*.json`
(`./preprocess.sh -s niid --sf 0.05 -k 0 -t sample`, the `--sf`-sampled split LEAF's models read),
taken as LEAF split it; or only `all_data/*.json` (`./preprocess.sh` stopped after its first
step), split here. Either directory may also be LEAF's `data/femnist/data` parent. Each file is

    {"users": [w, ...], "num_samples": [n_w, ...],
     "user_data": {w: {"x": [[784 floats], ...], "y": [label, ...]}}}

read in file-name order, a writer's entries merged in that order. Users in user_data but not in
users are ignored (LEAF's split_data writes empty entries for the writers it drops).

Pixels, as stored by data_to_json.py: each 128x128 NIST SD19 scan is converted to 8-bit grey
(`img.convert('L')`), thumbnailed to 28x28 and divided by 255, row-major. The scans are dark ink on
white paper, so the background is ~1.0 and the strokes are near 0.0: the reverse of MNIST. LEAF's
own reference models train on these values unchanged, and so does this loader by default, so
results stay comparable with LEAF-based papers; `invert=True` gives 1 - x (MNIST-like, ink high).
x is float32 of shape (1, 28, 28); values outside [0, 1] are rejected (e.g. 0..255 data).

Labels (data_to_json.py's relabel_class): 0-9 digits, 10-35 'A'-'Z', 36-61 'a'-'z'; anything
outside 0..61 is rejected. num_classes is always 62.

Split of an `all_data`-only directory, per writer in stored order (no shuffling: the order is the
writer's form order, so this is a split by time): n_train = max(1, int(train_frac * n)) (LEAF's
split_data arithmetic), the first n_train samples train, the rest test; writers with fewer than 2
samples are dropped, as LEAF's split_data drops them. With `DataArgs.clients = K` the clients are
the K writers with the most samples (ties by name), largest first; otherwise every writer, in that
order. `build_federated` then carves each client's validation split from its train samples.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.ranges import ranged
from fedeq_bench.datasets.base import DataArgs, FederatedDataset, build_federated, register_dataset
from fedeq_bench.datasets.leaf import find_source, leaf_layout, merge, rank_users, read_leaf_files, read_split
from fedeq_bench.datasets.partition import require_natural

NUM_CLASSES = 62
"""Digits, upper- and lower-case letters (LEAF's relabel_class)."""
SIDE = 28
"""Image side after LEAF's thumbnail; x has SIDE * SIDE = 784 values per sample."""
PIXELS = SIDE * SIDE

HOW_TO_GET = (
    "get LEAF's FEMNIST JSON (github.com/TalwalkarLab/leaf: cd data/femnist && ./preprocess.sh -s niid "
    "--sf 0.05 -k 0 -t sample) and pass its data directory with --dataset femnist:DIR, "
    "--set femnist.path=DIR or --data-dir DIR (which holds femnist/)"
)


@dataclass(frozen=True)
class FemnistConfig:
    """Options of the `femnist` dataset (`--dataset femnist:DIR`)."""

    path: str = ""
    """LEAF femnist data directory (train/ and test/, or all_data/; or their `data` parent); also
    `--dataset femnist:DIR`. Empty: look for `femnist/` in DataArgs.data_dir, then $BENCH_DATA_DIR.
    A relative path is looked up in DataArgs.data_dir first."""
    train_frac: float = ranged(0.8, gt=0, lt=1)
    """Fraction of each writer's samples (the first ones) in its training split when only
    all_data/ exists; raising it gives more training and fewer test samples. Must be in (0, 1)."""
    invert: bool = False
    """False: LEAF's stored values (white background 1.0, ink ~0.0), as LEAF's models use them.
    True: 1 - x (MNIST-like: background 0, ink high)."""


def _images(x: list, y: list, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One LEAF entry -> (float32 (m, 784) in [0, 1], int64 labels in 0..61), or a one-line error."""
    for i, row in enumerate(x):
        if not isinstance(row, list) or len(row) != PIXELS:
            got = f"length {len(row)}" if isinstance(row, list) else type(row).__name__
            raise BenchError(f"femnist: {where}: x[{i}] must be a list of {PIXELS} pixel values, got {got}")
    try:
        xs = np.asarray(x, dtype=np.float32).reshape(len(x), PIXELS)
    except (TypeError, ValueError):
        raise BenchError(f"femnist: {where}: x holds non-numeric pixel values") from None
    if xs.size and not (np.isfinite(xs).all() and xs.min() >= 0.0 and xs.max() <= 1.0):
        raise BenchError(f"femnist: {where}: pixel values must be in [0, 1] (LEAF stores grey / 255)")
    ys = np.asarray(y)
    if len(y) and (ys.dtype.kind not in "iu" or ys.ndim != 1):
        raise BenchError(f"femnist: {where}: labels must be integers, got {y[:3]!r}...")
    ys = ys.astype(np.int64).reshape(len(y))
    if len(y) and (ys.min() < 0 or ys.max() >= NUM_CLASSES):
        bad = int(ys[(ys < 0) | (ys >= NUM_CLASSES)][0])
        raise BenchError(f"femnist: {where}: label {bad} is out of range; FEMNIST labels are 0..{NUM_CLASSES - 1}")
    return xs, ys


def order_split(n: int, train_frac: float) -> int:
    """Train samples of a writer with n >= 2 samples: max(1, int(train_frac * n)) (LEAF's split_data)."""
    return max(1, int(train_frac * n))


@register_dataset("femnist", FemnistConfig)
def load_femnist(cfg: FemnistConfig, args: DataArgs) -> FederatedDataset:
    """One client per writer of a LEAF FEMNIST directory (see the module docstring)."""
    if not 0.0 < cfg.train_frac < 1.0:
        raise BenchError(f"femnist.train_frac must be in (0, 1), got {cfg.train_frac}")
    require_natural("femnist", args.partition)  # one client per writer: nothing to partition
    path = find_source(cfg.path, args, "femnist", ("femnist",), HOW_TO_GET)
    if not os.path.isdir(path):
        raise BenchError(f"femnist: {path!r} is not a directory; expected LEAF's femnist data directory")
    layout, files = leaf_layout(path, "femnist")

    sides: dict[str, tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]] = {}
    if layout == "split":
        for user, (train, test) in read_split(files, "femnist", _images, who="writer").items():
            sides[user] = (merge(train), merge(test))
    else:
        for user, chunks in read_leaf_files(files["all"], "femnist", _images).items():
            x, y = merge(chunks)
            if len(y) < 2:
                continue  # LEAF's split_data keeps writers with >= 2 samples only
            k = order_split(len(y), cfg.train_frac)
            sides[user] = ((x[:k], y[:k]), (x[k:], y[k:]))

    # A writer needs a train and a test sample (LEAF's -t sample guarantees both; guard anyway).
    sizes = {u: len(tr[1]) + len(te[1]) for u, (tr, te) in sides.items() if len(tr[1]) and len(te[1])}
    chosen = rank_users(sizes, args.clients, "femnist", "writers")
    raw = []
    for user in chosen:
        (tx, ty), (sx, sy) = sides[user]
        if cfg.invert:
            tx, sx = 1.0 - tx, 1.0 - sx
        raw.append((tx.reshape(-1, 1, SIDE, SIDE), ty, sx.reshape(-1, 1, SIDE, SIDE), sy))
    return build_federated(
        "femnist",
        raw,
        NUM_CLASSES,
        args,
        partition=f"femnist(natural,writers={len(raw)},layout={layout},invert={cfg.invert})",
        default_models={"explicit": "resnet20", "deq": "deq_resnet_s"},
    )
