"""Connecting to a Ray cluster and sizing the actor pool on it.

`connect` starts a local Ray (sized to this machine), attaches to one already running here (`ray start
--head`, or $RAY_ADDRESS), or joins the cluster at `--address`. Every address is checked before Ray
sees it (`check_address`: its form, then that a gRPC server answers there), so a typo or a dead head
is one line in seconds rather than Ray's ValueError traceback or minutes of silent retries. A Ray
this harness starts itself listens on 127.0.0.1 only (`loopback_only`): a single-machine run opens
no port to the network. `Background` runs such a start (with the actors' start after it: a whole
RayBackend) in a thread while the caller loads data and imports MLflow. `actor_capacity` and
`pool_size` are pure arithmetic over the nodes' resources, so the errors a user sees for a resource
request that cannot be met are unit-tested without starting Ray. RayBackend (bench/loop/backends.py)
calls them in that order.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import re
import socket
import sys
import threading
from collections.abc import Iterable, Mapping

from fedeq_bench.core.errors import BenchError

# Ray keeps resource quantities as fixed-point integers of 1/10000 ("the precision of the fractional
# resource requirement is 0.0001", Ray's resources guide). Counting in the same units avoids float
# floor division's surprises: 1.0 // 0.1 == 9.0, yet Ray fits ten 0.1-CPU actors on one CPU.
RESOURCE_UNITS = 10_000

# Ray logs on every start that token authentication is on (it stays on); silence that one logger so
# stderr keeps only real problems.
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"

# ray.init outside the main thread warns that it did not install its SIGTERM handler. That handler
# (sys.exit) would replace bench/cli.py's (SIGTERM as Ctrl-C, runs marked KILLED), so not installing
# it is what we want; drop that one warning.
SIGTERM_WARNING = "SIGTERM handler is not set"

ADDRESS_FILE = "ray_current_cluster"
"""Where `ray start --head` records its address, in Ray's temp dir ($RAY_TMPDIR, else /tmp, + /ray);
`ray stop` removes it. ray.init() reads the same file."""

GCS_PORT = 6379
"""The port `ray start --head` gives its GCS unless told otherwise (what `HOST:PORT` names)."""

CLIENT_PORT = 10001
"""Ray Client's default port on the head (`ray://HOST` without a port)."""

ADDRESS_FORMS = (f"auto (the Ray running on this machine), local (a new one), HOST:PORT (a head's GCS, port "
                 f"{GCS_PORT} by default) or ray://HOST[:PORT] (Ray Client, port {CLIENT_PORT} by default)")
"""The addresses `--address` and $RAY_ADDRESS take, as every refusal names them."""

# A host name (RFC 1123 labels; `_` too, which some container and cloud names carry) or an IPv4
# address; an IPv6 address goes in brackets and is checked by `ipaddress`.
_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")

PROBE_TIMEOUT_S = 5.0
"""How long a head may take to accept a connection and answer as a gRPC server before the address
is refused (Ray itself retries a silent or wrong address for minutes)."""

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch for a single-machine Ray (its default on macOS and Windows): with it off, Ray takes
127.0.0.1 as the node's address and its GCS, raylet, agents, workers and driver listen there only."""

# The HTTP/2 connection preface and an empty SETTINGS frame (RFC 9113 sections 3.4 and 6.5): what a
# gRPC client sends first. A gRPC server (Ray's GCS, Ray Client's server) answers with a SETTINGS
# frame of its own; anything else (another service, a port that accepts and stays silent) does not.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_H2_SETTINGS = 4


def _refuse(address: str, source: str, why: str) -> BenchError:
    return BenchError(f"{source} {address!r}: {why}; give {ADDRESS_FORMS}")


def _host_port(hostport: str, default_port: int | None) -> tuple[str, int]:
    """(host, port) of `HOST:PORT`, `[IPv6]:PORT` or, with a default port, `HOST`; ValueError(why)."""
    if hostport.startswith("["):
        host, close, rest = hostport[1:].partition("]")
        if not close:
            raise ValueError("an IPv6 address needs its closing ']'")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise ValueError(f"{rest!r} after the IPv6 address")
        port = rest[1:] if rest else None
    else:
        host, colon, port = hostport.rpartition(":")
        if not colon:
            host, port = hostport, None
        if ":" in host:
            raise ValueError("an IPv6 address goes in brackets: [::1]:6379")
        if not _HOST.fullmatch(host):
            raise ValueError(f"{host!r} is not a host name or IP address" if host else "no host before the ':'")
    if port is None:
        if default_port is None:
            raise ValueError(f"no port (a head's GCS listens on {GCS_PORT}: HOST:{GCS_PORT})")
        return host, default_port
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"port {port!r} is not a number in 1..65535")
    return host, int(port)


