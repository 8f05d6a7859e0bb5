"""What a federated dataset looks like: per-client sizes and label histograms, as text or a plot.

Used by `python -m bench.data describe` (bench/data.py); works on any `FederatedDataset`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fedeq_bench.core.errors import BenchError
from fedeq_bench.datasets.base import FederatedDataset


def label_counts(ds: FederatedDataset, split: str = "train") -> np.ndarray:
    """(clients, classes) int64 counts of `split` labels ("train", "val", "test" or "all" = train+val)."""
    rows = []
    for c in ds.clients:
        if split == "all":
            y = np.concatenate([c.train_y, c.val_y])
        else:
            y = getattr(c, f"{split}_y")
        # Per-position targets (Shakespeare, (N, 80)) count every token.
        rows.append(np.bincount(y.ravel(), minlength=ds.num_classes)[: ds.num_classes])
    return np.stack(rows).astype(np.int64) if rows else np.zeros((0, ds.num_classes), np.int64)


def _hist(row: np.ndarray) -> str:
    """`3:600 7:540`: the nonzero classes and their counts."""
    return " ".join(f"{k}:{int(row[k])}" for k in np.flatnonzero(row)) or "-"


def describe(ds: FederatedDataset) -> str:
    """A header line, one line per client (sizes, classes, train and test label histograms), a summary."""
    train, val, test = label_counts(ds, "train"), label_counts(ds, "val"), label_counts(ds, "test")
    # Sizes count examples; histograms count labels, which are tokens for per-position targets.
    n = {split: np.array([len(getattr(c, f"{split}_y")) for c in ds.clients], dtype=np.int64)
         for split in ("train", "val", "test")}
    per_token = any(c.train_y.ndim > 1 for c in ds.clients)
    unseen = set(ds.unseen)
    lines = [
        f"dataset {ds.name}  partition {ds.partition}  fingerprint {ds.fingerprint}",
        f"clients {len(ds.clients)} (unseen {len(unseen)})  classes {ds.num_classes}  input {ds.input_shape}",
        "",
        "client  train    val   test  classes  train labels (class:count)  |  test labels"
        + ("  (labels counted per token)" if per_token else ""),
    ]
    for i in range(len(ds.clients)):
        tag = "*" if i in unseen else " "
        n_cls = int(np.count_nonzero(train[i] + val[i]))
        lines.append(f"{i:>5}{tag} {n['train'][i]:>6} {n['val'][i]:>6} {n['test'][i]:>6} {n_cls:>8}  "
                     f"{_hist(train[i])}  |  {_hist(test[i])}")
    sizes = n["train"] + n["val"]
    per_client = np.count_nonzero(train + val, axis=1)
    lines += [
        "",
        f"total train {int(n['train'].sum())}  val {int(n['val'].sum())}  test {int(n['test'].sum())}",
        f"train+val per client: min {int(sizes.min())}  mean {sizes.mean():.1f}  max {int(sizes.max())}",
        f"classes per client: min {int(per_client.min())}  mean {per_client.mean():.2f}  max {int(per_client.max())}",
    ]
    if unseen:
        lines.append("* = unseen client (held out of training)")
    return "\n".join(lines)


def check_output_path(path: str | Path, force: bool = False) -> None:
    """A file the user asked for must go into a folder that exists (a typo must not create a tree of
    folders) and must not be a folder itself; and core/outputs.py's writer must be willing to write it
    (a regular file or nothing, no symbolic link; a file there must be a figure matplotlib saved, unless
    `force`). One BenchError line otherwise."""
    from fedeq_bench.core import outputs

    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise BenchError(f"cannot save the plot to {str(path)!r}: the folder {str(folder)!r} {what}")
    if p.is_dir():
        raise BenchError(f"cannot save the plot to {str(path)!r}: it is a folder; give a file name such as labels.png")
    fmt = p.suffix.lstrip(".").lower() or "png"
    import matplotlib.figure

    formats = matplotlib.figure.Figure().canvas.get_supported_filetypes()  # what savefig(format=) takes
    if fmt not in formats:  # before the data is read, not after it is drawn
        raise BenchError(f"cannot save the plot to {str(path)!r}: matplotlib has no format {fmt!r}; "
                         f"end the name with one of {', '.join(sorted(formats))}")
    outputs.check(path, "plot", outputs.MATPLOTLIB, force=force)


def plot_label_distribution(ds: FederatedDataset, path: str | Path, force: bool = False) -> Path:
    """Save a clients x classes heat map of train+val label counts to `path` (format from its suffix),
    through core/outputs.py's writer (`force`: replace a file there that matplotlib did not save)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    from fedeq_bench.core import outputs

    check_output_path(path, force)
    counts = label_counts(ds, "all")
    n_clients, n_classes = counts.shape
    fig, ax = plt.subplots(figsize=(min(3 + 0.25 * n_classes, 30), min(2 + 0.18 * n_clients, 40)))
    im = ax.imshow(counts, aspect="auto", interpolation="nearest", cmap="viridis")
    if n_classes <= 20:
        ax.set_xticks(range(n_classes))
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_title(f"{ds.name}: {ds.partition}", fontsize=9)
    fig.colorbar(im, ax=ax, label="train+val samples")
    fig.tight_layout()
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    try:
        outputs.write(path, lambda f: fig.savefig(f, format=fmt, dpi=100), "plot", outputs.MATPLOTLIB, force=force)
    finally:
        plt.close(fig)
    return path
