"""Where client work runs: `SerialBackend` (in this process) or `RayBackend` (Ray actors as edge nodes).

One protocol: `backend.run(kind, spec, jobs, seed, rnd, measure)` runs one `Kind` of client work
(a local update, an evaluation, a held-out client's personalization and evaluation) for every `Job`
and returns one `Result` per job, in job order (the engine hands jobs in client-id order). Both
backends hand every job to the same `Worker.run`, with the same torch thread count, so Serial and
Ray runs are bit-identical.

A job carries everything a client needs: the encoded downlink (bytes, decoded on the worker, so a
method sees only what was sent) and the client's state (owned by the engine's client store, never
kept on a worker: one actor serves many clients); (seed, round, client id) name its random stream.
The dataset is put in Ray's object store once per dataset; each distinct downlink payload is put
once per call and shared by every client that receives it. Because a job carries everything, a Ray
actor that dies mid-call is replaced and its jobs redone with the same bits (bench/loop/faults.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import itertools
import os
import warnings
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bench.loop import cluster, divergence, faults, memory, wire
from fedeq_bench.core import seeding
from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.types import ClientTensors, MethodSpec, State
from fedeq_bench.datasets.base import ClientData, FederatedDataset

CHUNKS_PER_WORKER = 2
"""Ray calls per actor and `run`: fewer calls cost less overhead, more let the pool balance."""

METHOD_CACHE_SIZE = 4
"""Built methods a worker keeps (least recently used dropped first). Each holds a scratch network on
the worker's device (ResNet-34: ~85 MB), and a sweep builds a new spec per trial, so an unbounded
cache grows by a network per trial on every actor. A run needs one spec at a time; a few more keep
`--methods a,b --seeds 0,1` (which alternates specs) from rebuilding, and a miss costs only a build."""


DEVICE_DATA_CACHE_BYTES = 10**9
"""Client data a worker keeps copied on a non-CPU device, in bytes (least recently used dropped first).
On CPU a client's tensors are zero-copy views of the shared dataset and cost nothing to keep; on CUDA
each is a copy, and a worker that kept every client it touched would hold the whole dataset on its GPU
(1.2 GB at 10,000 synthetic clients, more than a 0.25-GPU share of a small card). A dropped client is
copied again when next needed: the same bytes, so results do not depend on this bound."""


class Kind(enum.Enum):
    """What a job asks of a client."""

    TRAIN = "train"
    """`local_update` from the `local` stream; returns the encoded uplink and the new state."""
    EVALUATE = "evaluate"
    """`evaluate` from the `eval` stream; the client's state is not changed."""
    EVALUATE_UNSEEN = "evaluate_unseen"
    """A held-out client: `personalize` (its own stream) then `evaluate`; nothing is kept."""


@dataclass(frozen=True)
class Job:
    """One client's share of a call: its id, its encoded downlink and its state."""

    cid: int
    payload: Any
    """The encoded downlink (bytes). On its way to a Ray actor, a reference to the one object-store
    copy of it that every job with the same payload shares."""
    state: State


@dataclass
class Result:
    """One job's outcome. Evaluations fill only `metrics` (or `error`)."""

    cid: int
    metrics: dict[str, float] = field(default_factory=dict)
    up: np.ndarray | None = None
    """TRAIN: the encoded uplink (uint8); len(up) is its exact size in bytes."""
    state: State | None = None
    """TRAIN: the client's new state, for the engine's client store."""
    peak_train_bytes: int = 0
    """TRAIN, when the client was in `measure`: the local update's peak training memory."""
    peak_rss_bytes: int = 0
    error: str | None = None
    """A BenchError's message (bad input or a diverging solver); the engine names method, round and
    client. Any other exception is a bug and propagates with its traceback."""


