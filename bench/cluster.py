"""Connecting to a Ray cluster and sizing the actor pool on it.

`connect` starts a local Ray (sized to this machine) or joins the cluster at `--address`, failing
fast with one line when nobody listens there. `actor_capacity` and `pool_size` are pure arithmetic
over the nodes' resources, so the errors a user sees for a resource request that cannot be met are
unit-tested without starting Ray. RayBackend (bench/backends.py) calls them in that order.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Iterable, Mapping

from fedeq_bench.core.errors import BenchError

# Ray keeps resource quantities as fixed-point integers of 1/10000 ("the precision of the fractional
# resource requirement is 0.0001", Ray's resources guide). Counting in the same units avoids float
# floor division's surprises: 1.0 // 0.1 == 9.0, yet Ray fits ten 0.1-CPU actors on one CPU.
RESOURCE_UNITS = 10_000

# Ray logs on every start that token authentication is on (it stays on); silence that one logger so
# stderr keeps only real problems.
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a `host:port` nobody listens on (Ray itself retries for minutes).

    `auto`, `local` and `ray://` client addresses are Ray's to resolve and are not checked here.
    """
    import socket

    if address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as e:
        raise BenchError(
            f"cannot reach a Ray cluster at {address!r} ({e}); start one with `ray up ray_cluster.yaml` "
            "(then --address auto on its head node) or omit --address to start a local Ray"
        ) from None


def connect(address: str | None) -> bool:
    """Join the Ray cluster at `address`, or start a local Ray with this machine's CPUs when None.

    Returns whether this call started Ray (the caller then shuts it down); False when Ray was
    already initialized in this process, whoever did it.
    """
    import ray

    logging.getLogger(TOKEN_AUTH_LOGGER).setLevel(logging.ERROR)
    if ray.is_initialized():
        return False
    kw: dict = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    if address:
        check_reachable(address)
        kw["address"] = address
    else:
        kw["num_cpus"] = os.cpu_count()
    try:
        ray.init(**kw, runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
    except ConnectionError as e:
        raise BenchError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
    return True


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
