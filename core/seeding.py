"""Named random streams.

Every random draw in a run comes from a stream named by its purpose and derived from
(seed, stream, *ids), e.g. `generator(seed, "local", rnd, cid)`. Streams are independent of one
another and of execution order, so a client's local update draws the same numbers whether it runs
in the driver, on a Ray actor, first or last; and adding a new stream never shifts an old one.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

# Streams used by the harness (a method may derive sub-streams from the generator it is given).
STREAMS = ("data", "split", "schedule", "init", "client_init", "local", "eval", "unseen")


def derive(seed: int, stream: str, *ids: int) -> int:
    """A 63-bit integer seed for `stream` at `ids`, a pure function of its arguments."""
    key = ":".join([str(int(seed)), stream, *(str(int(i)) for i in ids)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def generator(seed: int, stream: str, *ids: int) -> torch.Generator:
    """A CPU `torch.Generator` for the stream (CPU so draws are identical on every device)."""
    g = torch.Generator()
    g.manual_seed(derive(seed, stream, *ids))
    return g


def numpy_rng(seed: int, stream: str, *ids: int) -> np.random.Generator:
    """A numpy `Generator` (PCG64) for the stream, for data generation and partitioning."""
    return np.random.default_rng(derive(seed, stream, *ids))
