"""bench/loop/backends.py without Ray: one `run(kind, spec, jobs, ...)` call, the Worker's dispatch on the
kind, its random streams, its errors, and its bounded cache of built methods.

Ray's side of the same protocol (chunks, shared payloads) is tested against Serial bit for bit in
tests/integration/test_backends.py.
"""
import numpy as np
import pytest
import torch
from torch import nn

from bench.loop import backends, wire
from bench.loop.backends import Job, Kind, SerialBackend, Worker
from fedeq_bench.core import seeding
from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.types import MethodSpec, Task
from fedeq_bench.datasets.base import ClientData, FederatedDataset
from fedeq_bench.methods.base import LocalResult

SEED, RND = 5, 3


class Probe:
    """A method whose every step returns its random draw, so a test sees which stream each kind used.

    `cfg` says how to fail: "bench-error" (bad input), "bug" (any other exception), else not at all.
    """

    name = "probe"

    def __init__(self, cfg, task):
        self.cfg, self.task = cfg, task
        self.net = nn.Linear(4, 3)

    def local_update(self, down, state, data, rng):
        if self.cfg == "bench-error":
            raise BenchError("solver diverged")
        if self.cfg == "bug":
            raise KeyError("w")
        self.net(data.train_x).sum().backward()  # something for the memory meter to see
        draw = torch.rand(1, generator=rng)
        return LocalResult({"w": down["w"] + 1, "draw": draw}, {"draw": draw}, {"threads": float(torch.get_num_threads())})

    def personalize(self, down, state, data, rng):
        return {"p": torch.rand(1, generator=rng)}

    def evaluate(self, down, state, data, rng):
        return {"draw": float(torch.rand(1, generator=rng)), "p": float(state["p"]) if "p" in state else -1.0}


def spec(cfg=None):
    return MethodSpec(Probe, cfg, Task("mlp", (4,), 3))


def draw(stream, cid):
    """What the Worker's generator for (stream, RND, cid) gives first."""
    return torch.rand(1, generator=seeding.generator(SEED, stream, RND, cid))


@pytest.fixture
def serial():
    rng = np.random.default_rng(0)
    clients = []
    for _ in range(4):
        x, y = rng.normal(size=(6, 4)).astype(np.float32), rng.integers(0, 3, size=6)
        clients.append(ClientData(x, y, x[:1], y[:1], x, y))
    backend = SerialBackend(threads=3)
    backend.set_dataset("tiny", FederatedDataset("tiny", clients, 3, (4,)))
    return backend


def jobs(*cids):
    down = wire.encode({"w": torch.zeros(2)})  # one payload, shared by every job, as a broadcast is
    return [Job(cid, down, {}) for cid in cids]


def test_train_returns_the_encoded_uplink_and_new_state_in_job_order(serial):
    prev = torch.get_num_threads()
    out = serial.run(Kind.TRAIN, spec(), jobs(2, 0, 3), SEED, RND, measure=frozenset({0}))
    assert [r.cid for r in out] == [2, 0, 3]  # job order, not sorted
    for r in out:
        up = wire.decode(r.up)
        assert torch.equal(up["w"], torch.ones(2))  # the decoded downlink (zeros) + 1
        assert torch.equal(up["draw"], draw("local", r.cid)) and torch.equal(r.state["draw"], up["draw"])
        assert r.metrics == {"threads": 3.0} and r.error is None
    # Only the client in `measure` is metered; every result reports the process's size.
    assert [r.peak_train_bytes > 0 for r in out] == [False, True, False]
    assert all(r.peak_rss_bytes > 0 for r in out)
    assert torch.get_num_threads() == prev  # Serial pins the actors' thread count only during the call


def test_evaluate_draws_the_eval_stream_and_changes_no_state(serial):
    out = serial.run(Kind.EVALUATE, spec(), jobs(1, 2), SEED, RND)
    assert [(r.cid, r.metrics) for r in out] == [(c, {"draw": float(draw("eval", c)), "p": -1.0}) for c in (1, 2)]
    assert all(r.state is None and r.up is None for r in out)


def test_a_held_out_client_is_personalized_then_evaluated(serial):
    (r,) = serial.run(Kind.EVALUATE_UNSEEN, spec(), jobs(3), SEED, RND)
    assert r.metrics == {"draw": float(draw("eval", 3)), "p": float(draw("personalize", 3))}
    assert r.state is None  # nothing about a held-out client is kept


def test_bad_input_comes_back_as_an_error_and_a_bug_propagates_with_its_client(serial):
    out = serial.run(Kind.TRAIN, spec("bench-error"), jobs(1, 2), SEED, RND)
    assert [(r.cid, r.error) for r in out] == [(1, "solver diverged"), (2, "solver diverged")]
    with pytest.raises(KeyError) as e:
        serial.run(Kind.TRAIN, spec("bug"), jobs(1, 2), SEED, RND)
    assert e.value.__notes__ == [f"in probe: round {RND}, client 1 (train)"]


class GlobalDraw(Probe):
    """Model code that draws from torch's global generator, as dropout does (F.dropout takes none)."""

    def local_update(self, down, state, data, rng):
        return LocalResult({"mask": torch.rand(3)}, {}, {})


def test_draws_from_the_global_generator_depend_on_the_job_not_on_the_process_history(serial):
    """Whatever the process drew before, a job's global draws come from its own ('global', kind, rnd,
    cid) stream; and the caller's global generator is left where it was."""
    outs = []
    s = MethodSpec(GlobalDraw, None, Task("mlp", (4,), 3))
    for history in (0, 1):  # the first call builds the method (Probe's nn.Linear draws globally), the second finds it
        torch.manual_seed(history)  # two different pasts of the process
        serial.worker.method(s)
        before = torch.random.get_rng_state()
        (r,) = serial.run(Kind.TRAIN, s, jobs(2), SEED, RND)
        assert torch.equal(torch.random.get_rng_state(), before)  # restored
        outs.append(wire.decode(r.up)["mask"])
    assert torch.equal(outs[0], outs[1])
    expected = torch.Generator().manual_seed(seeding.derive(SEED, "global", list(Kind).index(Kind.TRAIN), RND, 2))
    assert torch.equal(outs[0], torch.rand(3, generator=expected))


