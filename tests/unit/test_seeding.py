"""core/seeding.py: streams are pure functions of (seed, stream, ids), independent of each other,
declared before use, and each (stream, ids) is drawn at one call site only."""
import hashlib
import os
import random
import sys
from collections import defaultdict

import numpy as np
import pytest
import torch

from bench import config as C
from bench.loop.backends import SerialBackend
from bench.loop.engine import run_method
from fedeq_bench.core import seeding
from fedeq_bench.datasets.base import DataArgs, get_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_same_arguments_same_draws():
    a = torch.rand(5, generator=seeding.generator(3, "local", 2, 7))
    b = torch.rand(5, generator=seeding.generator(3, "local", 2, 7))
    assert torch.equal(a, b)
    x = seeding.numpy_rng(1, "split", 4).integers(0, 1 << 30, 4)
    y = seeding.numpy_rng(1, "split", 4).integers(0, 1 << 30, 4)
    assert x.tolist() == y.tolist()


def test_every_coordinate_changes_the_stream():
    base = seeding.derive(3, "local", 2, 7)
    others = [seeding.derive(4, "local", 2, 7), seeding.derive(3, "eval", 2, 7),
              seeding.derive(3, "local", 3, 7), seeding.derive(3, "local", 2, 8),
              seeding.derive(3, "local", 27)]  # ids are separated: (2, 7) is not (27,)
    assert all(o != base for o in others)
    assert len(set(others)) == len(others)


def test_numpy_and_torch_draws_follow_the_derived_seed():
    # The old test compared numpy_rng(1, "data") with itself, which any deterministic numpy_rng
    # passes, one that ignores seed, stream and ids included. Here both generators must be seeded
    # with derive(...) exactly, so every property of derive above holds for their draws ...
    want = np.random.default_rng(seeding.derive(1, "split", 4)).integers(0, 1 << 30, 4).tolist()
    assert seeding.numpy_rng(1, "split", 4).integers(0, 1 << 30, 4).tolist() == want
    assert seeding.generator(3, "local", 2, 7).initial_seed() == seeding.derive(3, "local", 2, 7)
    # ... and the draws themselves differ between seeds, streams and ids.
    draws = [seeding.numpy_rng(*a).integers(0, 1 << 30, 4).tolist()
             for a in [(1, "split", 4), (2, "split", 4), (1, "split", 5), (1, "data"), (1, "unseen")]]
    assert len({tuple(d) for d in draws}) == len(draws)
    t = [torch.rand(4, generator=seeding.generator(*a)).tolist()
         for a in [(3, "local", 2, 7), (3, "eval", 2, 7), (3, "personalize", 2, 7), (3, "local", 2, 8)]]
    assert len({tuple(d) for d in t}) == len(t)


def test_derived_seed_is_the_documented_sha256_and_fits_in_63_bits():
    # The key format is part of every run's numbers: changing it changes every stream of every run.
    key = b"0:local:1:2"
    assert seeding.derive(0, "local", 1, 2) == int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1
    assert all(0 <= seeding.derive(s, stream, 1, 2) < 2**63 for s in range(50) for stream in seeding.STREAMS)


def test_an_undeclared_stream_raises_and_names_the_declared_ones():
    for draw in (seeding.derive, seeding.generator, seeding.numpy_rng):
        with pytest.raises(ValueError, match=r"undeclared random stream 'l'") as e:
            draw(0, "l")
        assert all(name in str(e.value) for name in seeding.STREAMS)


def declared_arity(stream: str) -> int:
    """How many ids a stream is declared with: `"(rnd, cid): ..."` -> 2, `"(): ..."` -> 0."""
    ids = seeding.STREAMS[stream].split(")")[0].lstrip("(").strip()
    return len(ids.split(",")) if ids else 0


def test_no_two_call_sites_draw_the_same_stream_and_ids(monkeypatch):
    # Record, for every derivation during a whole run (loading the data included), its (stream,
    # ids) and the first frame outside core/seeding.py: generator() and numpy_rng() call the module
    # global `derive`, so patching it sees every draw whichever helper a caller used.
    sites = defaultdict(set)
    real = seeding.derive

    def recording(seed, stream, *ids):
        frame = sys._getframe(1)
        while os.path.samefile(frame.f_code.co_filename, seeding.__file__):
            frame = frame.f_back
        where = f"{os.path.relpath(frame.f_code.co_filename, ROOT)}:{frame.f_lineno}"
        sites[(stream, tuple(int(i) for i in ids))].add(where)
        return real(seed, stream, *ids)

    monkeypatch.setattr(seeding, "derive", recording)
    global_state = (torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())

    # synthetic: the one shipped dataset that draws `data` (npz files bring their own split).
    # 5 clients, 2 held out (round(0.3 * 5)), so held-out clients are personalized and evaluated;
    # round 1's evaluation scores a sample of 2 of the 3 training clients (`eval_sample`); FedAvg's
    # messages travel as stochastically rounded int8 (`wire_down`, `wire_up`); clients get devices of
    # mobile-mix's tiers (`devices`), each available with probability 0.92 (`availability`).
    cfg = C.apply(C.default_config(), {"dataset": "synthetic", "clients": 5, "rounds": 2, "backend": "serial",
                                       "devices": "mobile-mix",
                                       "fraction": 0.67, "frac_unseen": 0.3, "val_frac": 0.1, "eval_clients": 2,
                                       "fedavg.wire": "int8", "fedavg.wire_rounding": "stochastic"})
    ds = get_dataset("synthetic", cfg.datasets["synthetic"],
                     DataArgs(seed=0, clients=5, partition=None, val_frac=0.1, frac_unseen=0.3, data_dir=None))
    assert len(ds.unseen) == 2
    for method in ("fedavg", "fedavg_ft", "fedbabu", "ditto", "fedeq", "fedrep", "apfl", "pfedme"):
        run_method(cfg, method, 0, ds, SerialBackend())

    shared = {key: where for key, where in sites.items() if len(where) > 1}
    assert not shared, f"(stream, ids) drawn at more than one call site: {shared}"
    # Every declared stream but bench/perf/__main__.py's was drawn, each with the ids it is declared with.
    assert {stream for stream, _ in sites} == set(seeding.STREAMS) - {"perf"}
    wrong = {key for key in sites if len(key[1]) != declared_arity(key[0])}
    assert not wrong, f"drawn with other ids than declared in STREAMS: {sorted(wrong)}"
    # And nothing drew from a global generator (torch's, numpy's legacy one, Python's): a draw
    # there would depend on what else ran in the process, so Serial and Ray runs would differ.
    assert torch.equal(torch.random.get_rng_state(), global_state[0]), "something drew from torch's global generator"
    assert np.array_equal(np.random.get_state()[1], global_state[1]), "something drew from np.random's global state"
    assert random.getstate() == global_state[2], "something drew from Python's `random`"
