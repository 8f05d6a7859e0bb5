"""Divergence, for every method: a NaN or inf in what a client sends or in the server's state.

DEQ solvers raise their own `DEQDivergence`; any other method diverging (a huge penalty, a huge step)
would otherwise train on NaN to the end and finish at chance accuracy. The backends check every local
update's uplink and reported loss (`Worker`), the engine every aggregated server state; either stops
the run with one line naming method, round and client (or `server`), and the runs end FAILED.
A pass of `isfinite` over the parameters is small next to the local update that produced them.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


def first_nonfinite(tree: Any, prefix: str = "") -> str | None:
    """The name of the first tensor or number holding NaN or inf in a (nested) dict, list or tuple of
    tensors and numbers, in key order; None when everything is finite. Integer tensors are finite."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() or tree.is_complex():
            return None if bool(torch.isfinite(tree).all()) else prefix or "value"
        return None
    if isinstance(tree, float):
        return None if math.isfinite(tree) else prefix or "value"
    items: Iterable[tuple[Any, Any]]
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return None
    for k, v in items:
        bad = first_nonfinite(v, f"{prefix}.{k}" if prefix else str(k))
        if bad is not None:
            return bad
    return None


def describe(name: str, after: str) -> str:
    """The message after 'method: round r, client c: ' (or '..., server: ')."""
    return f"diverged: non-finite {name} after the {after}; lower the learning rate or the penalty"


def check_update(up, state, metrics) -> None:
    """A local update's uplink, new client state and reported loss must be finite (Diverged)."""
    from fedeq_bench.core.errors import Diverged

    bad = first_nonfinite({"uplink": up, "state": state, "loss": metrics.get("loss", 0.0)})
    if bad is not None:
        raise Diverged(describe(bad, "local update"))
