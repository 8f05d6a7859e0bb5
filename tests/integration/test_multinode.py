"""A real two-node Ray cluster on the machine running the tests (Ray's own
`ray.cluster_utils.Cluster`: a head node and a worker node, each its own raylet and object store
with one CPU), driven the ways a cluster user drives one: `--address HOST:PORT`, `--address auto`
($RAY_ADDRESS), `ray://HOST:PORT` (Ray Client), and no --address at all on a machine where a Ray
instance runs (bench/loop/cluster.py: running_instance).

Each node has one CPU, so a pool of 1-CPU actors has exactly one actor per node: the test reads each
actor's node id, and where Ray's object store holds the dataset, to show the work and the data
really were on both nodes. Results equal the Serial backend's bit for bit. The same addresses as a
user's commands (`bench.run --address ray://...`, and `--address auto` in a `ray job submit`) are
tests/integration/test_ray_client_and_jobs.py's, on a cluster started with `ray start`.
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from bench.experiment import load_dataset
from bench.loop import engine
from bench.loop.backends import SerialBackend
from bench.loop.ray_backend import RayBackend
from fedeq_bench.core.errors import BenchError
from tests.helpers import tiny_config, write_tiny_npz
from tests.integration.ray_extras import need_ray_extras

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Wall-clock and process-size metrics are measurements of the machine, not of the computation.
NONDETERMINISTIC = {"time/round_s", "mem/peak_rss_bytes"}


def has_ray_client() -> bool:
    """Ray Client (`ray://`) needs grpcio, which minimal Ray leaves out (`pip install "ray[client]"`)."""
    from ray._private.utils import get_ray_client_dependency_error

    return get_ray_client_dependency_error() is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(c, env, tmp) -> None:
    """Tear a test cluster down: this process's Ray connection, the cluster's nodes, its environment
    and temp dir."""
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()
    env.undo()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def two_nodes():
    """(cluster, Ray Client port, the cluster's RAY_TMPDIR): a head and a worker node, 1 CPU each."""
    from ray.cluster_utils import Cluster

    # Its own Ray temp dir (short: Unix socket paths are limited to 107 bytes). The head writes its
    # address to TEMP/ray/ray_current_cluster, where a run without --address on the same machine looks for
    # a running instance; tests running at the same time in other processes must not find this one.
    tmp = tempfile.mkdtemp(prefix="rn", dir="/tmp")
    env = pytest.MonkeyPatch()
    env.setenv("RAY_TMPDIR", tmp)
    env.delenv("RAY_ADDRESS", raising=False)
    client_port = free_port() if has_ray_client() else None
    head = {"num_cpus": 1}
    if client_port:
        head["ray_client_server_port"] = client_port  # what `ray start --head` listens on by default (10001)
    c = Cluster(initialize_head=True, head_node_args=head)
    try:
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c, client_port, tmp
    finally:
        stop(c, env, tmp)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_npz(tmp_path_factory.mktemp("d") / "tiny.npz", clients=7)


def node_of(actor) -> str:
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def same_numbers(a, b) -> None:
    assert len(a.history) == len(b.history)
    for x, y in zip(a.history, b.history, strict=True):
        assert {k: v for k, v in x.items() if k not in NONDETERMINISTIC} == \
               {k: v for k, v in y.items() if k not in NONDETERMINISTIC}  # exact, not approx
    assert a.ledger.entries == b.ledger.entries


@pytest.mark.parametrize("method", ["fedavg", "fedrep", "fedeq"])
def test_a_run_on_two_nodes_equals_the_serial_run(two_nodes, tiny, method):
    cluster, _, _ = two_nodes
    cfg = tiny_config(tiny, methods=method, rounds=2, fraction=1.0, frac_unseen=0.15)
    ds = load_dataset(cfg, 0)
    serial = engine.run_method(cfg, method, 0, ds, SerialBackend())
    backend = RayBackend(address=cluster.address)
    try:
        # As many 1-CPU actors as fit: one per node, so the pool spans both nodes.
        assert backend.workers == 2
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(alive) == 2
        assert {node_of(a) for a in backend.actors} == alive
        on_ray = engine.run_method(cfg, method, 0, ds, backend)
        # The dataset was put once, on the driver's node; the other node's actor pulled it from there
        # into its own object store. Both stores hold it now.
        ref = backend._puts[ds.fingerprint]
        where = ray.experimental.get_object_locations([ref])[ref]["node_ids"]
        assert set(where) == alive
    finally:
        backend.close()
    same_numbers(serial, on_ray)
    assert serial.final["acc/mean"] > 0


def test_cpus_per_client_sizes_the_pool_per_node(two_nodes):
    cluster, _, _ = two_nodes
    backend = RayBackend(address=cluster.address, cpus_per_client=0.5)
    try:
        assert backend.workers == 4                   # 1 CPU / 0.5 = 2 actors on each of 2 nodes
        nodes = [node_of(a) for a in backend.actors]
        assert sorted(nodes.count(n) for n in set(nodes)) == [2, 2]
    finally:
        backend.close()
    # 2 CPUs in the cluster, but no node has 2: not one 2-CPU actor fits (an actor cannot span nodes).
    with pytest.raises(BenchError, match=r"CPU=2, GPU=0 on 2 node\(s\): no node has enough"):
        RayBackend(address=cluster.address, cpus_per_client=2.0)
    assert not ray.is_initialized()  # the failed backend detached again


ATTACH = """
import ray
from bench.loop.ray_backend import RayBackend
b = RayBackend(address=None)
nodes = {ray.get(a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())) for a in b.actors}
print(b.workers, len(nodes))
b.close()
"""


def test_no_address_attaches_through_the_address_file_a_head_wrote(two_nodes):
    """No --address and no $RAY_ADDRESS: the address file the head wrote (as `ray start --head` does)
    leads to the running cluster. In a fresh process told the cluster's auth mode: whether this test
    cluster runs with Ray's token authentication depends on what this pytest process started before
    (Ray keeps the mode a process first used), and a driver attaching through the address file turns
    token auth on when ~/.ray/auth_token exists; an in-process attach with the other mode hangs."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    cluster, _, tmp = two_nodes
    with open(os.path.join(tmp, "ray", "ray_current_cluster")) as f:
        assert f.read().strip() == cluster.address
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # RAY_TMPDIR=tmp: from the fixture
    env.update(PYTHONPATH=ROOT, RAY_AUTH_MODE="token" if is_token_auth_enabled() else "disabled")
    proc = subprocess.run([sys.executable, "-c", ATTACH], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["2", "2"]  # two actors, one on each node


@pytest.mark.parametrize("how", ["auto", "RAY_ADDRESS"])
def test_auto_environment_and_a_running_instance_reach_the_cluster(two_nodes, tiny, how, monkeypatch):
    """--address auto with $RAY_ADDRESS (what `ray job submit` sets), and no --address with $RAY_ADDRESS."""
    cluster, _, tmp = two_nodes
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    backend = RayBackend(address="auto" if how == "auto" else None)
    try:
        assert backend.workers == 2 and len({node_of(a) for a in backend.actors}) == 2
        cfg = tiny_config(tiny, methods="fedavg", rounds=1)
        ds = load_dataset(cfg, 0)
        same_numbers(engine.run_method(cfg, "fedavg", 0, ds, SerialBackend()),
                     engine.run_method(cfg, "fedavg", 0, ds, backend))
    finally:
        backend.close()


@pytest.fixture(scope="module")
def ray_client():
    """Ray Client installed: a skip without grpcio, a failure under CI. Module-scoped and named first,
    so it is checked before the cluster starts."""
    need_ray_extras(client=True)


def test_an_actor_killed_under_ray_client_is_replaced_bit_for_bit(ray_client, two_nodes, tiny):
    """The actor-fault path (bench/loop/faults.py: ray.wait, the death exceptions, ray.kill, a replacement
    started with the dataset's object reference) through Ray Client, whose API is a proxy of Ray's:
    one actor killed after round 2's first chunk went to it, one replacement, the serial numbers."""
    _, client_port, _ = two_nodes
    cfg = tiny_config(tiny, methods="fedrep", rounds=2, fraction=1.0)
    ds = load_dataset(cfg, 0)
    backend = RayBackend(address=f"ray://127.0.0.1:{client_port}")
    try:
        # 7 clients on 2 actors: 4 chunks per call; calls 1-4 are round 1's updates, 5-8 its
        # evaluation, 9-12 round 2's updates.
        count, killed = iter(range(1, 100)), []

        def on_submit(actor, kind):  # RayBackend's fault-injection callable
            if next(count) == 10:
                killed.append(actor)
                ray.kill(actor)

        backend.on_submit = on_submit
        started = len(backend._spawned)
        on_ray = engine.run_method(cfg, "fedrep", 0, ds, backend)
        assert len(killed) == 1 and killed[0] not in backend.actors
        assert len(backend._spawned) == started + 1 and backend.workers == len(backend.actors) == 2
    finally:
        backend.close()
    same_numbers(engine.run_method(cfg, "fedrep", 0, ds, SerialBackend()), on_ray)


def test_an_unreachable_ray_client_address_is_one_line(two_nodes):
    port = free_port()  # nobody listens: refused at once, not after Ray Client's retries
    with pytest.raises(BenchError, match=rf"cannot reach a Ray cluster at 'ray://127.0.0.1:{port}'"):
        RayBackend(address=f"ray://127.0.0.1:{port}")


def test_gpu_actors_train_on_cuda_on_the_gpu_node(tiny):
    """A CPU-only head and a node with the machine's GPU: --gpus-per-client 0.5 puts two actors on the
    GPU node, each trains on CUDA, and the numbers equal the Serial backend's on the same device.
    Needs a CUDA machine (skipped elsewhere); its own cluster, so the GPU node is the only one with GPUs."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="rg", dir="/tmp")
    env = pytest.MonkeyPatch()
    env.setenv("RAY_TMPDIR", tmp)
    env.delenv("RAY_ADDRESS", raising=False)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    try:
        gpu_node = c.add_node(num_cpus=2, num_gpus=1)
        c.wait_for_nodes()
        cfg = tiny_config(tiny, methods="fedrep", rounds=2, fraction=1.0, gpus_per_client=0.5)
        ds = load_dataset(cfg, 0)
        backend = RayBackend(address=c.address, cpus_per_client=1.0, gpus_per_client=0.5)
        try:
            assert backend.workers == 2                                 # 1 GPU / 0.5; the head has none
            assert {node_of(a) for a in backend.actors} == {gpu_node.node_id}
            on_ray = engine.run_method(cfg, "fedrep", 0, ds, backend)
            assert backend.set_dataset(ds.fingerprint, ds) == "cuda"
        finally:
            backend.close()
        same_numbers(engine.run_method(cfg, "fedrep", 0, ds, SerialBackend(device="cuda")), on_ray)
    finally:
        stop(c, env, tmp)
