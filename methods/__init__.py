"""Federated methods, one file each, registered by name at the definition (`@register_method`).

A new method is one new file plus one line below; helper modules (base, train, partial, nets, deq)
need no entry.
"""

if __name__ != "fedeq_bench.methods":  # the checkout's folder imported by its folder name
    raise ImportError(f"this is fedeq-bench's methods/ folder; import it as fedeq_bench.methods "
                      f"(imported as {__name__!r}, every module would load twice, with two registries)")

from fedeq_bench.methods.base import METHODS, Method, MethodConfig, register_method  # noqa: F401

# Importing a method's module registers it.
from fedeq_bench.methods import (  # noqa: E402,F401  isort: skip
    apfl,
    ditto,
    fedavg,
    fedavg_ft,
    fedbabu,
    fedeq,
    fedper,
    fedprox,
    fedrep,
    fedrod,
    knnper,
    lg_fedavg,
    local,
    pfedme,
)