def check_address(address: str, source: str = "--address") -> str | None:
    """Refuse an address Ray would reject with a traceback or misread; returns the `host:port` to
    dial (a Ray Client server or a GCS), or None for `auto` and `local`, which name no host.

    `source` is where the address came from (`--address`, `$RAY_ADDRESS`), for the message.
    """
    if address in ("auto", "local"):
        return None
    if not address:
        raise _refuse(address, source, "empty (omit --address to start a local Ray)")
    scheme, sep, rest = address.partition("://")
    if sep and scheme in ("http", "https"):
        raise BenchError(f"{source} {address!r} is an HTTP address (the dashboard's Jobs API, port 8265), which "
                         f"bench.run does not speak: submit the run with `ray job submit --address {address} "
                         f"-- python -m bench.run ...` (it runs with $RAY_ADDRESS set), or give {ADDRESS_FORMS}")
    if sep and scheme != "ray":
        raise _refuse(address, source, f"unknown scheme {scheme + '://'!r}")
    try:
        host, port = _host_port(rest if sep else address, CLIENT_PORT if sep else None)
    except ValueError as e:
        raise _refuse(address, source, str(e)) from None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def client_target(address: str) -> str | None:
    """`host:port` of a `ray://host[:port]` Ray Client address (port 10001 if left out); None otherwise."""
    if not address.startswith("ray://"):
        return None
    return check_address(address)


