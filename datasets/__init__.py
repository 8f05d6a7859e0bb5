"""Federated datasets. Every loader returns a `FederatedDataset` of `ClientData` (see base.py).

A new dataset is one new file (registered with `@register_dataset`) plus one line below; helper
modules (base, partition, cache, describe, leaf) need no entry.
"""

if __name__ != "fedeq_bench.datasets":  # the checkout's folder imported by its folder name
    raise ImportError(f"this is fedeq-bench's datasets/ folder; import it as fedeq_bench.datasets "
                      f"(imported as {__name__!r}, every module would load twice, with two registries); for Hugging "
                      f"Face's datasets, run Python from outside this checkout")

from fedeq_bench.datasets.base import (  # noqa: F401
    ClientData,
    DataArgs,
    FederatedDataset,
    get_dataset,
    register_dataset,
)

# Importing a dataset's module registers it.
from fedeq_bench.datasets import cifar, femnist, fmnist, npz, shakespeare, synthetic  # noqa: E402,F401  isort: skip
