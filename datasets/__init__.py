"""Federated datasets. Every loader returns a `FederatedDataset` of `ClientData` (see base.py).

A new dataset is one new file (registered with `@register_dataset`) plus one line below; helper
modules (base, partition, cache, describe, leaf) need no entry.
"""
from fedeq_bench.datasets.base import (  # noqa: F401
    ClientData,
    DataArgs,
    FederatedDataset,
    dataset_names,
    get_dataset,
    register_dataset,
)

# Importing a dataset's module registers it.
from fedeq_bench.datasets import cifar, femnist, fmnist, npz, shakespeare, synthetic  # noqa: E402,F401  isort: skip