class Worker:
    """Client-side execution, shared by both backends (one per Ray actor, one in Serial)."""

    def __init__(self, threads: int, device: str | None):
        self.threads = max(1, int(threads))
        self.device = device
        self.dataset: FederatedDataset | None = None
        self.dataset_key: str | None = None
        self._tensors: OrderedDict[int, ClientTensors] = OrderedDict()  # least recently used first
        self._tensor_bytes = 0  # of the cached tensors held on a non-CPU device
        self._methods: OrderedDict[MethodSpec, Any] = OrderedDict()

    # Ray actors call this once; Serial sets threads around each call instead (see SerialBackend).
    def pin_threads(self) -> None:
        torch.set_num_threads(self.threads)

    def hello(self) -> dict:
        """A Ray actor's first call: pins its threads and says who it is, `{"version", "node", "pid"}`.

        The driver refuses a worker whose version differs from its own (faults.check_version).
        """
        import ray

        self.pin_threads()
        return {"version": faults.project_version(), "node": ray.util.get_node_ip_address(), "pid": os.getpid()}

    def resolved_device(self) -> str:
        if self.device:
            return self.device
        return "cuda" if torch.cuda.is_available() and _ray_gpu_ids() else "cpu"

    def set_dataset(self, key: str, dataset: FederatedDataset) -> str:
        if key != self.dataset_key:
            self.dataset, self.dataset_key = dataset, key
            self._tensors.clear()
            self._tensor_bytes = 0
        return self.resolved_device()

    def _client(self, cid: int, device: str) -> ClientTensors:
        """Client `cid`'s tensors on `device`, from the cache; on a non-CPU device the cache holds at
        most DEVICE_DATA_CACHE_BYTES (a client larger than that is copied for each use)."""
        t = self._tensors.get(cid)
        if t is not None:
            self._tensors.move_to_end(cid)
            return t
        t = _to_tensors(self.dataset.clients[cid], device)
        size = 0 if device == "cpu" else _nbytes(t)
        if size > DEVICE_DATA_CACHE_BYTES:
            return t
        while self._tensors and self._tensor_bytes + size > DEVICE_DATA_CACHE_BYTES:
            _, dropped = self._tensors.popitem(last=False)
            self._tensor_bytes -= _nbytes(dropped)
        self._tensors[cid] = t
        self._tensor_bytes += size
        return t

    def method(self, spec: MethodSpec):
        """The method built from `spec`, from a cache of the METHOD_CACHE_SIZE most recently used."""
        m = self._methods.get(spec)
        if m is None:
            m = self._methods[spec] = spec.build()
            if len(self._methods) > METHOD_CACHE_SIZE:
                self._methods.popitem(last=False)
        else:
            self._methods.move_to_end(spec)
        return m

    def run(self, kind: Kind, spec: MethodSpec, job: Job, seed: int, rnd: int,
            measure: frozenset = frozenset()) -> Result:
        """One client's `kind` of work; a local update's peak memory is metered when `cid in measure`."""
        cid = job.cid
        try:
            # Built outside the seeded global generator: whether this job builds the method or finds
            # it cached must not shift the job's draws.
            method = self.method(spec)
            with job_global_rng(seed, kind, rnd, cid, spec.task.device):
                return self._run(kind, method, spec, job, seed, rnd, measure)
        except BenchError as e:
            return Result(cid, error=str(e))
        except Exception as e:
            # A bug: keep its type and traceback (Ray's too), and say whose work it was.
            e.add_note(f"in {spec.name}: round {rnd}, client {cid} ({kind.value})")
            raise

    def _run(self, kind: Kind, method, spec: MethodSpec, job: Job, seed: int, rnd: int,
             measure: frozenset) -> Result:
        cid = job.cid
        data = self._client(cid, spec.task.device)
        down = wire.decode(job.payload)
        if kind is Kind.TRAIN:
            metered = cid in measure
            live = spec.task.cpu_memory == "live"
            meter = memory.MemoryMeter(spec.task.device, modules=_networks(method) if live else [method.net],
                                       live=live) if metered else nullcontext()
            with meter:
                up, state, metrics = method.local_update(down, job.state, data,
                                                         seeding.generator(seed, "local", rnd, cid))
            divergence.check_update(up, state, metrics)
            # A numpy buffer, not bytes: Ray moves it out-of-band (no pickling copy into the object store).
            return Result(cid, metrics, np.frombuffer(wire.encode(up), dtype=np.uint8), state,
                          meter.peak_bytes if metered else 0, memory.peak_rss_bytes())
        state = job.state
        if kind is Kind.EVALUATE_UNSEEN:
            state = method.personalize(down, state, data, seeding.generator(seed, "personalize", rnd, cid))
        return Result(cid, method.evaluate(down, state, data, seeding.generator(seed, "eval", rnd, cid)))

    def run_chunk(self, kind: Kind, spec: MethodSpec, jobs: list[Job], seed: int, rnd: int,
                  measure: frozenset) -> list[Result]:
        """Ray entry point: several clients in one call, in the given (client-id) order.

        Each job's payload is an object reference; each distinct one is fetched once per chunk.
        """
        import ray

        refs = list(dict.fromkeys(job.payload for job in jobs))
        payloads = dict(zip(refs, ray.get(refs), strict=True))
        return [self.run(kind, spec, dataclasses.replace(job, payload=payloads[job.payload]), seed, rnd, measure)
                for job in jobs]


@contextlib.contextmanager
def job_global_rng(seed: int, kind: Kind, rnd: int, cid: int, device: str):
    """torch's global generator, seeded from the job's own stream for the call and restored after it.

    Methods draw from the generator they are handed, but some model code draws from the global one
    (the transformers' dropout: `F.dropout` takes no generator). Without this its masks would depend
    on what the process ran before, so a Ray actor and the Serial backend would train differently.
    """
    devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with seeding.GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=devices):
        torch.manual_seed(seeding.derive(seed, "global", list(Kind).index(kind), rnd, cid))
        yield


def _ray_gpu_ids():
    try:
        import ray

        return ray.get_gpu_ids() if ray.is_initialized() else []
    except Exception:
        return []


