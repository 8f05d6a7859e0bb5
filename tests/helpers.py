"""Small builders shared by tests: a tiny npz federation and a config for it."""
from __future__ import annotations

import numpy as np

from fedeq_bench.bench import config as C


def write_tiny_npz(path, clients=5, n_train=20, n_test=8, d=4, classes=3, seed=0):
    """`clients` clients with `n_train`/`n_test` samples of `d` features; labels from a linear rule."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, classes))
    arrays = {}
    for k in range(clients):
        for split, n in (("train", n_train), ("test", n_test)):
            x = rng.normal(size=(n, d)).astype(np.float32) + k * 0.1
            y = (x @ w).argmax(1).astype(np.int64)
            y[:classes] = np.arange(classes)  # every class present, so num_classes == classes
            arrays[f"{split}_x_{k}"], arrays[f"{split}_y_{k}"] = x, y
    np.savez(path, **arrays)
    return str(path)


def tiny_config(npz_path, **run):
    """Config for the tiny npz task; `run` overrides run keys (values typed or strings)."""
    cfg = C.default_config()
    base = {"dataset": f"npz:{npz_path}", "rounds": 2, "backend": "serial", "val_frac": 0.1}
    base.update(run)
    return C.apply(cfg, base)
