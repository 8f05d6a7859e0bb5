"""bench/cluster.py: actor sizing from a cluster's node resources, and the reachability check.

Everything here is pure arithmetic or a socket: no test starts Ray (tests/integration covers that).
"""
import socket

import pytest

from fedeq_bench.bench import cluster
from fedeq_bench.core.errors import BenchError


def test_capacity_is_whole_actors_per_node_summed():
    assert cluster.actor_capacity([{"CPU": 8.0}], 1.0, 0.0) == 8
    assert cluster.actor_capacity([{"CPU": 8.0}], 3.0, 0.0) == 2                 # 8 // 3
    assert cluster.actor_capacity([{"CPU": 8.0}, {"CPU": 5.0}], 2.0, 0.0) == 4 + 2
    # An actor cannot span nodes: 2 + 2 CPUs hold no 3-CPU actor, though the cluster has 4.
    with pytest.raises(BenchError, match="CPU=4, GPU=0 on 2 node"):
        cluster.actor_capacity([{"CPU": 2.0}, {"CPU": 2.0}], 3.0, 0.0)


def test_fractions_count_in_rays_fixed_point_units():
    # In floats 1.0 // 0.1 == 9.0; Ray counts 1/10000 units and fits 10000 // 1000 = 10 actors.
    assert 1.0 // 0.1 == 9.0
    assert cluster.actor_capacity([{"CPU": 1.0}], 0.1, 0.0) == 10
    assert cluster.actor_capacity([{"CPU": 2.0}], 0.3, 0.0) == 6                 # 20000 // 3000