def _networks(method) -> list[torch.nn.Module]:
    """Every network a method object holds: its scratch net, and any it keeps between updates (APFL's
    mixed copy). With `--cpu-memory live`, one built inside the first update is counted as allocated
    there and as parameters in every later one, so a client's figure does not depend on whether its
    worker had run the method before (Serial == Ray, a resumed run == an uninterrupted one)."""
    return [v for v in vars(method).values() if isinstance(v, torch.nn.Module)]


def _nbytes(t: ClientTensors) -> int:
    """Bytes of a client's tensors where they are not views of the shared dataset (0 on CPU)."""
    tensors = (getattr(t, f.name) for f in dataclasses.fields(t))  # not astuple: it deep-copies
    return sum(x.nbytes for x in tensors if x.device.type != "cpu")


def _to_tensors(c: ClientData, device: str) -> ClientTensors:
    def t(a):
        # Zero-copy view of the (read-only, shared) object-store array on CPU; nothing writes to data.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(a)
        return x.to(device) if device != "cpu" else x

    return ClientTensors(t(c.train_x), t(c.train_y), t(c.val_x), t(c.val_y), t(c.test_x), t(c.test_y))


class SerialBackend:
    """Everything in this process, in job order. The reference the Ray backend must match."""

    name = "serial"

    def __init__(self, threads: int = 1, device: str | None = None):
        self.worker = Worker(threads, device)
        self.workers = 1

    def set_dataset(self, key: str, dataset: FederatedDataset) -> str:
        return self.worker.set_dataset(key, dataset)

    def run(self, kind: Kind, spec: MethodSpec, jobs: list[Job], seed: int, rnd: int,
            measure: frozenset = frozenset()) -> list[Result]:
        prev = torch.get_num_threads()
        torch.set_num_threads(self.worker.threads)  # same thread count as an actor: same kernels, same bits
        try:
            return [self.worker.run(kind, spec, job, seed, rnd, measure) for job in jobs]
        finally:
            torch.set_num_threads(prev)

    def close(self):
        pass


class RayBackend:
    """A pool of Ray actors, each one an edge node serving whichever clients it is handed.

    Results come back in job order: the engine aggregates in client-id order whatever order the
    actors finish in. An actor that dies mid-call is replaced and its clients' work redone, bit for
    bit (bench/loop/faults.py); every actor must run the driver's version of fedeq-bench.
    """

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None, cpus_per_client: float = 1.0,
                 gpus_per_client: float = 0.0, device: str | None = None, pool=None):
        """Connect and start the actors (bench/loop/actor.py: `start_pool`), or take a `pool` started already
        (`compare` starts one before loading torch and the data; the other arguments are then unused)."""
        from bench.loop import actor as A

        if pool is None:
            pool = A.start_pool(workers, address, cpus_per_client, gpus_per_client, device)
        import ray

        self._ray = ray
        self._pool = pool  # its `actors`: every one started, replacements too (shared with `split` parts)
        self._actor_cls, self._actor_args = pool.actor_cls, pool.actor_args
        self._version = faults.project_version()
        self.actors: list = list(pool.actors)  # the ones serving now
        self._dataset_key, self._device = None, None
        self._puts: dict[str, Any] = {}  # dataset key -> object ref, shared with `split` parts
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
        actor = self._actor_cls.remote(*self._actor_args)
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
        parts = []
        for i in range(n):
            part = object.__new__(RayBackend)
            part.__dict__.update(self.__dict__)
            part.actors = self.actors[i::n]
            part.workers = len(part.actors)
            # The same actor list; a part never stops the Ray its whole started.
            part._dataset_key, part._pool = None, dataclasses.replace(self._pool, started_here=False)
            parts.append(part)
        return parts

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
        return self._results(call, chunks, [job.cid for job in jobs], WORK_OF[kind])

    def _results(self, call, chunks: list[list[int]], cids: list[int], what: str) -> Iterable[Result]:
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
                running[self._submit(call, actor, chunk)] = (actor, chunk)
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
                ready[chunk[0]] = Result(cids[chunk[0]], error=faults.killed(what, deaths[chunk[0]]))
            else:
                waiting.appendleft(chunk)

    def _submit(self, call, actor, chunk: list[int]):
        """The one place a chunk goes to an actor (the actor-fault tests kill the actor right here)."""
        return call(actor, chunk)

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


WORK_OF = {Kind.TRAIN: "local update", Kind.EVALUATE: "evaluation",
           Kind.EVALUATE_UNSEEN: "personalization and evaluation"}
"""What a job of each kind runs, for the error naming a client whose work keeps killing its actor."""


def make_backend(run) -> SerialBackend | RayBackend:
    """The backend for a RunConfig."""
    if run.backend == "serial":
        device = run.device or ("cuda" if run.gpus_per_client > 0 and torch.cuda.is_available() else "cpu")
        return SerialBackend(cluster.threads_per_actor(run.cpus_per_client), device)
    from bench.loop.actor import start_pool_for

    return RayBackend(pool=start_pool_for(run))
