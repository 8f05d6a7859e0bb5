"""bench/seeding.py: streams are pure functions of (seed, stream, ids) and independent of each other."""
import torch

from fedeq_bench.core import seeding


def test_same_arguments_same_draws():
    a = torch.rand(5, generator=seeding.generator(3, "local", 2, 7))
    b = torch.rand(5, generator=seeding.generator(3, "local", 2, 7))
    assert torch.equal(a, b)


def test_every_coordinate_changes_the_stream():
    base = seeding.derive(3, "local", 2, 7)
    others = [seeding.derive(4, "local", 2, 7), seeding.derive(3, "eval", 2, 7),
              seeding.derive(3, "local", 3, 7), seeding.derive(3, "local", 2, 8),
              seeding.derive(3, "local", 27)]  # ids are separated: (2, 7) is not (27,)
    assert all(o != base for o in others)
    assert len(set(others)) == len(others)


def test_derived_seed_fits_in_63_bits():
    assert all(0 <= seeding.derive(s, "x") < 2**63 for s in range(100))


def test_numpy_stream_is_deterministic():
    assert seeding.numpy_rng(1, "data").integers(0, 1 << 30, 4).tolist() == \
        seeding.numpy_rng(1, "data").integers(0, 1 << 30, 4).tolist()
