"""bench/divergence.py: finding a NaN or inf in nested states and messages."""
from __future__ import annotations

import torch

from fedeq_bench.bench.divergence import first_nonfinite


def test_finite_trees_pass_and_the_first_bad_leaf_is_named():
    ok = {"w": torch.ones(3), "steps": torch.tensor([1, 2]), "head": [torch.zeros(2), 0.5], "n": 3}
    assert first_nonfinite(ok) is None
    bad = {**ok, "head": [torch.zeros(2), torch.tensor([0.0, float("nan")])], "z": torch.tensor(float("inf"))}
    assert first_nonfinite(bad) == "head.1"  # dict order, then list index; "z" comes later
    assert first_nonfinite({"loss": float("inf")}) == "loss"
    assert first_nonfinite(torch.tensor([float("-inf")])) == "value"
    assert first_nonfinite({"ids": torch.tensor([2**62])}) is None  # integers are never non-finite
