"""Where client work runs: `SerialBackend` (in this process) or `RayBackend` (Ray actors as edge nodes,
bench/loop/ray_backend.py), both implementing the `Backend` protocol below.

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
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from bench.loop import divergence, faults, flops, memory, wire
from fedeq_bench.core import seeding
from fedeq_bench.core.errors import BenchError, Diverged
from fedeq_bench.core.types import ClientTensors, MethodSpec, State
from fedeq_bench.datasets.base import ClientData, FederatedDataset
from fedeq_bench.methods.train import job_options

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
    flops: int = 0
    """When the client was in `measure`: the FLOPs of its work (a local update, or an evaluation with
    a held-out client's personalization), as torch.utils.flop_counter counts them."""
    error: str | None = None
    """A BenchError's message (bad input or a diverging solver); the engine names method, round and
    client. Any other exception is a bug and propagates with its traceback."""
    diverged: bool = False
    """`error` came from a `Diverged` (the engine raises it as one)."""


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
        assert self.dataset is not None  # set_dataset comes before any job
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
            with job_global_rng(seed, kind, rnd, cid, spec.task.device), job_options(spec.task):
                return self._run(kind, method, spec, job, seed, rnd, measure)
        except BenchError as e:
            return Result(cid, error=str(e), diverged=isinstance(e, Diverged))
        except Exception as e:
            # A bug: keep its type and traceback (Ray's too), and say whose work it was.
            e.add_note(f"in {spec.name}: round {rnd}, client {cid} ({kind.value})")
            raise

    def _run(self, kind: Kind, method, spec: MethodSpec, job: Job, seed: int, rnd: int,
             measure: frozenset) -> Result:
        cid = job.cid
        data = self._client(cid, spec.task.device)
        codec = wire.codec_of(spec.cfg)
        down = codec.down().decode(job.payload)
        # Error feedback's residuals live in the client's state but are not the method's (wire.py).
        own = {k: v for k, v in job.state.items() if not k.startswith(wire.RESIDUAL)}
        counter = flops.Counter() if cid in measure else None
        if kind is Kind.TRAIN:
            live = spec.task.cpu_memory == "live"
            meter = memory.make_meter(spec.task.device, modules=_networks(method) if live else [method.net],
                                      cpu=spec.task.cpu_memory) if counter is not None else None
            with meter if meter is not None else nullcontext(), counter if counter is not None else nullcontext():
                update = method.local_update(down, own, data, seeding.generator(seed, "local", rnd, cid))
            divergence.check_update(update.message, update.state, update.metrics)
            rng = seeding.generator(seed, "wire_up", rnd, cid) if codec.draws else None
            up, residuals = codec.encode_up(update.message, rng, down, job.state)
            # A numpy buffer, not bytes: Ray moves it out-of-band (no pickling copy into the object store).
            return Result(cid, update.metrics, np.frombuffer(up, dtype=np.uint8),
                          {**update.state, **residuals}, meter.peak_bytes if meter is not None else 0,
                          memory.peak_rss_bytes(), counter.total if counter is not None else 0)
        state = own
        with counter if counter is not None else nullcontext():
            if kind is Kind.EVALUATE_UNSEEN:
                state = method.personalize(down, state, data, seeding.generator(seed, "personalize", rnd, cid))
            metrics = method.evaluate(down, state, data, seeding.generator(seed, "eval", rnd, cid))
        return Result(cid, metrics, flops=counter.total if counter is not None else 0)

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


@runtime_checkable
class Backend(Protocol):
    """What the engine asks of where client work runs (SerialBackend, RayBackend)."""

    name: str
    """`serial` or `ray`: recorded on every run."""
    workers: int
    """How many workers serve a run (actors; 1 in process)."""

    def set_dataset(self, key: str, dataset: FederatedDataset) -> str:
        """Make `dataset` the one jobs read client data from (put once per key); returns the device
        the workers train on."""
        ...

    def run(self, kind: Kind, spec: MethodSpec, jobs: list[Job], seed: int, rnd: int,
            measure: frozenset = frozenset()) -> Iterable[Result]:
        """`Worker.run` for every job; one Result per job, in job order."""
        ...

    def close(self) -> None:
        """Stop what this backend started."""
        ...


WORK_OF = {Kind.TRAIN: "local update", Kind.EVALUATE: "evaluation",
           Kind.EVALUATE_UNSEEN: "personalization and evaluation"}
"""What a job of each kind runs, for the error naming a client whose work keeps killing its actor."""
