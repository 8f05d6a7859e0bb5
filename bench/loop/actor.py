"""The Ray actor pool's start, importable without torch, so a run can start it first thing.

An actor's own process imports torch (about a second of CPU each) when it is created. Started before
the driver imports torch and loads the data, that work runs on the cores the driver leaves idle
during its own imports, instead of after them (README: Performance, the whole-process table).

    EdgeNode     the Ray actor class: builds bench/loop/backends.py's Worker inside the actor process
    start_pool   connect to Ray, start the actors, collect their `hello()` reports: a `Pool`
    early_pool   `start_pool` in the background from a command's flags alone, before its config
                 (and torch) is loaded; bench/experiment/'s `compare` adopts it if the config
                 agrees, or discards it
"""
from __future__ import annotations

import dataclasses
from typing import Any

from bench.loop import cluster, faults
from fedeq_bench.core.errors import BenchError

POOL_KEYS = ("backend", "address", "workers", "cpus_per_client", "gpus_per_client", "device")
"""The run keys a pool is made from: an early pool is used only if the config has the same."""


class EdgeNode:
    """One edge node: a Ray actor serving whichever clients it is handed (bench/loop/backends.py Worker).

    Defined apart from Worker so the driver can create actors before it imports torch; the actor
    process imports it when it builds its Worker.
    """

    def __init__(self, threads: int, device: str | None):
        from bench.loop.backends import Worker

        self._worker = Worker(threads, device)

    def hello(self) -> dict:
        return self._worker.hello()

    def set_dataset(self, key: str, dataset) -> str:
        return self._worker.set_dataset(key, dataset)

    def run_chunk(self, *args):
        return self._worker.run_chunk(*args)


@dataclasses.dataclass
class Pool:
    """What `start_pool` started: the connection, the actor class, the actors and their reports."""

    started_here: bool
    actor_cls: Any
    actor_args: tuple
    actors: list
    reports: list[dict]

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        if self.started_here:
            ray.shutdown()


def start_pool(workers: int | None, address: str | None, cpus_per_client: float, gpus_per_client: float,
               device: str | None) -> Pool:
    """Connect to Ray (bench/loop/cluster.py: `connect`), size the pool to the cluster, start the actors and
    wait for each one's `hello()`. On a BenchError what was started is stopped again."""
    cluster.check_request(cpus_per_client, gpus_per_client)  # before starting Ray, which cannot help
    import ray

    started_here = cluster.connect(address)
    actor_cls = ray.remote(EdgeNode).options(num_cpus=cpus_per_client, num_gpus=gpus_per_client)
    pool = Pool(started_here, actor_cls, (cluster.threads_per_actor(cpus_per_client), device), [], [])
    try:
        capacity = cluster.actor_capacity(cluster.node_resources(), cpus_per_client, gpus_per_client)
        pool.actors = [actor_cls.remote(*pool.actor_args) for _ in range(cluster.pool_size(workers, capacity))]
        # An actor killed while it starts is replaced (bench/loop/faults.py), not a traceback.
        pool.actors, pool.reports = faults.greet(pool.actors, lambda: actor_cls.remote(*pool.actor_args))
    except BaseException:
        pool.close()
        raise
    return pool


def pool_keys(run) -> dict:
    return {k: getattr(run, k) for k in POOL_KEYS}


def start_pool_for(run) -> Pool:
    """`start_pool` with a RunConfig's pool keys."""
    return start_pool(run.workers, run.address, run.cpus_per_client, run.gpus_per_client, run.device)


def early_pool(config_file: str | None, flags: dict, sets: list[str]):
    """`start_pool` in a `cluster.Background` from the flags alone, or None.

    Only when no --config or --set is given (either could change the pool's keys, and reading them
    right needs every method's config, which imports torch) and the flags ask for Ray. The flags'
    values are checked by the same code as the config's; anything it refuses leaves the config's own
    resolution to say so. The Background's `keys` say what its pool is made from.
    """
    if config_file or sets:
        return None
    from bench import config as C

    try:
        run = C.apply(C.Config(run=C.RunConfig(**C.env_defaults())),
                      {k: v for k, v in flags.items() if v is not None}).run
    except (BenchError, KeyError, TypeError, ValueError):
        return None
    if run.backend != "ray":
        return None
    started = cluster.Background(lambda: start_pool_for(run), name="ray-start")
    started.keys = pool_keys(run)
    return started
