"""Actor faults on a real Ray: an actor killed mid-round (`ray.kill`, kill -9 of its process) is
replaced and its clients' work redone, and the run's metrics and ledger equal the Serial run's bit
for bit; a client whose update kills its actor every time fails the run with one line after
faults.MAX_ACTOR_RETRIES redos; a worker that runs another fedeq-bench than the driver is refused."""
import itertools
import os
import signal
import subprocess
import sys

import pytest
import torch

from fedeq_bench.bench import cluster, engine, faults
from fedeq_bench.bench.backends import RayBackend, SerialBackend, Worker
from fedeq_bench.bench.experiment import load_dataset
from fedeq_bench.core.errors import BenchError
from fedeq_bench.methods import METHODS
from fedeq_bench.methods.fedavg import FedAvg
from tests.helpers import tiny_config, write_tiny_npz

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Wall-clock and process-size metrics are measurements of the machine, not of the computation.
NONDETERMINISTIC = {"time/round_s", "mem/peak_rss_bytes"}

# FedRep keeps a personal head per client (state the engine owns): a redo in round 2 must start from
# the head round 1 left, not from scratch, to give the same bits.
METHOD = "fedrep"

pytestmark = pytest.mark.ray

# A method whose local update kills its own process for client 3 in round 2, as the kernel's
# out-of-memory killer would: imported by every process (driver and Ray workers) via sitecustomize.
OOM_PLUGIN = """
import os, signal, torch
import fedeq_bench.methods
from fedeq_bench.methods.base import register_method
from fedeq_bench.methods.fedavg import FedAvg

@register_method('oom')
class Oom(FedAvg):
    def init_client(self, cid, server, rng):
        return {'cid': torch.tensor(cid)}

    def broadcast(self, server, cid, rnd):
        return {**server, 'round': torch.tensor(rnd)}

    def local_update(self, down, state, data, rng):
        if int(down['round']) == 2 and int(state['cid']) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().local_update({k: v for k, v in down.items() if k != 'round'}, state, data, rng)

    def evaluate(self, down, state, data, rng):
        return super().evaluate({k: v for k, v in down.items() if k != 'round'}, state, data, rng)
"""


