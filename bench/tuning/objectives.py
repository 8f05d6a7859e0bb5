"""What a trial is scored by: the objectives (`--objective acc,bytes,memory`), their values over
seeds, and the validation view a trial trains and scores on (the real test split is never read)."""
from __future__ import annotations

import copy
from typing import Literal

from fedeq_bench.core.errors import BenchError, choices

OBJECTIVES: dict[str, tuple[str, Literal["maximize", "minimize"]]] = {
    "acc": ("acc/val", "maximize"),
    "bytes": ("bytes/cumulative", "minimize"),
    "memory": ("mem/peak_train_bytes", "minimize"),
    "time": ("sim/time_cumulative_s", "minimize"),
}
"""`--objective` names: (metric, direction). acc: final validation accuracy; bytes: every byte sent up
and down over the run; memory: the run's peak training memory of a local update; time: the run's
simulated seconds on its devices (`--devices`, bench/loop/devices.py). Each is the mean over seeds."""
COLUMN = {"acc": "acc/val", "bytes": "MB sent", "memory": "peak train MB", "time": "sim s"}
"""How each objective is shown (Pareto table, figure): bytes and memory in MB (`shown`)."""


def shown(objective: str, value: float) -> float:
    """An objective's value as COLUMN shows it: bytes and memory in MB, accuracy as is."""
    return value / 1e6 if objective in ("bytes", "memory") else value
TEST_METRICS = ("acc/mean", "acc/weighted", "acc/bottom10", "acc/unseen")
"""Metrics a trial does not log: on the validation view they would be validation figures."""
OBJECTIVE = "acc/val"


def parse_objectives(text: str) -> tuple[str, ...]:
    """`acc`, `acc,bytes`, `acc,bytes,memory`: names of OBJECTIVES, each once, accuracy among them."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in OBJECTIVES]
    if not names or bad:
        raise BenchError(f"unknown objective {', '.join(map(repr, bad)) or repr(text)}; "
                         f"give a comma list of {choices(OBJECTIVES)} (e.g. acc,bytes)")
    if len(set(names)) != len(names) or "acc" not in names:
        raise BenchError(f"--objective {text!r}: name each objective once, acc among them (e.g. acc,bytes)")
    return names


def objective_values(results, objectives) -> list[float]:
    """Each objective's mean over the seeds' results: final acc/val and bytes/cumulative, and the
    run's peak of mem/peak_train_bytes (a client is metered on its first update, so the last round
    alone may have metered nobody new)."""
    out = []
    for o in objectives:
        metric = OBJECTIVES[o][0]
        vals = [r.peak(metric) if o == "memory" else r.final[metric] for r in results]
        out.append(sum(vals) / len(vals))
    return out


def validation_view(dataset):
    """The same clients with each test split replaced by the validation split (module doc).

    Reads only train and validation arrays. The fingerprint differs from the real dataset's, because
    backends cache a dataset by fingerprint and the view must never be mistaken for the real data.
    """
    from fedeq_bench.datasets.base import ClientData

    view = copy.copy(dataset)
    view.clients = [ClientData(c.train_x, c.train_y, c.val_x, c.val_y, c.val_x, c.val_y) for c in dataset.clients]
    view.fingerprint = f"{dataset.fingerprint}-val"
    return view