def _split(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


def _tls() -> bool:
    """Whether Ray's gRPC runs over TLS ($RAY_USE_TLS, Ray's own test of it): then the plain HTTP/2
    probe cannot tell a gRPC server and only the TCP connection is checked."""
    return os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")


def _answers_grpc(sock: socket.socket, timeout: float) -> bool:
    """Whether the peer of `sock` answers an HTTP/2 preface with a SETTINGS frame (a gRPC server)."""
    sock.settimeout(timeout)
    try:
        sock.sendall(_H2_PREFACE)
        head = b""
        while len(head) < 9:  # a frame header: length (3), type (1), flags (1), stream (4)
            chunk = sock.recv(9 - len(head))
            if not chunk:
                return False
            head += chunk
    except OSError:  # timed out, reset
        return False
    return head[3] == _H2_SETTINGS


def check_reachable(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast, with one line, on an address where no Ray answers: nobody listens there, or what
    listens is no gRPC server (Ray itself retries such an address for minutes).

    The address's form is checked first (`check_address`); `auto` and `local` name no host and are
    not dialled here (`target` resolves `auto`).
    """
    target = check_address(address)
    if target is None:
        return
    host, port = _split(target)
    client = address.startswith("ray://")
    hint = (f"start the head with `ray start --head` (its Ray Client server listens on {CLIENT_PORT})" if client else
            f"start one with `ray up ray_cluster.yaml` (then --address auto on its head node, or HEAD:{GCS_PORT})")
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if _tls() or _answers_grpc(sock, timeout):
                return
    except OSError as e:
        raise BenchError(f"cannot reach a Ray cluster at {address!r} ({e.strerror or e}); {hint} "
                         "or omit --address to start a local Ray") from None
    what = f"Ray Client server (port {CLIENT_PORT} by default)" if client else f"Ray GCS (port {GCS_PORT} by default)"
    raise BenchError(f"{address!r} accepts connections but no gRPC server answers there within {timeout:g} s: "
                     f"not a {what}; {hint} or omit --address to start a local Ray")


def _listening(target: str, timeout: float = 0.5) -> bool:
    try:
        check_reachable(target, timeout)
        return True
    except BenchError:
        return False


def running_instance(env: Mapping[str, str] | None = None, temp_dir: str | None = None) -> tuple[str, str] | None:
    """The Ray instance a run without --address attaches to, as (address, why), or None: start one.

    $RAY_ADDRESS first (`ray job submit` sets it for its entrypoint; a user may too; checked like
    --address; `local` there means: start one, `auto`: look further), then the address `ray start --head` recorded
    on this machine, if its GCS still answers: a file left by an instance that died is ignored
    rather than waited on. This is the order ray.init() itself uses.
    """
    env = os.environ if env is None else env
    named = env.get("RAY_ADDRESS")
    if named:
        check_address(named, "$RAY_ADDRESS")
        if named == "local":
            return None
        if named != "auto":  # "auto" there names nothing: look for `ray start --head`'s file below
            return named, "$RAY_ADDRESS"
    if temp_dir is None:
        base = env.get("RAY_TMPDIR") or env.get("TMPDIR") or "/tmp"
        temp_dir = os.path.join(base, "ray")
    try:
        with open(os.path.join(temp_dir, ADDRESS_FILE)) as f:
            address = f.read().strip()
    except OSError:
        return None
    if address and _listening(address):
        return address, "started by `ray start --head`; `ray stop` ends it"
    return None


def target(address: str | None, env: Mapping[str, str] | None = None) -> tuple[str | None, str | None, str]:
    """Where `connect(address)` goes, checked: (the address for ray.init, None to start a local Ray;
    the address to show; why). Raises BenchError, in seconds, for an address of the wrong form, one
    nobody answers at, and `auto` with no Ray to find on this machine.

    An instance found without an explicit address (or through `auto`) is joined as "auto", which Ray
    resolves to the same instance (same order): Ray turns its token authentication on only for an
    instance it finds itself, never for an explicit address, and `ray start --head` starts one with
    it on.
    """
    if address is not None:
        check_address(address)
    if address == "local":
        return None, None, "a new local Ray"
    if address is None or address == "auto":
        found = running_instance(env)
        if found is None:
            if address == "auto":
                raise BenchError("--address auto: no Ray runs on this machine (no $RAY_ADDRESS, and no live "
                                 "`ray start --head` recorded); start one with `ray start --head`, give "
                                 f"HOST:{GCS_PORT} or ray://HOST:{CLIENT_PORT}, or omit --address to start a local Ray")
            return None, None, "a new local Ray"
        shown, why = found
        check_reachable(shown)
        return "auto", shown, why
    check_reachable(address)
    return address, address, "--address"


@contextlib.contextmanager
def loopback_only():
    """Within: a Ray started by ray.init binds every port of its processes to 127.0.0.1.

    ray.init(_node_ip_address="127.0.0.1") alone does not: Ray replaces a loopback node address by
    the machine's routable one (services.resolve_ip_for_localhost) unless single-machine mode is on,
    and its servers listen on all interfaces unless the node address is 127.0.0.1 (GcsServer,
    NodeManager, ObjectManager, CoreWorker: `listen_to_localhost_only`; the dashboard agent likewise).
    The constant is read at ray's import, so it is set on the imported module too; the environment
    variable carries the same setting to the processes this start spawns. Both are put back after:
    a later ray.init in this process (a cluster) must announce the routable address again.
    """
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = saved_env


def _quiet_ray_loggers() -> None:
    logging.getLogger(TOKEN_AUTH_LOGGER).setLevel(logging.ERROR)
    worker_log = logging.getLogger("ray._private.worker")
    if not any(isinstance(f, _DropSigtermWarning) for f in worker_log.filters):
        worker_log.addFilter(_DropSigtermWarning())


class _DropSigtermWarning(logging.Filter):
    def filter(self, record):
        return not str(record.msg).startswith(SIGTERM_WARNING)


CLIENT_SERVER_RACE = "Starting Ray client server failed"
"""Ray Client's proxy starts one server per connection, on the first port of 23000-23999 it finds
free; under load, or with another Ray Client on the machine taking that port between the proxy's check
and the server's start, the connection fails with this message. A second try gets another server."""


def connect(address: str | None) -> bool:
    """Join the Ray cluster at `address` (`auto`, `HOST:PORT`, `ray://HOST[:PORT]`); None: attach to a
    running local instance (`running_instance`) or start a local Ray with this machine's CPUs, bound
    to 127.0.0.1; `local`: start one whatever runs. Checked first (`target`).

    Returns whether this call initialized Ray in this process (the caller then calls ray.shutdown(),
    which stops a Ray it started and only detaches from a running one); False when Ray was already
    initialized, whoever did it. Called from a thread other than the main one, it must stay alive
    while Ray is used (see `Background`).
    """
    import ray

    _quiet_ray_loggers()
    if ray.is_initialized():
        return False
    kw: dict = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=True,
                    runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
    init_address, shown, why = target(address)
    if init_address is None:
        # "local": a new instance even if Ray's address file names one (checked above: not answering).
        with loopback_only():
            ray.init(address="local", num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", **kw)
        return True
    if address is None:
        sys.stderr.write(f"ray: attaching to the running Ray instance at {shown} ({why})\n")
    try:
        try:
            ray.init(address=init_address, **kw)
        except ConnectionError as e:
            if not (init_address.startswith("ray://") and CLIENT_SERVER_RACE in str(e)):
                raise
            ray.init(address=init_address, **kw)  # once more: the proxy's own start failed (see CLIENT_SERVER_RACE)
    except ConnectionError as e:
        raise BenchError(f"cannot connect to the Ray cluster at {shown!r}: {e} (a cluster with token "
                         "authentication, Ray's default, needs RAY_AUTH_MODE=token and its token in "
                         "~/.ray/auth_token)") from None
    return True


class Background:
    """`fn()` in a thread, for work that overlaps the caller's (starting Ray and its actors while the
    data loads); `result()` returns its value or raises its error, `discard(undo)` gives it up.

    The thread is a daemon that stays parked once `fn` returns: Ray starts its processes (GCS,
    raylet, agents) with PR_SET_PDEATHSIG, which Linux sends when the *thread* that forked them ends,
    not the process, so a thread that returned would take the local Ray down with it. At exit, Ray's
    own atexit hook stops them; `result` and `discard` wait for `fn`, so no caller leaves mid-start.
    """

    def __init__(self, fn, name: str = "background"):
        self._fn = fn
        self._value = None
        self._error: BaseException | None = None
        self._taken = False
        self._done = threading.Event()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as e:  # handed to whoever waits
            self._error = e
        finally:
            self._done.set()
        threading.Event().wait()  # parked for the life of the process (see the class doc)

    def result(self):
        self._done.wait()
        self._taken = True
        if self._error is not None:
            raise self._error
        return self._value

    def discard(self, undo) -> None:
        """The caller gave up (bad data, Ctrl-C): wait for `fn`, then `undo(value)` if it succeeded
        and nobody took its value. Its error, if any, is dropped: the caller's own error wins."""
        self._done.wait()
        if not self._taken and self._error is None:
            self._taken = True
            undo(self._value)


def node_resources() -> list[dict[str, float]]:
    """The resources of every live node of the connected cluster (one dict per node)."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _units(x: float) -> int:
    return round(x * RESOURCE_UNITS)


def check_request(cpus_per_client: float, gpus_per_client: float) -> None:
    """Reject a per-client request Ray cannot schedule, before anything starts."""
    if cpus_per_client <= 0 and gpus_per_client <= 0:
        raise BenchError("cpus_per_client and gpus_per_client are both 0; give each actor some CPU or GPU")
    for flag, x in (("--cpus-per-client", cpus_per_client), ("--gpus-per-client", gpus_per_client)):
        # Ray's own rules, which Ray raises as a ValueError with a traceback when the actor is declared.
        if x < 0 or 0 < x < 1 / RESOURCE_UNITS or (x > 1 and x != int(x)):
            raise BenchError(f"{flag} {x:g}: must be 0, a fraction in [{1 / RESOURCE_UNITS:g}, 1] or a whole "
                             "number (Ray's rule)")


def actor_capacity(nodes: Iterable[Mapping[str, float]], cpus_per_client: float, gpus_per_client: float) -> int:
    """How many actors of `cpus_per_client` CPUs and `gpus_per_client` GPUs fit on these nodes.

    Counted per node and summed, because an actor cannot span nodes: two nodes of 2 CPUs fit no
    3-CPU actor although the cluster has 4 CPUs. Raises a BenchError for a request Ray cannot
    schedule (`check_request`) and when not one actor fits.
    """
    check_request(cpus_per_client, gpus_per_client)
    nodes = list(nodes)
    request = {k: _units(v) for k, v in (("CPU", cpus_per_client), ("GPU", gpus_per_client)) if v > 0}
    capacity = sum(min(_units(node.get(k, 0.0)) // need for k, need in request.items()) for node in nodes)
    if capacity < 1:
        total = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
        raise BenchError(
            f"the Ray cluster has CPU={total['CPU']:g}, GPU={total['GPU']:g} on {len(nodes)} node(s): no node "
            f"has enough for one actor at --cpus-per-client {cpus_per_client:g} "
            f"--gpus-per-client {gpus_per_client:g}"
        )
    return capacity


def pool_size(workers: int | None, capacity: int) -> int:
    """`--workers` if the cluster fits that many actors, else an error; None: as many as fit."""
    if workers is None:
        return capacity
    if workers < 1:
        raise BenchError(f"--workers {workers}: must be at least 1 (or omitted: as many as the cluster fits)")
    if workers > capacity:
        raise BenchError(f"--workers {workers} exceeds what the cluster fits ({capacity} at this per-client size)")
    return workers


def threads_per_actor(cpus_per_client: float) -> int:
    """Torch threads of one client's work: its whole CPUs, at least one (Serial uses the same count)."""
    return max(1, math.floor(cpus_per_client))
