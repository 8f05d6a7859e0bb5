"""Named random streams.

Every random draw in a run comes from a stream named by its purpose and derived from
(seed, stream, *ids), e.g. `generator(seed, "local", rnd, cid)`. Streams are independent of one
another and of execution order, so a client's local update draws the same numbers whether it runs
in the driver, on a Ray actor, first or last; and adding a new stream never shifts an old one.
"""
from __future__ import annotations

import hashlib
import threading

import numpy as np
import torch

# Every stream, with the ids it is drawn at and its one call site. Deriving a stream not declared
# here raises, and tests/unit/test_seeding.py checks that no two call sites draw the same
# (stream, ids). A method derives nothing itself: it draws from the generator it is handed.
# `init` and `unseen` keep their old names (and so their numbers: the same initial network and the
# same held-out clients as before) now that init_server and personalization have streams of their own.
STREAMS = {
    "data": "(): generating a synthetic dataset or partitioning a real one (datasets/)",
    "split": "(cid): carving a client's validation split (datasets/base.py)",
    "unseen": "(): choosing the clients held out of training (datasets/base.py)",
    "init": "(): the initial network's weights (bench/loop/engine.py)",
    "server_init": "(): Method.init_server (bench/loop/engine.py)",
    "client_init": "(cid): Method.init_client, training and held-out clients (bench/loop/engine.py)",
    "schedule": "(rnd): the round's cohort (bench/loop/engine.py)",
    "eval_sample": "(rnd, group): the clients an evaluation before the last round scores with "
                   "--eval-clients; group 0 training clients, 1 held-out clients (bench/loop/engine.py)",
    "local": "(rnd, cid): Method.local_update (bench/loop/backends.py)",
    "eval": "(rnd, cid): Method.evaluate, e.g. fine-tuning before testing (bench/loop/backends.py)",
    "personalize": "(rnd, cid): Method.personalize of a held-out client (bench/loop/backends.py)",
    "global": "(kind, rnd, cid): torch's global generator during one client job, for model code that "
              "draws from it, such as dropout (at evaluation too with eval_dropout) (bench/loop/backends.py)",
    "wire_down": "(rnd, cid): stochastic rounding of a downlink, drawn for the first client that gets "
                 "the message (bench/loop/engine.py)",
    "wire_up": "(rnd, cid): stochastic rounding of a client's uplink (bench/loop/backends.py)",
    "devices": "(cid): a client's device tier in the run's profile set (bench/loop/devices.py)",
    "availability": "(rnd, cid): whether a sampled client's device is available in the round, when its "
                    "availability is below 1 (bench/loop/devices.py)",
    "perf": "(): the generated workload of bench/perf/workloads.py and tests/perf",
}


GLOBAL_RNG_LOCK = threading.RLock()
"""Held by every block that seeds or forks torch's global generator (the initial network, a method's
scratch network, a client job's `global` stream). One run touches it from one thread, but a sweep's
parallel trials (`bench.sweep --n-jobs`) run several engines in one driver: without the lock, one
thread's fork could rewind the generator while another builds its initial network from it."""


def derive(seed: int, stream: str, *ids: int) -> int:
    """A 63-bit integer seed for `stream` at `ids`, a pure function of its arguments."""
    if stream not in STREAMS:
        raise ValueError(f"undeclared random stream {stream!r}; declare it in core/seeding.py STREAMS "
                         f"(declared: {', '.join(STREAMS)})")
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
