"""Where client work runs: `SerialBackend` (in this process) or `RayBackend` (Ray actors as edge nodes).

Both hand every task to the same `Worker` code, with the same torch thread count, and return results
in the order the tasks were given (client-id order), so Serial and Ray runs are bit-identical.

A task carries everything a client needs: the encoded downlink (bytes, decoded on the worker, so a
method sees only what was sent), the client's state (owned by the engine's client store, never kept
on a worker: one actor serves many clients), and (seed, round, client id) for its random stream.
The dataset is put in Ray's object store once per seed; each downlink payload is put once per round
and shared by every client that receives it.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedeq_bench.bench import memory, wire

from fedeq_bench.core import seeding
from fedeq_bench.core.errors import BenchError
from fedeq_bench.datasets.base import ClientData, FederatedDataset
from fedeq_bench.core.types import ClientTensors, MethodSpec, State


CHUNKS_PER_WORKER = 2


@dataclass
class TrainResult:
    cid: int
    up: np.ndarray
    """The encoded uplink (uint8); len(up) is its exact size in bytes."""
    state: State
    metrics: dict[str, float]
    peak_train_bytes: int
    peak_rss_bytes: int
    error: str | None = None


@dataclass
class EvalResult:
    cid: int
    metrics: dict[str, float]
    error: str | None = None


class Worker:
    """Client-side execution, shared by both backends (one per Ray actor, one in Serial)."""

    def __init__(self, threads: int, device: str | None):
        self.threads = max(1, int(threads))
        self.device = device
        self.dataset: FederatedDataset | None = None
        self.dataset_key: str | None = None
        self._tensors: dict[int, ClientTensors] = {}
        self._methods: dict[MethodSpec, Any] = {}

    # Ray actors call this once; Serial sets threads around each call instead (see SerialBackend).
    def pin_threads(self) -> None:
        torch.set_num_threads(self.threads)

    def resolved_device(self) -> str:
        if self.device:
            return self.device
        return "cuda" if torch.cuda.is_available() and _ray_gpu_ids() else "cpu"

    def set_dataset(self, key: str, dataset: FederatedDataset) -> str:
        if key != self.dataset_key:
            self.dataset, self.dataset_key = dataset, key
            self._tensors.clear()
        return self.resolved_device()

    def _client(self, cid: int, device: str) -> ClientTensors:
        t = self._tensors.get(cid)
        if t is None:
            t = self._tensors[cid] = _to_tensors(self.dataset.clients[cid], device)
        return t

    def _method(self, spec: MethodSpec):
        m = self._methods.get(spec)
        if m is None:
            m = self._methods[spec] = spec.build()
        return m

    def train(self, spec: MethodSpec, cid: int, down: bytes, state: State, seed: int, rnd: int,
              measure: frozenset = frozenset()) -> TrainResult:
        """One local update; its peak training memory is metered when `cid in measure` (else 0)."""
        method = self._method(spec)
        data = self._client(cid, spec.task.device)
        rng = seeding.generator(seed, "local", rnd, cid)
        meter = memory.MemoryMeter(spec.task.device, modules=[method.net]) if cid in measure else nullcontext()
        try:
            with meter:
                up, new_state, metrics = method.local_update(wire.decode(down), state, data, rng)
        except BenchError as e:
            return TrainResult(cid, b"", state, {}, 0, 0, error=str(e))
        peak = meter.peak_bytes if cid in measure else 0
        # A numpy buffer, not bytes: Ray moves it out-of-band (no pickling copy into the object store).
        payload = np.frombuffer(wire.encode(up), dtype=np.uint8)
        return TrainResult(cid, payload, new_state, metrics, peak, memory.peak_rss_bytes())

    def evaluate(self, spec: MethodSpec, cid: int, down: bytes, state: State, seed: int, rnd: int) -> EvalResult:
        method = self._method(spec)
        data = self._client(cid, spec.task.device)
        try:
            return EvalResult(cid, method.evaluate(wire.decode(down), state, data,
                                                   seeding.generator(seed, "eval", rnd, cid)))
        except BenchError as e:
            return EvalResult(cid, {}, error=str(e))

    def evaluate_unseen(self, spec: MethodSpec, cid: int, down: bytes, state: State, seed: int,
                        rnd: int) -> EvalResult:
        """A held-out client: personalize to the current model, then evaluate (nothing is kept)."""
        method = self._method(spec)
        data = self._client(cid, spec.task.device)
        msg = wire.decode(down)
        try:
            state = method.personalize(msg, state, data, seeding.generator(seed, "personalize", rnd, cid))
            return EvalResult(cid, method.evaluate(msg, state, data, seeding.generator(seed, "eval", rnd, cid)))
        except BenchError as e:
            return EvalResult(cid, {}, error=str(e))

    def run_chunk(self, kind: str, spec: MethodSpec, chunk: list, *extra) -> list:
        """Ray entry point: several clients in one call, in the given (client-id) order.

        `chunk` holds (cid, payload ref, state); each distinct payload is fetched once per chunk.
        """
        import ray

        refs = list(dict.fromkeys(ref for _, ref, _ in chunk))
        payloads = dict(zip(refs, ray.get(refs)))
        fn = getattr(self, kind)
        return [fn(spec, cid, payloads[ref], state, *extra) for cid, ref, state in chunk]


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a `host:port` nobody listens on (Ray itself retries for minutes)."""
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


