"""The Ray actor pool's start, importable without torch (bench/loop/early_pool.py starts it first
thing, before the driver imports torch).

    EdgeNode     the Ray actor class: builds bench/loop/backends.py's Worker inside the actor process
    start_pool   connect to Ray, start the actors, collect their `hello()` reports: a `Pool`
"""
from __future__ import annotations

import dataclasses
from typing import Any

from bench.loop import cluster, faults

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