def test_the_scarcer_resource_limits_a_node():
    node = {"CPU": 16.0, "GPU": 2.0}
    assert cluster.actor_capacity([node], 1.0, 0.25) == min(16 // 1, 8)         # 2 / 0.25 = 8 per GPUs
    assert cluster.actor_capacity([node], 4.0, 0.25) == min(16 // 4, 8)         # 4: CPUs bind
    assert cluster.actor_capacity([node], 0.0, 0.5) == 4                        # GPU only: CPUs not asked
    # A CPU-only node holds no GPU actor, whatever its CPUs.
    assert cluster.actor_capacity([node, {"CPU": 64.0}], 1.0, 1.0) == 2


def test_requests_ray_cannot_schedule_fail_before_anything_starts():
    with pytest.raises(BenchError, match="both 0"):
        cluster.actor_capacity([{"CPU": 8.0}], 0.0, 0.0)
    with pytest.raises(BenchError, match=r"--cpus-per-client 1.5: must be .* a whole number"):
        cluster.check_request(1.5, 0.0)
    with pytest.raises(BenchError, match="--gpus-per-client -1"):
        cluster.check_request(1.0, -1.0)
    with pytest.raises(BenchError, match="--gpus-per-client 5e-05"):
        cluster.check_request(1.0, 0.00005)                                     # under Ray's 0.0001
    cluster.check_request(2.0, 0.5)                                             # whole CPUs, a GPU fraction: fine


def test_no_node_fits_one_actor_names_the_request():
    with pytest.raises(BenchError) as e:
        cluster.actor_capacity([{"CPU": 4.0}], 1.0, 1.0)
    assert str(e.value) == ("the Ray cluster has CPU=4, GPU=0 on 1 node(s): no node has enough for one actor "
                            "at --cpus-per-client 1 --gpus-per-client 1")


def test_pool_size_is_workers_or_all_that_fit():
    assert cluster.pool_size(None, 6) == 6
    assert cluster.pool_size(2, 6) == 2
    assert cluster.pool_size(6, 6) == 6
    with pytest.raises(BenchError) as e:
        cluster.pool_size(7, 6)
    assert str(e.value) == "--workers 7 exceeds what the cluster fits (6 at this per-client size)"
    with pytest.raises(BenchError, match="at least 1"):
        cluster.pool_size(0, 6)


def test_threads_are_whole_cpus_at_least_one():
    assert [cluster.threads_per_actor(c) for c in (0.25, 0.5, 1.0, 2.0, 4.0)] == [1, 1, 1, 2, 4]


def closed_after_listening(address) -> int:
    """A local port: `check_reachable(address(port))` passes while something listens on it; the port
    is returned closed, so the same address must then be refused."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        cluster.check_reachable(address(port))
    return port


def test_reachability_accepts_a_listener_and_rejects_a_closed_port():
    port = closed_after_listening(lambda p: f"127.0.0.1:{p}")
    # The same port, now closed: refused at once rather than after Ray's minutes of retries.
    with pytest.raises(BenchError) as e:
        cluster.check_reachable(f"127.0.0.1:{port}", timeout=2.0)
    assert str(e.value).startswith(f"cannot reach a Ray cluster at '127.0.0.1:{port}' (")
    assert "ray up ray_cluster.yaml" in str(e.value)


@pytest.mark.parametrize("address", ["auto", "local", "head"])
def test_addresses_ray_resolves_itself_are_not_probed(address):
    cluster.check_reachable(address, timeout=0.001)  # no host:port to dial: nothing raised


def test_a_ray_client_address_probes_its_server():
    assert cluster.client_target("ray://head:10002") == "head:10002"
    assert cluster.client_target("ray://head") == "head:10001"                  # Ray Client's default port
    assert cluster.client_target("head:6379") is None
    port = closed_after_listening(lambda p: f"ray://127.0.0.1:{p}")
    with pytest.raises(BenchError) as e:
        cluster.check_reachable(f"ray://127.0.0.1:{port}", timeout=2.0)
    assert str(e.value).startswith(f"cannot reach a Ray cluster at 'ray://127.0.0.1:{port}' (")
    assert "ray start --head" in str(e.value)


# -- attaching to a running instance -------------------------------------------------------------


def write_address_file(tmp_path, address):
    (tmp_path / "ray").mkdir(exist_ok=True)
    (tmp_path / "ray" / cluster.ADDRESS_FILE).write_text(address + "\n")


def test_ray_address_in_the_environment_wins():
    assert cluster.running_instance({"RAY_ADDRESS": "10.0.0.1:6379"}) == ("10.0.0.1:6379", "$RAY_ADDRESS")


def test_a_live_address_file_is_attached_to_and_a_stale_one_ignored(tmp_path):
    env = {"RAY_TMPDIR": str(tmp_path)}
    assert cluster.running_instance(env) is None                                # no file: start one
    with socket.socket() as gcs:
        gcs.bind(("127.0.0.1", 0))
        gcs.listen()
        address = f"127.0.0.1:{gcs.getsockname()[1]}"
        write_address_file(tmp_path, address)
        found = cluster.running_instance(env)
        assert found is not None and found[0] == address and "ray start --head" in found[1]
        # $TMPDIR is Ray's fallback for its temp dir, as in Ray's own lookup.
        assert cluster.running_instance({"TMPDIR": str(tmp_path)})[0] == address
    # The instance died without `ray stop` (which removes the file): nobody answers, start our own.
    assert cluster.running_instance(env) is None


# -- starting in the background ------------------------------------------------------------------


def test_background_hands_over_its_value_or_its_error():
    import threading

    where = []
    job = cluster.Background(lambda: where.append(threading.current_thread().name) or "backend", name="ray-start")
    assert job.result() == "backend" and where == ["ray-start"]               # ran in its own thread
    undone = []
    job.discard(undone.append)
    assert undone == []                                                         # taken: the caller owns it

    def refused():
        raise BenchError("cannot reach a Ray cluster at '127.0.0.1:1'")

    with pytest.raises(BenchError, match="cannot reach a Ray cluster at '127.0.0.1:1'"):
        cluster.Background(refused).result()


def test_discard_undoes_a_value_nobody_took_and_drops_an_error():
    undone = []
    cluster.Background(lambda: "backend").discard(undone.append)
    assert undone == ["backend"]                                                # closed, as the caller gave up

    def refused():
        raise BenchError("refused")

    cluster.Background(refused).discard(undone.append)                          # nothing raised, nothing undone
    assert undone == ["backend"]


def test_the_background_thread_outlives_its_work():
    """Ray's processes die with the thread that forked them (PR_SET_PDEATHSIG): it must not end."""
    import threading

    job = cluster.Background(lambda: None, name="ray-start-parked")
    job.result()
    assert any(t.name == "ray-start-parked" and t.is_alive() and t.daemon for t in threading.enumerate())
