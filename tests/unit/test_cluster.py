"""bench/loop/cluster.py: actor sizing from a cluster's node resources, the address checks and the
reachability probe.

Everything here is pure arithmetic, a socket or a gRPC server: no test starts Ray (tests/integration
covers that: test_bad_addresses, test_network_exposure).
"""
import os
import socket

import pytest

from bench.loop import addresses, cluster, ray_loopback
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


FORMS = addresses.ADDRESS_FORMS


@pytest.mark.parametrize("address, target", [
    ("head:6379", "head:6379"),
    ("10.0.0.5:6379", "10.0.0.5:6379"),
    ("[::1]:6379", "[::1]:6379"),
    ("ray://head", "head:10001"),                                               # Ray Client's default port
    ("ray://head:10002", "head:10002"),
    ("ray://[fe80::1]", "[fe80::1]:10001"),
    ("auto", None),                                                             # no host: resolved by `target`
    ("local", None),
])
def test_the_address_forms_ray_takes_and_the_host_port_each_dials(address, target):
    assert addresses.check_address(address) == target


@pytest.mark.parametrize("address, why", [
    ("not_an_address", "no port (a head's GCS listens on 6379: HOST:6379)"),   # Ray: ValueError traceback
    ("head:99999", "port '99999' is not a number in 1..65535"),
    ("head:0", "port '0' is not a number in 1..65535"),
    ("head:abc", "port 'abc' is not a number in 1..65535"),
    ("head:\u0663", "port '\u0663' is not a number in 1..65535"),                # an Arabic-Indic 3: isdigit() is true
    (":6379", "no host before the ':'"),
    ("::1:6379", "an IPv6 address goes in brackets: [::1]:6379"),
    ("[::1:6379", "an IPv6 address needs its closing ']'"),
    ("[head]:6379", "'head' is not an IPv6 address"),
    ("he ad:6379", "'he ad' is not a host name or IP address"),
    ("ray://head:1/x", "port '1/x' is not a number in 1..65535"),
    ("ray://:10001", "no host before the ':'"),
    ("foo://head:1", "unknown scheme 'foo://'"),                                # Ray: RuntimeError, no module foo
    ("", "empty (omit --address to start a local Ray)"),
])
def test_an_address_of_the_wrong_form_is_one_line_naming_the_valid_forms(address, why):
    with pytest.raises(BenchError) as e:
        addresses.check_address(address)
    assert str(e.value) == f"--address {address!r}: {why}; give {FORMS}"


def test_an_http_address_is_the_jobs_api_and_says_how_to_submit():
    with pytest.raises(BenchError) as e:
        addresses.check_address("http://head:8265")
    assert str(e.value).startswith("--address 'http://head:8265' is an HTTP address (the dashboard's Jobs API, "
                                   "port 8265), which bench.run does not speak: submit the run with `ray job submit "
                                   "--address http://head:8265 -- python -m bench.run ...`")
    with pytest.raises(BenchError, match="'https://head:443' is an HTTP address"):
        addresses.check_address("https://head:443")