def _ray_gpu_ids():
    try:
        import ray

        return ray.get_gpu_ids() if ray.is_initialized() else []
    except Exception:
        return []


def _to_tensors(c: ClientData, device: str) -> ClientTensors:
    def t(a):
        # Zero-copy view of the (read-only, shared) object-store array on CPU; nothing writes to data.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(a)
        return x.to(device) if device != "cpu" else x

    return ClientTensors(t(c.train_x), t(c.train_y), t(c.val_x), t(c.val_y), t(c.test_x), t(c.test_y))


class SerialBackend:
    """Everything in this process, in task order. The reference the Ray backend must match."""

    name = "serial"

    def __init__(self, threads: int = 1, device: str | None = None):
        self.worker = Worker(threads, device)
        self.workers = 1

    def set_dataset(self, key: str, dataset: FederatedDataset) -> str:
        return self.worker.set_dataset(key, dataset)

    def _call(self, fn, tasks):
        prev = torch.get_num_threads()
        torch.set_num_threads(self.worker.threads)  # same thread count as an actor: same kernels, same bits
        try:
            return [fn(*t) for t in tasks]
        finally:
            torch.set_num_threads(prev)

    def train(self, spec, tasks, seed, rnd, measure=frozenset()):
        return self._call(lambda cid, down, state: self.worker.train(spec, cid, down, state, seed, rnd, measure),
                          tasks)

    def evaluate(self, spec, tasks, seed, rnd):
        return self._call(lambda cid, down, state: self.worker.evaluate(spec, cid, down, state, seed, rnd), tasks)

    def evaluate_unseen(self, spec, tasks, seed, rnd):
        return self._call(lambda cid, down, state: self.worker.evaluate_unseen(spec, cid, down, state, seed, rnd),
                          tasks)

    def close(self):
        pass


