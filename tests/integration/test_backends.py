"""Serial and Ray backends give bit-identical metrics and ledgers (client-id order, same threads)."""
import pytest

from fedeq_bench.bench import engine
from fedeq_bench.bench.backends import RayBackend, SerialBackend
from fedeq_bench.bench.run import load_dataset
from fedeq_bench.methods import METHODS
from tests.helpers import tiny_config, write_tiny_npz

# Wall-clock and process-size metrics are measurements of the machine, not of the computation.
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


@pytest.mark.parametrize("method", METHODS.names())
def test_serial_and_ray_are_bit_identical(method, ray_backend, tiny):
    cfg = tiny_config(tiny, methods=method, rounds=2, fraction=0.6, frac_unseen=0.15)
    ds = load_dataset(cfg, 0)
    serial = engine.run_method(cfg, method, 0, ds, SerialBackend())
    ray = engine.run_method(cfg, method, 0, ds, ray_backend)
    assert ray_backend.workers == 2
    assert len(serial.history) == len(ray.history) == 2
    for s, r in zip(serial.history, ray.history):
        s = {k: v for k, v in s.items() if k not in NONDETERMINISTIC}
        r = {k: v for k, v in r.items() if k not in NONDETERMINISTIC}
        assert s == r  # exact float equality, not approx
    assert serial.ledger.entries == ray.ledger.entries
    assert serial.history[-1]["acc/mean"] > 0