def test_the_method_cache_keeps_only_the_most_recently_used():
    worker = Worker(1, "cpu")
    n = backends.METHOD_CACHE_SIZE
    specs = [spec(i) for i in range(n + 2)]  # distinct configs: distinct specs, as a sweep's trials are
    built = [worker.method(s) for s in specs[:n]]
    assert worker.method(specs[0]) is built[0]  # a hit; specs[0] is now the most recently used
    worker.method(specs[n])                     # one over the bound: evicts the least recently used, specs[1]
    assert len(worker._methods) == n
    assert worker.method(specs[0]) is built[0]  # used recently: survived
    assert worker.method(specs[1]) is not built[1]  # evicted: built again (evicting specs[2] in turn)
    assert worker.method(specs[2]) is not built[2]
    for s in specs:
        worker.method(s)
    assert len(worker._methods) == n and list(worker._methods) == specs[-n:]


def data_worker(device, n_clients=4, n=6):
    rng = np.random.default_rng(0)
    clients = []
    for _ in range(n_clients):
        x, y = rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, size=n)
        clients.append(ClientData(x, y, x[:1], y[:1], x, y))
    worker = Worker(1, device)
    worker.set_dataset("tiny", FederatedDataset("tiny", clients, 3, (4,)))
    return worker, clients


# One client's bytes on a device: train, val and test x (6x4, 1x4, 6x4 float32) and y (6, 1, 6 int64):
# (24 + 4 + 24) * 4 + (6 + 1 + 6) * 8 = 208 + 104 = 312.
CLIENT_BYTES = 312


def test_client_data_on_a_device_is_cached_up_to_a_byte_bound_least_recently_used_first(monkeypatch):
    # "meta" stands for CUDA here: a non-CPU device whose tensors are copies (shape and size, no data).
    monkeypatch.setattr(backends, "DEVICE_DATA_CACHE_BYTES", 2 * CLIENT_BYTES + 100)  # room for two clients
    worker, _ = data_worker("meta")
    first = {c: worker._client(c, "meta") for c in (0, 1)}
    assert backends._nbytes(first[0]) == CLIENT_BYTES and worker._tensor_bytes == 2 * CLIENT_BYTES
    assert worker._client(0, "meta") is first[0]       # a hit; 0 is now the most recently used
    worker._client(2, "meta")                          # a third client: drops the least recently used, 1
    assert list(worker._tensors) == [0, 2] and worker._tensor_bytes == 2 * CLIENT_BYTES
    assert worker._client(1, "meta") is not first[1]   # dropped: copied again (dropping 0 in turn)
    assert list(worker._tensors) == [2, 1]
    worker.set_dataset("other", worker.dataset)        # a new dataset: nothing of the old one is kept
    assert not worker._tensors and worker._tensor_bytes == 0


def test_a_client_larger_than_the_bound_is_copied_for_each_use_and_drops_nothing(monkeypatch):
    monkeypatch.setattr(backends, "DEVICE_DATA_CACHE_BYTES", CLIENT_BYTES + 100)
    worker, _ = data_worker("meta")
    worker._client(0, "meta")
    monkeypatch.setattr(backends, "DEVICE_DATA_CACHE_BYTES", CLIENT_BYTES - 1)  # now every client is too big
    big = worker._client(1, "meta")
    assert big.train_x.shape == (6, 4) and worker._client(1, "meta") is not big
    assert list(worker._tensors) == [0] and worker._tensor_bytes == CLIENT_BYTES  # 0 is kept, nothing added


def test_client_data_on_cpu_is_every_client_as_views_of_the_shared_arrays(monkeypatch):
    monkeypatch.setattr(backends, "DEVICE_DATA_CACHE_BYTES", 0)  # the bound is for device copies only
    worker, clients = data_worker("cpu")
    got = [worker._client(c, "cpu") for c in range(4)]
    assert list(worker._tensors) == [0, 1, 2, 3] and worker._tensor_bytes == 0
    assert all(np.shares_memory(t.train_x.numpy(), c.train_x) for t, c in zip(got, clients, strict=True))  # no copy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_worker_holds_at_most_the_bound_of_client_data_on_the_gpu(monkeypatch):
    # 200 clients against a bound of 1 MB: the GPU holds 10 clients' data however many the worker
    # touched, and each client's tensors equal its CPU data.
    monkeypatch.setattr(backends, "DEVICE_DATA_CACHE_BYTES", 10**6)
    worker, clients = data_worker("cuda", n_clients=200, n=2000)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    per_client = backends._nbytes(worker._client(0, "cuda"))
    assert per_client == (2000 * 4 + 4 + 2000 * 4) * 4 + (2000 + 1 + 2000) * 8  # 64,016 + 32,008 = 96,024
    for c in range(200):
        t = worker._client(c, "cuda")
        assert t.train_x.is_cuda and torch.equal(t.train_x.cpu(), torch.from_numpy(clients[c].train_x))
    del t
    held = torch.cuda.memory_allocated() - before
    assert len(worker._tensors) == 10**6 // per_client == 10 and worker._tensor_bytes == 10 * per_client
    # The allocator rounds each of a client's 6 tensors up to 512 bytes; all 200 would be 19.2 MB.
    assert 10 * per_client <= held <= 10 * per_client + 10 * 6 * 512
