"""Connecting to a Ray cluster and sizing the actor pool on it.

`connect` starts a local Ray (sized to the machine), attaches to one already running here (`ray start
--head`, or $RAY_ADDRESS), or joins the cluster at `--address`. Every address is checked before Ray
sees it (bench/loop/addresses.py). A Ray this harness starts itself listens on 127.0.0.1 only
(bench/loop/ray_loopback.py): a single-machine run opens no port to the network. `Background` runs
such a start (with the actors' start after it: a whole pool) in a thread while the caller loads data
and imports MLflow. `actor_capacity` and
`pool_size` are pure arithmetic over the nodes' resources, so the errors a user sees for a resource
request that cannot be met are unit-tested without starting Ray. RayBackend (bench/loop/ray_backend.py)
calls them in that order.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import threading
from collections.abc import Iterable, Mapping

from bench.loop import addresses, ray_loopback
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


def _quiet_ray_loggers() -> None:
    logging.getLogger(TOKEN_AUTH_LOGGER).setLevel(logging.ERROR)
    worker_log = logging.getLogger("ray._private.worker")
    if not any(isinstance(f, _DropSigtermWarning) for f in worker_log.filters):
        worker_log.addFilter(_DropSigtermWarning())


class _DropSigtermWarning(logging.Filter):
    def filter(self, record):
        return not str(record.msg).startswith(SIGTERM_WARNING)


CLIENT_SERVER_RACE = ("Starting Ray client server failed", "ZombieProcess")
"""Ray Client's proxy starts one server per connection, on the first port of 23000-23999 it finds
free; under load, or with another Ray Client on the machine taking that port between the proxy's check
and the server's start, the connection fails with the first message. Under load its proxy also reads
the command line of a server process that has just exited (psutil's ZombieProcess, raised inside
Ray's proxier.py and sent back as "Initialization failure from server"; seen once in the suite on 2
cores). A second try gets another server."""


def connect(address: str | None) -> bool:
    """Join the Ray cluster at `address` (`auto`, `HOST:PORT`, `ray://HOST[:PORT]`); None: attach to a
    running local instance (`running_instance`) or start a local Ray with the CPUs of the machine running the harness, bound
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
    init_address, shown, why = addresses.target(address)
    if init_address is None:
        # "local": a new instance even if Ray's address file names one (checked above: not answering).
        with ray_loopback.loopback_only():
            ray.init(address="local", num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", **kw)
        return True
    if address is None:
        sys.stderr.write(f"ray: attaching to the running Ray instance at {shown} ({why})\n")
    try:
        try:
            ray.init(address=init_address, **kw)
        except ConnectionError as e:
            if not (init_address.startswith("ray://") and any(m in str(e) for m in CLIENT_SERVER_RACE)):
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

    keys: dict[str, object]
    """Set by whoever starts it, where that caller needs it (early_pool.early_pool: the run keys its pool is
    made from); absent otherwise."""

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