class RayBackend:
    """A pool of Ray actors, each one an edge node serving whichever clients it is handed.

    Uses `ray.util.ActorPool.map`, which yields results in submission order: the engine aggregates in
    client-id order whatever order the actors finish in.
    """

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None, cpus_per_client: float = 1.0,
                 gpus_per_client: float = 0.0, device: str | None = None):
        import ray
        from ray.util import ActorPool

        self._ray = ray
        if cpus_per_client <= 0 and gpus_per_client <= 0:
            raise BenchError("cpus_per_client and gpus_per_client are both 0; give each actor some CPU or GPU")
        started_here = False
        # Ray warns on every start that token authentication is on (it stays on); keep stderr for problems.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        if not ray.is_initialized():
            kw: dict[str, Any] = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=True)
            if address:
                _check_reachable(address)
                kw["address"] = address
            else:
                kw["num_cpus"] = os.cpu_count()
            try:
                ray.init(**kw, runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
            except ConnectionError as e:
                raise BenchError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
            started_here = True
        self._started_here = started_here
        res = ray.cluster_resources()
        limits = []
        if cpus_per_client > 0:
            limits.append(int(res.get("CPU", 0) // cpus_per_client))
        if gpus_per_client > 0:
            limits.append(int(res.get("GPU", 0) // gpus_per_client))
        capacity = min(limits)
        if capacity < 1:
            raise BenchError(
                f"the Ray cluster has CPU={res.get('CPU', 0)}, GPU={res.get('GPU', 0)}: not enough for one actor "
                f"at --cpus-per-client {cpus_per_client} --gpus-per-client {gpus_per_client}"
            )
        n = workers or capacity
        if workers and workers > capacity:
            raise BenchError(f"--workers {workers} exceeds what the cluster fits ({capacity} at this per-client size)")
        threads = max(1, math.floor(cpus_per_client))
        actor_cls = ray.remote(Worker).options(num_cpus=cpus_per_client, num_gpus=gpus_per_client)
        self.actors = [actor_cls.remote(threads, device) for _ in range(n)]
        ray.get([a.pin_threads.remote() for a in self.actors])
        self.pool = ActorPool(self.actors)
        self.workers = n
        self._dataset_key = None

    def set_dataset(self, key: str, dataset: FederatedDataset) -> str:
        if key != self._dataset_key:
            ref = self._ray.put(dataset)  # once per dataset; actors read client arrays zero-copy from it
            devices = self._ray.get([a.set_dataset.remote(key, ref) for a in self.actors])
            self._dataset_key = key
            self._device = devices[0]
        return self._device

    def _map(self, kind: str, spec: MethodSpec, tasks, *extra):
        """Run `Worker.<kind>` for every task on the pool; results in task order.

        Clients go to actors in contiguous chunks, CHUNKS_PER_WORKER per actor and round: one Ray
        call per chunk instead of one per client (a call costs ~1 ms, a 1 MB object ~2 ms on this
        machine; see bench/perf.py), while the pool still balances unequal chunks.
        """
        ray = self._ray
        refs: dict[bytes, Any] = {}
        items = []
        for cid, down, state in tasks:
            ref = refs.get(down)
            if ref is None:  # one object per distinct payload per round, shared by every client
                ref = refs[down] = ray.put(np.frombuffer(down, dtype=np.uint8))  # zero-copy on read
            items.append((cid, ref, state))
        n = min(len(items), self.workers * CHUNKS_PER_WORKER)
        bounds = [round(i * len(items) / n) for i in range(n + 1)] if n else [0]
        chunks = [items[a:b] for a, b in zip(bounds, bounds[1:])]
        out = self.pool.map(lambda actor, chunk: actor.run_chunk.remote(kind, spec, chunk, *extra), chunks)
        # A generator: the engine decodes one chunk's results while actors still train the next.
        return (r for part in out for r in part)

    def train(self, spec, tasks, seed, rnd, measure=frozenset()):
        return self._map("train", spec, tasks, seed, rnd, measure)

    def evaluate(self, spec, tasks, seed, rnd):
        return self._map("evaluate", spec, tasks, seed, rnd)

    def evaluate_unseen(self, spec, tasks, seed, rnd):
        return self._map("evaluate_unseen", spec, tasks, seed, rnd)

    def close(self):
        for a in self.actors:
            self._ray.kill(a)
        if self._started_here:
            self._ray.shutdown()


def make_backend(run) -> SerialBackend | RayBackend:
    """The backend for a RunConfig."""
    threads = max(1, math.floor(run.cpus_per_client))
    if run.backend == "serial":
        device = run.device or ("cuda" if run.gpus_per_client > 0 and torch.cuda.is_available() else "cpu")
        return SerialBackend(threads, device)
    return RayBackend(run.workers, run.address, run.cpus_per_client, run.gpus_per_client, run.device)
