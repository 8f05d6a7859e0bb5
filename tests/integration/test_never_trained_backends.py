"""Clients never sampled take the held-out path at the final evaluation: Serial and Ray give the
same bits there too (tests/integration/test_backends.py's schedule samples every client)."""
import pytest

from fedeq_bench.bench import engine
from fedeq_bench.bench.backends import RayBackend, SerialBackend
from fedeq_bench.bench.experiment import load_dataset
from tests.helpers import tiny_config, write_tiny_npz

NONDETERMINISTIC = {"time/round_s", "mem/peak_rss_bytes"}

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_backend():
    backend = RayBackend(workers=2)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_npz(tmp_path_factory.mktemp("d") / "tiny.npz", clients=7)


# One method per kind of untrained personal part: a personal head (fedrep), a mixture (apfl), a
# personalized model (pfedme), local layers (lg_fedavg), FeDEQ's head and duals.
@pytest.mark.parametrize("method", ["fedrep", "apfl", "pfedme", "lg_fedavg", "fedeq"])
def test_never_sampled_clients_are_personalized_with_the_same_bits(method, ray_backend, tiny):
    cfg = tiny_config(tiny, methods=method, rounds=2, fraction=0.34, frac_unseen=0.15)
    ds = load_dataset(cfg, 0)
    schedule = engine.make_schedule(0, ds.train_ids, 2, 0.34)
    never = set(ds.train_ids) - set(schedule[0]) - set(schedule[1])
    serial = engine.run_method(cfg, method, 0, ds, SerialBackend())
    ray = engine.run_method(cfg, method, 0, ds, ray_backend)
    assert len(never) >= 1 and serial.final["clients/never_trained"] == len(never)
    for s, r in zip(serial.history, ray.history):
        s = {k: v for k, v in s.items() if k not in NONDETERMINISTIC}
        r = {k: v for k, v in r.items() if k not in NONDETERMINISTIC}
        assert s == r  # exact float equality, not approx
