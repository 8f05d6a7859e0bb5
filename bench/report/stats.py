"""Statistics over seeds, shared by the terminal table (bench.experiment.summary) and the reports."""
from __future__ import annotations

from typing import NamedTuple


class Stat(NamedTuple):
    """A metric over seeds. A pair, so summary.json holds `[mean, std]` as it always has."""

    mean: float
    std: float | None
    """The SAMPLE standard deviation (ddof=1) over seeds; None with one seed (no spread to estimate: 0.0
    would claim one), so summary.json holds null."""


def seed_stat(values) -> Stat:
    """Mean and sample std (ddof=1) of one metric over seeds; std None for a single seed.

    Seeds are a small sample of the runs one could draw, so the sample std (divide by n - 1) is the
    estimate of their spread; the population std (numpy's default ddof=0) understates it by a factor
    sqrt((n - 1) / n), 0.82 with three seeds.
    """
    import numpy as np

    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("seed_stat of no values")
    return Stat(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else None)


# Summary column -> how to read it from a MethodResult (final round, never the best round).
