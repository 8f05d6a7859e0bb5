"""The round loop: schedule -> broadcast -> local updates -> aggregate -> evaluate.

Nothing here depends on which method runs: the engine calls the six functions of methods/base.py,
encodes every message with bench/loop/wire.py (counting its exact bytes in the ledger), keeps every
client's state in its own client store (keyed by client id), and reduces per-client results in
client-id order. A failure anywhere in a round names the method, the round and the client (or the
server) in one line: see `failure`.

Random streams drawn here (core/seeding.py): `init` (the model) and `server_init` once per run,
`client_init` per client id (one call site, `new_client`: a training client whenever its state is
read before it first trained, from the initial server; held-out clients at every evaluation, and
training clients never sampled at the final evaluation, from the server of that round: the same draw
each time), `schedule` per round, `eval_sample` per evaluation before the last (`--eval-clients`).
The clients' own streams (`local`, `eval`, `personalize`) are drawn by bench/loop/backends.py.

Scale (bench/loop/store.py): client states live in a `ClientStore`, which keeps a state only once the
client has trained (before that it reads as `init_client` from the initial server, the numbers an
up-front initialization gave) and spills the least recently used to disk past `--state-budget-gb`.
The round's cohort is the schedule's sample, or what the method's `cohort` widens it to (`local` with
participation = "all" trains every client every round, as the reference's runners do).
Per round the engine touches the cohort and the clients it evaluates, never the idle ones; with
`--eval-clients N` an evaluation before the last scores N sampled training (and held-out) clients,
the same ones for every method, so acc/* of those rounds are sample estimates; the last round
scores every client.

Simulated devices (bench/loop/devices.py, `--devices`): each client has a device; a sampled client
whose device is away this round is sent nothing, one whose device has less memory than its measured
peak training memory cannot train (its update is discarded, nothing of it counted), and with
`--round-deadline` an update that would arrive late is dropped (its downlink counts). Only accepted
updates are stored and aggregated; `sim/time_s` is the slowest accepted update's simulated time, or
the deadline when one was late. The default set drops nothing.

Clients never sampled (fraction < 1): `clients/never_trained`, logged every round, counts the
training clients whose update no round up to and including that one aggregated. At the final
evaluation those clients take the held-out path (`Kind.EVALUATE_UNSEEN`: init_client from the final server, `personalize`,
then `evaluate`), one protocol for every method, instead of being scored with whatever a method's
untrained personal parts give (an initial head, a 0.5 mixture, the global model), which biased
acc/mean and acc/bottom10 between methods. They still count as training clients in acc/*, not in
acc/unseen. Earlier evaluations score them as they are (the federation's state at that round).
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bench.config import Config, resolve_method
from bench.loop import checkpoint, devices, divergence, wire
from bench.loop.backends import Job, Kind, Result
from bench.loop.store import ClientStore, budget_bytes
from fedeq_bench.core import seeding
from fedeq_bench.core.errors import BenchError, Diverged
from fedeq_bench.core.types import MethodSpec, Task
from fedeq_bench.datasets.base import FederatedDataset
from fedeq_bench.methods.base import METHODS

# Metric names of docs/architecture.md (Metrics), logged every round (acc/* every evaluated round).
ROUND_METRICS = ("loss/train", "bytes/up", "bytes/down", "bytes/cumulative", "mem/peak_train_bytes",
                 "mem/peak_rss_bytes", "time/round_s", "clients/never_trained", "compute/flops_train",
                 "compute/flops_update", "sim/time_s", "sim/time_cumulative_s", "clients/participated",
                 "clients/dropped_deadline", "clients/dropped_memory", "clients/dropped_unavailable",
                 "clients/excluded_memory")
EVAL_METRICS = ("acc/mean", "acc/weighted", "acc/bottom10", "acc/val")
EVAL_COMPUTE_METRICS = ("compute/flops_eval",)
"""Logged in evaluated rounds beside EVAL_METRICS: the FLOPs of scoring every client scored."""


@dataclass
class MethodResult:
    method: str
    seed: int
    model: str
    history: list[dict[str, float]] = field(default_factory=list)
    """One dict of metrics per round (index 0 is round 1)."""
    ledger: wire.Ledger = field(default_factory=wire.Ledger)
    wall_s: float = 0.0
    params_shared: int = 0
    params_personal: int = 0
    clients: list[dict[str, Any]] = field(init=False, repr=False, compare=False)
    """One row per evaluated client (`client_rows`), set once the final round is evaluated; unset
    before (not an argument, not compared, not shown: an attribute the engine adds)."""

    @property
    def final(self) -> dict[str, float]:
        """Metrics after the final round (never the best round)."""
        return self.history[-1] if self.history else {}

    def peak(self, name: str) -> float:
        vals = [h[name] for h in self.history if name in h]
        return max(vals) if vals else float("nan")


class EncodeCache:
    """Encode a broadcast once when many clients get the same tensors (FedAvg's global model).

    Keyed by each tensor's identity and version counter (bumped by any in-place change), so a
    changed tensor is always re-encoded. Holds the messages it saw, so no id is reused while cached;
    the engine makes a fresh cache every round.
    """

    def __init__(self, codec: wire.Codec | None = None, seed: int = 0, rnd: int = 0):
        self._memo: dict[tuple, tuple[bytes, dict]] = {}
        self.codec, self.seed, self.rnd = codec or wire.Codec(), seed, rnd

    def encode(self, msg: dict[str, torch.Tensor], cid: int = 0) -> bytes:
        """The message in the run's wire format; stochastic rounding draws from (wire_down, rnd, cid)
        of the first client `cid` that gets it (the engine encodes in client-id order)."""
        key = tuple(sorted((k, id(t), t._version) for k, t in msg.items()))
        hit = self._memo.get(key)
        if hit is None:
            rng = seeding.generator(self.seed, "wire_down", self.rnd, cid) if self.codec.draws else None
            hit = self._memo[key] = (self.codec.encode(msg, rng), msg)
        return hit[0]


def failure(method: str, rnd: int, msg: str, where: str = "server", diverged: bool = False) -> BenchError:
    """The one shape of a failed step: `fedeq: round 3, client 7: solver diverged (residual nan)`.

    `where` is `server` (broadcast, aggregate) or a client (see `client_label`); `diverged`: raised as
    a `Diverged`, which `--keep-going` records and goes on past.
    """
    return (Diverged if diverged else BenchError)(f"{method}: round {rnd}, {where}: {msg}")


def client_label(cid: int, kind: Kind = Kind.TRAIN, never_trained: bool = False) -> str:
    """`client 7` for a local update; evaluation, held-out and never-sampled clients say so."""
    if kind is Kind.EVALUATE_UNSEEN and never_trained:
        return f"never-trained client {cid} (personalization and evaluation)"
    return {Kind.TRAIN: f"client {cid}",
            Kind.EVALUATE: f"client {cid} (evaluation)",
            Kind.EVALUATE_UNSEEN: f"held-out client {cid} (personalization and evaluation)"}[kind]


@contextmanager
def blame(method: str, rnd: int, where: str = "server") -> Iterator[None]:
    """Name method, round and place in an error raised inside the block (the server side's steps).

    A BenchError becomes `failure(...)` (the CLIs print it as one line). Any other exception is a
    bug: it keeps its type and traceback and gains a note saying where it happened.
    """
    try:
        yield
    except BenchError as e:
        raise failure(method, rnd, str(e), where, isinstance(e, Diverged)) from e
    except Exception as e:
        e.add_note(f"in {method}: round {rnd}, {where}")
        raise


def client_results(backend, kind: Kind, spec: MethodSpec, jobs: list[Job], seed: int, rnd: int,
                   measure: frozenset = frozenset(), never_trained: frozenset = frozenset()) -> Iterator[Result]:
    """`backend.run`'s results in job order; a client's failure is raised as `failure(...)` naming it."""
    for res in backend.run(kind, spec, jobs, seed, rnd, measure):
        if res.error is not None:
            raise failure(spec.name, rnd, res.error, client_label(res.cid, kind, res.cid in never_trained),
                          res.diverged)
        yield res


def new_client(algo, cid: int, server, seed: int):
    """A client's state as it joins under `server`: the one call site drawing ("client_init", cid).

    Training clients join at the start; held-out clients, and training clients never sampled, join
    again at an evaluation from that round's server: the same numbers each time.
    """
    return algo.init_client(cid, server, seeding.generator(seed, "client_init", cid))


def eval_sample(seed: int, rnd: int, ids, n: int | None, group: int = 0) -> list[int]:
    """The `n` of `ids` an evaluation before the last round scores, in client-id order, drawn from
    ("eval_sample", rnd, group): a pure function of (seed, round), so every method scores the same
    clients. All of `ids` when n is None or at least len(ids) (no draw: the same as no sampling)."""
    ids = sorted(ids)
    if n is None or n >= len(ids):
        return ids
    rng = seeding.numpy_rng(seed, "eval_sample", rnd, group)
    return sorted(int(c) for c in rng.choice(np.asarray(ids), n, replace=False))


def cohort_at(seed: int, train_ids: list[int], rnd: int, fraction: float) -> list[int]:
    """Round `rnd`'s cohort, drawn from (seed, round) when the round comes: identical for every method,
    and nothing sized by the number of rounds is built up front (a run of 10^12 rounds starts at once)."""
    m = max(1, int(round(fraction * len(train_ids))))
    ids = np.asarray(sorted(train_ids))
    return sorted(int(c) for c in seeding.numpy_rng(seed, "schedule", rnd).choice(ids, m, replace=False))


def make_schedule(seed: int, train_ids: list[int], rounds: int, fraction: float) -> list[list[int]]:
    """The cohorts of rounds 1..`rounds` (`cohort_at` each), for a caller that wants them all."""
    return [cohort_at(seed, train_ids, r, fraction) for r in range(1, rounds + 1)]


def build_initial_model(name: str, dataset: FederatedDataset, seed: int) -> torch.nn.Module:
    """The initial network, identical for every method that uses this model at this seed."""
    from fedeq_bench.methods.nets import build_model

    # Module constructors draw from torch's global generator; fork it so nothing else is disturbed.
    with seeding.GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeding.derive(seed, "init"))
        return build_model(name, dataset.input_shape, dataset.num_classes)


def reduce_client_metrics(per_client: list[dict[str, float]]) -> dict[str, float]:
    """A method's namespaced client metrics (`deq/nstep_mean`, `apfl/alpha`) over the cohort:
    `*_max` keys take the max, the rest the mean. Plain keys (`loss`, `steps`) are the engine's."""
    out: dict[str, float] = {}
    keys = sorted({k for m in per_client for k in m if "/" in k})
    for k in keys:
        vals = [m[k] for m in per_client if k in m]
        out[k] = float(max(vals)) if k.endswith("_max") else float(np.mean(vals))
    return out


def accuracy_metrics(evals: list[dict[str, float]]) -> dict[str, float]:
    """acc/mean, acc/weighted, acc/bottom10, acc/val from per-client eval metrics (client-id order)."""
    accs = np.array([e["test_acc"] for e in evals], dtype=np.float64)
    ns = np.array([e["test_n"] for e in evals], dtype=np.float64)
    vals = np.array([e["val_acc"] for e in evals if e["val_n"] > 0], dtype=np.float64)
    k = max(1, math.ceil(len(accs) / 10))  # the worst decile, at least one client
    return {
        "acc/mean": float(accs.mean()),
        "acc/weighted": float((accs * ns).sum() / ns.sum()),
        "acc/bottom10": float(np.sort(accs)[:k].mean()),
        "acc/val": float(vals.mean()) if len(vals) else float("nan"),
    }


def run_method(
    config: Config,
    method: str,
    seed: int,
    dataset: FederatedDataset,
    backend,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
    resume=None,
    on_checkpoint: Callable[[checkpoint.LoopState], None] | None = None,
) -> MethodResult:
    """Train and evaluate one method at one seed; `on_round(rnd, metrics)` after every round.

    `on_checkpoint(loop_state)`: after `on_round`, every `--checkpoint-every` rounds and after the
    last (bench/loop/checkpoint.py writes it). `resume`: a `checkpoint.Checkpoint` to continue from, with
    the numbers an uninterrupted run has: the rounds after it are run, the ones up to it are not.
    """
    run = config.run
    mcfg = resolve_method(config, method, dataset.default_models)
    model_name = mcfg.model
    device = backend.set_dataset(dataset.fingerprint, dataset)
    task = Task(model_name, dataset.input_shape, dataset.num_classes, device, run.cpu_memory,
                drop_last=run.drop_last, eval_dropout=run.eval_dropout)
    spec = MethodSpec(METHODS.get(method), mcfg, task)
    codec = wire.codec_of(mcfg)
    # The driver's copy (init, broadcast, aggregate: the server side) works on CPU tensors, whatever
    # device the actors train on: a cluster's head node need not have a GPU.
    algo = MethodSpec(METHODS.get(method), mcfg, dataclasses.replace(task, device="cpu")).build()

    model = build_initial_model(model_name, dataset, seed)
    shared, personal = algo.param_split(model)
    sd = model.state_dict()
    result = MethodResult(method, seed, model_name,
                          params_shared=sum(sd[k].numel() for k in shared),
                          params_personal=sum(sd[k].numel() for k in personal))
    server = algo.init_server(model, seeding.generator(seed, "server_init"))
    train_ids = dataset.train_ids
    # A client's state is kept once it has trained; until then it reads as init_client from the
    # initial server (a copy: no method's aggregate can change it), as if made at the start.
    initial = {k: v.clone() for k, v in server.items()}
    store = ClientStore(budget_bytes(run.state_budget_gb), default=lambda cid: new_client(algo, cid, initial, seed))
    cumulative = 0
    # A local update's footprint depends on the model, the method and the client's data size, not
    # on the round: meter each client's first update (every one with run.memory_every_round).
    peak_of: dict[int, int] = {}
    # FLOPs likewise (bench/loop/flops.py), by ("train" | "eval" | "unseen", client).
    flops_of: dict[tuple[str, int], int] = {}
    trained: set[int] = set()  # training clients in some cohort so far
    # Each client's simulated device (bench/loop/devices.py): the clock and the limits on who trains.
    fleet = devices.Fleet(devices.load(run.devices), seed)
    sim_total = 0.0
    start, wall_before = 1, 0.0
    ident = checkpoint.identity(method, seed, run.rounds, dataset.fingerprint)
    if resume is not None:  # everything the loop carries between rounds (bench/loop/checkpoint.py)
        loop = resume.restore(store, result, train_ids, **ident)
        server, cumulative, peak_of, trained = loop.server, loop.cumulative, loop.peak_of, loop.trained
        flops_of = loop.flops_of
        start, wall_before = loop.round + 1, loop.wall_s
        sim_total = result.history[-1].get("sim/time_cumulative_s", 0.0) if result.history else 0.0
    t_start = time.perf_counter()

    for rnd in range(start, run.rounds + 1):
        t0 = time.perf_counter()
        # The round's sample, drawn now (cohort_at), unless the method trains more; a device that
        # is unavailable this round is sent nothing.
        sampled = algo.cohort(cohort_at(seed, train_ids, rnd, run.fraction), train_ids)
        cohort = [c for c in sampled if fleet.available(rnd, c)]
        jobs, cache, sent, down = [], EncodeCache(codec.down(), seed, rnd), {}, {}
        with blame(method, rnd):
            for cid in cohort:
                msg = sent[cid] = algo.broadcast(server, cid, rnd)
                down[cid] = cache.encode(msg, cid)
                jobs.append(Job(cid, down[cid], store[cid]))
        # (A checkpoint from before FLOPs were counted has peak_of but no flops_of: meter those again.)
        measure = frozenset(c for c in cohort if run.memory_every_round or c not in peak_of
                            or ("train", c) not in flops_of)
        replies, client_metrics, peak_rss, ups, late, times = [], [], 0, [], [], []
        too_big: set[int] = set()
        for res in client_results(backend, Kind.TRAIN, spec, jobs, seed, rnd, measure):
            assert res.up is not None and res.state is not None  # a TRAIN result carries both
            if res.cid in measure:
                peak_of[res.cid] = res.peak_train_bytes
                flops_of[("train", res.cid)] = res.flops
            peak_rss = max(peak_rss, res.peak_rss_bytes)
            dev = fleet[res.cid]
            if not dev.fits(peak_of[res.cid]):  # this device could not have trained: nothing happened
                too_big.add(res.cid)
                continue
            t = dev.round_time(len(down[res.cid]), flops_of[("train", res.cid)], len(res.up))
            if run.round_deadline is not None and t > run.round_deadline:  # sent, trained, too late
                late.append(res.cid)
                continue
            times.append(t)
            msg = codec.decode_up(res.up, sent[res.cid])
            ups.append((res.cid, res.up, msg.keys()))
            store[res.cid] = res.state
            replies.append((res.cid, msg))
            client_metrics.append(res.metrics)
        # Ledger: the downlinks of every device that could train, then the uplinks that arrived.
        down_bytes = sum(result.ledger.record(rnd, c, "down", down[c], sent[c].keys()) for c in cohort
                         if c not in too_big)
        up_bytes = sum(result.ledger.record(rnd, c, "up", payload, keys) for c, payload, keys in ups)
        trained.update(c for c, _ in replies)
        never_trained = [c for c in train_ids if c not in trained]
        # Aggregate in client-id order so Serial and Ray runs are bit-identical; a round without a
        # reply leaves the server as it was.
        replies.sort(key=lambda r: r[0])
        agg_metrics: dict = {}
        if replies:
            with blame(method, rnd):
                server, agg_metrics = algo.aggregate(server, replies, rnd)  # AggregateResult(server, metrics)
        bad = divergence.first_nonfinite(server)
        if bad is not None:
            raise failure(method, rnd, divergence.describe(f"server state {bad}", "aggregate"), diverged=True)
        cumulative += up_bytes + down_bytes
        ran = [c for c in cohort if c not in too_big]  # the updates computed, late ones included
        flops_train = sum(flops_of[("train", c)] for c in ran)
        sim_round = run.round_deadline if late and run.round_deadline is not None else max(times, default=0.0)
        sim_total += sim_round
        losses = [m["loss"] for m in client_metrics if "loss" in m]
        metrics = {
            "loss/train": float(np.mean(losses)) if losses else float("nan"),
            "bytes/up": float(up_bytes),
            "bytes/down": float(down_bytes),
            "bytes/cumulative": float(cumulative),
            "mem/peak_rss_bytes": float(peak_rss),
            "clients/never_trained": float(len(never_trained)),
            "compute/flops_train": float(flops_train),
            "sim/time_s": float(sim_round),
            "sim/time_cumulative_s": float(sim_total),
            "clients/participated": float(len(replies)),
            "clients/dropped_deadline": float(len(late)),
            "clients/dropped_memory": float(len(too_big)),
            "clients/dropped_unavailable": float(len(sampled) - len(cohort)),
            "clients/excluded_memory": float(sum(not fleet[c].fits(p) for c, p in peak_of.items())),
        }
        if cohort:  # a round whose every sampled device was away metered no update: nothing to log
            metrics["mem/peak_train_bytes"] = float(max(peak_of[c] for c in cohort))
        if ran:
            metrics["compute/flops_update"] = flops_train / len(ran)
        metrics.update(reduce_client_metrics(client_metrics))
        metrics.update({k: float(v) for k, v in agg_metrics.items()})
        if rnd % run.eval_every == 0 or rnd == run.rounds:
            # Only the final evaluation personalizes the never-sampled clients (module docstring),
            # and only evaluations before it may score a sample (--eval-clients).
            last = rnd == run.rounds
            fresh = never_trained if last else ()
            n = None if last else run.eval_clients
            per_client: dict = {}
            metrics.update(evaluate(algo, spec, server, store, dataset, backend, seed, rnd, fresh, per_client,
                                    clients=eval_sample(seed, rnd, train_ids, n, 0),
                                    unseen=eval_sample(seed, rnd, dataset.unseen, n, 1), flops_of=flops_of))
            if rnd == run.rounds:
                result.clients = client_rows(per_client, fresh, dataset.unseen)
        metrics["time/round_s"] = time.perf_counter() - t0
        result.history.append(metrics)
        if on_round is not None:
            on_round(rnd, metrics)
        if on_checkpoint is not None and checkpoint.due(rnd, run.rounds, run.checkpoint_every):
            on_checkpoint(checkpoint.LoopState(
                rnd, server, store, cumulative, peak_of, trained, result.history, result.ledger,
                getattr(result, "clients", None), wall_before + time.perf_counter() - t_start, ident, flops_of))
    result.wall_s = wall_before + time.perf_counter() - t_start
    store.close()  # removes spilled states from disk
    return result


def client_rows(per_client: dict[int, dict[str, float]], never_trained, unseen) -> list[dict]:
    """One row per evaluated client (client-id order) with the numbers a report shows per client."""
    fresh, held = set(never_trained), set(unseen)
    return [{"cid": cid, "group": "unseen" if cid in held else "never_trained" if cid in fresh else "train",
             **{k: float(m.get(k, float("nan"))) for k in ("test_acc", "test_n", "val_acc", "val_n")}}
            for cid, m in sorted(per_client.items())]


def evaluate(algo, spec: MethodSpec, server, store, dataset: FederatedDataset, backend, seed: int,
             rnd: int, never_trained=(), per_client: dict | None = None, clients=None,
             unseen=None, flops_of: dict | None = None) -> dict[str, float]:
    """Personalized accuracy of every training client (and held-out clients, personalized first).

    `clients`, `unseen`: the training and held-out clients to score (client-id order; None: all of
    them), a sample drawn by `eval_sample` in evaluations before the last round.

    `never_trained`: training clients that take the held-out path this time (init_client from this
    round's server, `personalize`, `evaluate`; their stored state is ignored and not changed). They
    count in acc/*, not in acc/unseen.
    Evaluation downlinks are a measurement, not training traffic: they are not in the ledger.
    `per_client`: when given, filled with every evaluated client's metrics by client id.
    `flops_of`: when given, the run's FLOPs counts, ("eval" | "unseen", client) -> FLOPs of its first
    evaluation of that kind (counted now when missing); `compute/flops_eval` is their sum over the
    clients scored.
    """
    cache = EncodeCache(wire.codec_of(spec.cfg).down(), seed, rnd)
    fresh = frozenset(never_trained)
    train_ids = dataset.train_ids if clients is None else list(clients)
    held = list(dataset.unseen) if unseen is None else list(unseen)
    seen_ids = [cid for cid in train_ids if cid not in fresh]
    fresh_ids = sorted(fresh | set(held))  # one batch, in client-id order
    counts = {} if flops_of is None else flops_of

    def unmetered(kind: str, ids) -> frozenset:
        return frozenset(c for c in ids if (kind, c) not in counts) if flops_of is not None else frozenset()

    with blame(spec.name, rnd):
        jobs = [Job(cid, cache.encode(algo.broadcast(server, cid, rnd), cid), store[cid]) for cid in seen_ids]
    evals = {}
    metered = unmetered("eval", seen_ids)
    for res in client_results(backend, Kind.EVALUATE, spec, jobs, seed, rnd, metered):
        evals[res.cid] = res.metrics
        if res.cid in metered:
            counts[("eval", res.cid)] = res.flops
    held_evals: dict[int, dict[str, float]] = {}
    if fresh_ids:
        with blame(spec.name, rnd):
            # Such a client starts from the current server at every evaluation: `new_client` draws
            # ("client_init", cid) again each time, the same numbers from the same call site.
            jobs = [Job(cid, cache.encode(algo.broadcast(server, cid, rnd), cid), new_client(algo, cid, server, seed))
                    for cid in fresh_ids]
        metered = unmetered("unseen", fresh_ids)
        for res in client_results(backend, Kind.EVALUATE_UNSEEN, spec, jobs, seed, rnd, metered, never_trained=fresh):
            (evals if res.cid in fresh else held_evals)[res.cid] = res.metrics
            if res.cid in metered:
                counts[("unseen", res.cid)] = res.flops
    if per_client is not None:
        per_client.update(evals)
        per_client.update(held_evals)
    # Reduce in client-id order so Serial and Ray runs are bit-identical.
    out = accuracy_metrics([evals[cid] for cid in train_ids])
    if held:
        out["acc/unseen"] = accuracy_metrics([held_evals[cid] for cid in held])["acc/mean"]
    if flops_of is not None:
        out["compute/flops_eval"] = float(sum(counts[("eval", c)] for c in seen_ids)
                                          + sum(counts[("unseen", c)] for c in fresh_ids))
    return out