@pytest.fixture
def grpc_server():
    """A real gRPC server (grpcio, in the dev extra through Ray Client's) on a free local port."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(None)


def test_reachability_accepts_a_grpc_server_and_refuses_a_closed_port(grpc_server):
    addresses.check_reachable(f"127.0.0.1:{grpc_server}", timeout=2.0)
    addresses.check_reachable(f"ray://127.0.0.1:{grpc_server}", timeout=2.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                                               # bound, never listening: refused
    with pytest.raises(BenchError) as e:
        addresses.check_reachable(f"127.0.0.1:{port}", timeout=2.0)
    assert str(e.value) == (f"cannot reach a Ray cluster at '127.0.0.1:{port}' (Connection refused); start one "
                            "with `ray up ray_cluster.yaml` (then --address auto on its head node, or HEAD:6379) "
                            "or omit --address to start a local Ray")
    with pytest.raises(BenchError) as e:
        addresses.check_reachable(f"ray://127.0.0.1:{port}", timeout=2.0)
    assert "(its Ray Client server listens on 10001)" in str(e.value)


def test_a_port_that_accepts_but_speaks_no_grpc_is_refused_in_the_timeout():
    """What Ray retried for 13 minutes (measured) before: a listener that is no GCS."""
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()                                                              # accepts (backlog), never answers
        port = s.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(BenchError) as e:
            addresses.check_reachable(f"127.0.0.1:{port}", timeout=1.0)
        assert time.monotonic() - start < 1.0 + 0.5
    assert str(e.value).startswith(f"'127.0.0.1:{port}' accepts connections but no gRPC server answers there "
                                   "within 1 s: not a Ray GCS (port 6379 by default)")


def test_a_bad_form_is_refused_before_any_dial():
    with pytest.raises(BenchError, match="port '99999'"):
        addresses.check_reachable("127.0.0.1:99999", timeout=0.001)


@pytest.mark.parametrize("address", ["auto", "local"])
def test_addresses_ray_resolves_itself_are_not_dialled(address):
    addresses.check_reachable(address, timeout=0.001)  # no host:port to dial: nothing raised


def test_a_ray_client_address_dials_its_server():
    assert addresses.check_address("ray://head:10002") == "head:10002"
    assert addresses.check_address("ray://head") == "head:10001"  # Ray Client's default port


def test_an_http_server_is_no_grpc_server_and_is_refused():
    """grpcio's channel never becomes READY against a server that answers HTTP/1 (a dashboard, a web
    page at the wrong port): refused within the timeout, like a silent listener."""
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    server.RequestHandlerClass.log_message = lambda *a: None  # quiet: it answers 505 to HTTP/2
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(BenchError, match="accepts connections but no gRPC server answers there within 1 s"):
            addresses.check_reachable(f"127.0.0.1:{server.server_port}", timeout=1.0)
    finally:
        server.shutdown()


# -- attaching to a running instance -------------------------------------------------------------


def write_address_file(tmp_path, address):
    (tmp_path / "ray").mkdir(exist_ok=True)
    (tmp_path / "ray" / addresses.ADDRESS_FILE).write_text(address + "\n")


def test_ray_address_in_the_environment_wins():
    assert addresses.running_instance({"RAY_ADDRESS": "10.0.0.1:6379"}) == ("10.0.0.1:6379", "$RAY_ADDRESS")


def test_ray_address_in_the_environment_is_checked_like_the_flag(tmp_path):
    with pytest.raises(BenchError) as e:
        addresses.running_instance({"RAY_ADDRESS": "not_an_address"})
    assert str(e.value).startswith("$RAY_ADDRESS 'not_an_address': no port")
    # `local` there means a new local Ray; `auto` names nothing, so the address file is looked for.
    assert addresses.running_instance({"RAY_ADDRESS": "local", "RAY_TMPDIR": str(tmp_path)}) is None
    assert addresses.running_instance({"RAY_ADDRESS": "auto", "RAY_TMPDIR": str(tmp_path)}) is None


def test_a_live_address_file_is_attached_to_and_a_stale_one_ignored(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    env = {"RAY_TMPDIR": str(tmp_path)}
    assert addresses.running_instance(env) is None                                # no file: start one
    gcs = grpc.server(ThreadPoolExecutor(max_workers=1))                       # a gRPC server, as a GCS is
    address = f"127.0.0.1:{gcs.add_insecure_port('127.0.0.1:0')}"
    gcs.start()
    try:
        write_address_file(tmp_path, address)
        found = addresses.running_instance(env)
        assert found is not None and found[0] == address and "ray start --head" in found[1]
        # $TMPDIR is Ray's fallback for its temp dir, as in Ray's own lookup.
        assert addresses.running_instance({"TMPDIR": str(tmp_path)})[0] == address
        assert addresses.target("auto", env) == ("auto", address, found[1])      # joined as "auto" (token auth)
        assert addresses.target(None, env) == ("auto", address, found[1])
        assert addresses.target("local", env) == (None, None, "a new local Ray")  # whatever runs
    finally:
        gcs.stop(None)
    # The instance died without `ray stop` (which removes the file): nobody answers, start our own.
    assert addresses.running_instance(env) is None
    assert addresses.target(None, env) == (None, None, "a new local Ray")


def test_auto_with_no_ray_on_this_machine_is_refused(tmp_path):
    """Ray's own `auto` would fall back to any GCS process it finds (another user's local Ray)."""
    with pytest.raises(BenchError) as e:
        addresses.target("auto", {"RAY_TMPDIR": str(tmp_path)})
    assert str(e.value).startswith("--address auto: no Ray runs on this machine (no $RAY_ADDRESS, and no live "
                                   "`ray start --head` recorded)")


def test_an_explicit_address_is_checked_and_dialled_by_target(grpc_server):
    assert addresses.target(f"127.0.0.1:{grpc_server}", {}) == (f"127.0.0.1:{grpc_server}",) * 2 + ("--address",)
    with pytest.raises(BenchError, match="unknown scheme"):
        addresses.target("foo://x", {})


def test_loopback_only_is_put_back_after_the_start(monkeypatch):
    """Also the canary of bench/loop/ray_loopback.py, the one use of Ray's private internals: if a Ray
    release moves or renames ENABLE_RAY_CLUSTER or stops honouring it, this fails here, by name."""
    from ray._private import ray_constants

    assert hasattr(ray_constants, "ENABLE_RAY_CLUSTER"), "Ray moved its single-machine switch: see ray_loopback.py"

    monkeypatch.delenv(ray_loopback.LOOPBACK_ENV, raising=False)
    before = ray_constants.ENABLE_RAY_CLUSTER
    with ray_loopback.loopback_only():
        assert ray_constants.ENABLE_RAY_CLUSTER is False and os.environ[ray_loopback.LOOPBACK_ENV] == "0"
        from ray._private.services import resolve_ip_for_localhost

        assert resolve_ip_for_localhost("127.0.0.1") == "127.0.0.1"            # not the routable address
    assert ray_constants.ENABLE_RAY_CLUSTER is before and ray_loopback.LOOPBACK_ENV not in os.environ


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
