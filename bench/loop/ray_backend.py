"""RayBackend: a pool of Ray actors (edge nodes) running client work, results in job order; an actor
that dies mid-call is replaced and its jobs redone with the same bits (bench/loop/faults.py)."""
from __future__ import annotations

import dataclasses
import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.loop import faults
from bench.loop.backends import CHUNKS_PER_WORKER, WORK_OF, Job, Kind, Result
from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.types import MethodSpec
from fedeq_bench.datasets.base import FederatedDataset

if TYPE_CHECKING:
    from bench.loop.actor import Pool


class RayBackend:
    """A pool of Ray actors, each one an edge node serving whichever clients it is handed.

    Results come back in job order: the engine aggregates in client-id order whatever order the
    actors finish in. An actor that dies mid-call is replaced and its clients' work redone, bit for
    bit (bench/loop/faults.py); every actor must run the driver's version of fedeq-bench.
    """

    name = "ray"
    _pool: Pool
    _version: str
    _puts: dict[str, Any]
    """Dataset key -> object ref, shared with `split` parts."""
    _dataset_key: str | None
    _device: str | None

    def __init__(self, workers: int | None = None, address: str | None = None, cpus_per_client: float = 1.0,
                 gpus_per_client: float = 0.0, device: str | None = None, pool=None,
                 on_submit: Callable[[Any, Kind], None] | None = None, _part_of: RayBackend | None = None,
                 _actors: list | None = None):
        """Connect and start the actors (bench/loop/actor.py: `start_pool`), or take a `pool` started already
        (`compare` starts one before loading torch and the data; the other arguments are then unused).

        `on_submit(actor, kind)`: called right after each chunk of jobs of that Kind goes to `actor`
        (the actor-fault tests kill the actor there, a moment they cannot time from outside).
        `_part_of` and `_actors` are `split`'s: a part serves `_actors` of the whole's pool."""
        import ray

        self._ray = ray
        self.on_submit = on_submit
        self._dataset_key, self._device = None, None
        if _part_of is not None:  # split: the same connection, actors checked already, datasets shared
            whole = _part_of
            # The same actor list (replacements join it); a part never stops the Ray its whole started.
            self._pool = dataclasses.replace(whole._pool, started_here=False)
            self._version, self._puts = whole._version, whole._puts
            self.actors: list = list(_actors or [])
            self.workers = len(self.actors)
            return
        if pool is None:
            from bench.loop import actor as A

            pool = A.start_pool(workers, address, cpus_per_client, gpus_per_client, device)
        self._pool = pool  # its `actors`: every one started, replacements too (shared with `split` parts)
        self._version = faults.project_version()
        self.actors = list(pool.actors)  # the ones serving now
        self._puts = {}  # dataset key -> object ref, shared with `split` parts
        try:
            for actor, report in zip(self.actors, pool.reports, strict=True):
                self._check_version(actor, report)
        except BenchError:
            self.close()
            raise
        self.workers = len(self.actors)

    @property
    def _spawned(self) -> list:
        """Every actor this pool started, replacements too: what `close()` stops."""
        return self._pool.actors

    def _spawn(self):
        actor = self._pool.actor_cls.remote(*self._pool.actor_args)
        self._pool.actors.append(actor)
        return actor

    def _check_version(self, actor, report: dict) -> None:
        """Refuse `actor` (its `hello()` report) if it runs another fedeq-bench than this driver."""
        if report["version"] != self._version:
            # A commit to this checkout between the two reports changes both: ask both once more, so
            # only a real difference (a stale node) is refused.
            self._version = faults.project_version()
            report = self._ray.get(actor.hello.remote())
        faults.check_version(self._version, report)

    def split(self, n: int) -> list[RayBackend]:
        """`n` backends over disjoint parts of this pool, for `n` runs at once (a sweep's parallel
        trials): each part has at least one actor, and one thread at a time may use it; results do not
        depend on how many actors serve a run. They share the Ray connection and the datasets put so
        far; `close()` this backend, not its parts."""
        if not 1 <= n <= len(self.actors):
            raise BenchError(f"{n} runs at once need at least {n} Ray actors; the pool has {len(self.actors)} "
                             f"(raise --workers, lower --cpus-per-client, or run fewer at once)")
        return [RayBackend(on_submit=self.on_submit, _part_of=self, _actors=self.actors[i::n]) for i in range(n)]

    def set_dataset(self, key: str, dataset: FederatedDataset) -> str:
        if key != self._dataset_key:
            ref = self._puts.get(key)
            if ref is None:  # once per dataset; actors read client arrays zero-copy from it
                ref = self._puts[key] = self._ray.put(dataset)
            self._dataset_key = key  # first: a replacement started below loads it too
            for actor, call in [(a, a.set_dataset.remote(key, ref)) for a in self.actors]:
                try:
                    self._device = self._ray.get(call)
                except faults.actor_deaths():
                    self._replace(actor)
        assert self._device is not None  # some actor (or its replacement) took the dataset, or none is left
        return self._device

    def run(self, kind: Kind, spec: MethodSpec, jobs: list[Job], seed: int, rnd: int,
            measure: frozenset = frozenset()) -> Iterable[Result]:
        """`Worker.run` for every job on the pool; results in job order, as they become ready.

        Clients go to actors in contiguous chunks, CHUNKS_PER_WORKER per actor and call: one Ray
        call per chunk instead of one per client (a call costs ~1 ms, a 1 MB object ~2 ms on this
        machine; see bench/perf/__main__.py), while the pool still balances unequal chunks.
        """
        ray = self._ray
        refs: dict[bytes, Any] = {}
        sent = []
        for job in jobs:
            ref = refs.get(job.payload)
            if ref is None:  # one object per distinct payload per call, shared by every client
                ref = refs[job.payload] = ray.put(np.frombuffer(job.payload, dtype=np.uint8))  # zero-copy on read
            sent.append(dataclasses.replace(job, payload=ref))
        n = min(len(sent), self.workers * CHUNKS_PER_WORKER)
        bounds = [round(i * len(sent) / n) for i in range(n + 1)] if n else [0]
        chunks = [list(range(a, b)) for a, b in itertools.pairwise(bounds)]  # positions in `jobs`

        def call(actor, chunk: list[int]):
            return actor.run_chunk.remote(kind, spec, [sent[p] for p in chunk], seed, rnd, measure)

        # A generator: the engine decodes one chunk's results while actors still work on the next.
        return self._results(call, chunks, [job.cid for job in jobs], kind)

    def _results(self, call, chunks: list[list[int]], cids: list[int], kind: Kind) -> Iterable[Result]:
        """Each idle actor takes the next chunk; yields every job's Result in job order.

        Our own loop rather than Ray's ActorPool: `ActorPool.map` raises on the first dead actor and
        is unusable afterwards, with the lost chunk's work gone. Here a dead actor is replaced
        (`_replace`) and its chunk goes back to the front of the queue, one job per chunk, so a
        client whose work kills its actor again and again is the one named (faults.killed).
        Nor Ray's own `max_restarts` / `max_task_retries`: a restarted actor reruns only `__init__`
        (no dataset, no version check), and a retry that keeps failing ends in Ray's traceback,
        naming no client.
        """
        ray, deaths_of = self._ray, faults.actor_deaths()
        waiting = deque(chunks)
        idle = list(self.actors)
        running: dict[Any, tuple[Any, list[int]]] = {}  # object ref -> (actor, chunk)
        ready: dict[int, Result] = {}
        deaths: Counter[int] = Counter()  # job position -> deaths of actors that were running it
        nxt = 0
        while True:
            while idle and waiting:
                actor, chunk = idle.pop(0), waiting.popleft()
                running[call(actor, chunk)] = (actor, chunk)
                if self.on_submit is not None:
                    self.on_submit(actor, kind)
            while nxt in ready:
                yield ready.pop(nxt)
                nxt += 1
            if nxt == len(cids):
                return
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, chunk = running.pop(ref)
            try:
                ready.update(zip(chunk, ray.get(ref), strict=True))
                idle.append(actor)
                continue
            except deaths_of:
                pass
            fresh = self._replace(actor)
            if fresh is not None:
                idle.append(fresh)
            deaths.update(chunk)
            if len(chunk) > 1:  # whose work killed it is unknown: redo each job alone
                waiting.extendleft([p] for p in reversed(chunk))
            elif deaths[chunk[0]] > faults.MAX_ACTOR_RETRIES:
                ready[chunk[0]] = Result(cids[chunk[0]], error=faults.killed(WORK_OF[kind], deaths[chunk[0]]))
            else:
                waiting.appendleft(chunk)

    def _replace(self, dead):
        """A fresh actor with `dead`'s resources and this backend's dataset, in its place; None when
        none starts within faults.ACTOR_START_TIMEOUT_S (a cluster that lost a node may have no room)
        and other actors remain."""
        ray = self._ray
        ray.kill(dead)  # an unavailable actor might come back; it must not serve anyone again
        self.actors.remove(dead)
        actor = self._spawn()
        calls = [actor.hello.remote()]
        if self._dataset_key is not None:
            calls.append(actor.set_dataset.remote(self._dataset_key, self._puts[self._dataset_key]))
        try:
            report, *device = ray.get(calls, timeout=faults.ACTOR_START_TIMEOUT_S)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnschedulableError, *faults.actor_deaths()):
            ray.kill(actor)
            if not self.actors:
                raise BenchError(f"every Ray actor died and no new one started within "
                                 f"{faults.ACTOR_START_TIMEOUT_S:g} s; is the cluster still up (`ray status`)?") from None
            return None
        self._check_version(actor, report)
        self._device = device[0] if device else self._device
        self.actors.append(actor)
        return actor

    def close(self):
        self._pool.close()