def test_a_client_that_keeps_killing_its_actor_fails_the_run_with_one_line(tmp_path):
    """Client 3 shares round 2's third chunk with client 2 (5 clients in 4 chunks: [0] [1] [2, 3] [4]);
    that chunk is redone one client per call, client 2 alone succeeds, client 3 alone kills its actor
    MAX_ACTOR_RETRIES more times: 1 + 3 = 4 deaths, then one line naming method, round and client."""
    # Runs first, before this module starts its own Ray: bench.run starts (and stops) one of its own.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    npz = write_tiny_npz(tmp_path / "t.npz", clients=5)
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "sitecustomize.py").write_text(OOM_PLUGIN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = f"{tmp_path / 'plug'}:{ROOT}"
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--methods", "oom", "--rounds", "3",
                           "--dataset", f"npz:{npz}", "--backend", "ray", "--workers", "2",
                           "--tracking-uri", uri, "--quiet", "--no-report"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    deaths = 1 + faults.MAX_ACTOR_RETRIES
    assert proc.stderr.strip().splitlines() == [
        f"error: oom: round 2, client 3: its local update killed its Ray actor {deaths} times (out of memory?)"]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("fedeq-bench").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}  # parent + the oom child
    child = [r for r in runs if "mlflow.parentRunId" in r.data.tags][0]
    assert [m.step for m in client.get_metric_history(child.info.run_id, "bytes/up")] == [1]


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the in-process tests; each test makes (and closes) its own 2-actor pool."""
    import ray

    started = cluster.connect(None)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """6 clients, 2 rounds, and the Serial run every disturbed Ray run must equal."""
    npz = write_tiny_npz(tmp_path_factory.mktemp("d") / "tiny.npz", clients=6)
    cfg = tiny_config(npz, methods=METHOD, rounds=2)
    ds = load_dataset(cfg, 0)
    return npz, cfg, ds, engine.run_method(cfg, METHOD, 0, ds, SerialBackend())


def arm(backend, at: int, kill):
    """Call `kill(actor)` right after the `at`-th chunk (counted over the whole run) goes to `actor`."""
    count, submit = itertools.count(1), backend._submit

    def hooked(call, actor, chunk):
        ref = submit(call, actor, chunk)
        if next(count) == at:
            kill(actor)
        return ref

    backend._submit = hooked


def assert_same_run(a, b):
    assert len(a.history) == len(b.history) == 2
    for x, y in zip(a.history, b.history):
        assert {k: v for k, v in x.items() if k not in NONDETERMINISTIC} == \
               {k: v for k, v in y.items() if k not in NONDETERMINISTIC}  # exact float equality
    assert a.ledger.entries == b.ledger.entries


# 6 clients on 2 actors: 4 chunks per call. Chunks 1-4 are round 1's updates, 5-8 its evaluation,
# 9-12 round 2's updates: the 10th goes to an actor mid-round 2, with round 1's state in the jobs.
@pytest.mark.parametrize("how", ["ray.kill", "kill -9"])
def test_an_actor_killed_mid_round_is_replaced_and_the_run_is_bit_identical(how, ray_session, setup):
    ray = ray_session
    _, cfg, ds, serial = setup
    backend = RayBackend(workers=2)
    try:
        pid_of = {a: ray.get(a.hello.remote())["pid"] for a in backend.actors}
        killed = []

        def kill(actor):
            killed.append(actor)
            if how == "ray.kill":
                ray.kill(actor)
            else:
                os.kill(pid_of[actor], signal.SIGKILL)

        arm(backend, 10, kill)
        started = len(backend._spawned)
        result = engine.run_method(cfg, METHOD, 0, ds, backend)
        assert len(killed) == 1 and killed[0] not in backend.actors
        assert len(backend._spawned) == started + 1 and len(backend.actors) == 2  # one replacement
        new = [a for a in backend.actors if a not in pid_of][0]
        assert ray.get(new.hello.remote())["pid"] not in pid_of.values()
        assert_same_run(serial, result)
    finally:
        backend.close()


class OomFedAvg(FedAvg):
    """FedAvg whose local update kills its own process for client 1 in round 2: OOM_PLUGIN's method
    for in-process use. It stands in for `fedavg` in the registry only while a test runs; Ray's
    workers import it from this module."""

    def init_client(self, cid, server, rng):
        return {"cid": torch.tensor(cid)}

    def broadcast(self, server, cid, rnd):
        return {**server, "round": torch.tensor(rnd)}

    def local_update(self, down, state, data, rng):
        if int(down["round"]) == 2 and int(state["cid"]) == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().local_update({k: v for k, v in down.items() if k != "round"}, state, data, rng)

    def evaluate(self, down, state, data, rng):
        return super().evaluate({k: v for k, v in down.items() if k != "round"}, state, data, rng)


def test_the_retry_bound_names_the_client_whose_update_kills_its_actor(ray_session, setup, monkeypatch):
    """The first test in-process: 6 clients in 4 chunks, [0, 1] [2] [3] [4, 5]; client 1's update kills
    the first chunk's actor, then its own alone MAX_ACTOR_RETRIES times, each on a fresh actor."""
    npz, _, ds, _ = setup
    cfg = tiny_config(npz, methods="fedavg", rounds=2)
    monkeypatch.setitem(METHODS._items, "fedavg", OomFedAvg)
    backend = RayBackend(workers=2)
    try:
        started = len(backend._spawned)
        with pytest.raises(BenchError) as e:
            engine.run_method(cfg, "fedavg", 0, ds, backend)
        assert len(backend._spawned) - started == 1 + faults.MAX_ACTOR_RETRIES  # one replacement per death
    finally:
        backend.close()
    assert str(e.value) == (f"fedavg: round 2, client 1: its local update killed its Ray actor "
                            f"{1 + faults.MAX_ACTOR_RETRIES} times (out of memory?)")


def test_every_worker_reports_the_drivers_version(ray_session):
    """The normal path: a checkout's workers all report its git commit, as the driver does."""
    backend = RayBackend(workers=2)
    try:
        reports = ray_session.get([a.hello.remote() for a in backend.actors])
    finally:
        backend.close()
    from fedeq_bench.bench.tracking import git_commit

    assert [r["version"] for r in reports] == [git_commit()] * 2 == [faults.project_version()] * 2


def test_a_driver_of_another_version_is_refused_with_one_line(ray_session, monkeypatch):
    """The workers were started from this checkout; a driver that says it runs 0.0.1 is refused."""
    workers_version = faults.project_version()
    monkeypatch.setenv(faults.VERSION_ENV, "0.0.1")  # this process only: Ray's workers are already forked
    with pytest.raises(BenchError) as e:
        RayBackend(workers=2)
    node = ray_session.util.get_node_ip_address()
    assert str(e.value) == (f"Ray worker on node {node} runs fedeq-bench {workers_version}, the driver 0.0.1; "
                            "install the same commit on every node")


def test_a_replacement_actor_of_another_version_fails_the_run(ray_session, setup):
    """A replacement that lands on a stale node (here: an actor created with $FEDEQ_BENCH_VERSION set)
    stops the run with the version line rather than training with other code."""
    ray = ray_session
    _, cfg, ds, _ = setup
    backend = RayBackend(workers=2)
    try:
        backend._actor_cls = ray.remote(Worker).options(
            num_cpus=1, runtime_env={"env_vars": {faults.VERSION_ENV: "0.0.1-stale"}})
        arm(backend, 2, ray.kill)
        with pytest.raises(BenchError) as e:
            engine.run_method(cfg, METHOD, 0, ds, backend)
    finally:
        backend.close()
    assert str(e.value) == (f"Ray worker on node {ray.util.get_node_ip_address()} runs fedeq-bench 0.0.1-stale, "
                            f"the driver {faults.project_version()}; install the same commit on every node")
