"""The FeDEQ paper's two efficiency claims, measured on the paper's models and presets (configs/paper/):
communication "up to 4 times" smaller and a training memory footprint "1.5 times" smaller than the
baselines' (Le et al., CIKM 2024, arXiv 2309.15659).

`python -m bench.perf --bytes-claim` (`bytes_table`): exact, no training. For each paper dataset and
each method of its preset, round 1 of one client as the engine runs it (bench/loop/engine.py): the
server's initial state from the initial network, `broadcast`, the wire codec (bench/loop/wire.py),
`local_update` on the decoded downlink and the codec again. Every epoch count is set to 0, so the
update takes no step and returns the message it always builds: its size depends on the tensors'
names, shapes and dtypes only. Columns: down and up bytes per client, and each baseline's bytes over
FeDEQ's (down + up). FedAvg's ratio is the full model against FeDEQ's shared part (the DEQ body);
FedRep and FedPer send their body, `local` nothing.

`python -m bench.perf --memory-claim` (`memory_table`): one local update per method, run by the
worker code a run uses for a client's first update (bench/loop/backends.py `Worker.run`, metered),
at the preset's batch size with every nonzero epoch count cut to 1 and the client holding one batch:
each phase of the update (FeDEQ's personal and representation steps, FedRep's head and body steps,
Ditto's global and personal steps) runs one mini-batch step, and the peak of an update is the peak
of its largest step. The meter is the one a run uses (bench/loop/memory/): the CUDA allocator's peak
on CUDA (when torch.cuda.is_available()), else the live CPU meter. FeDEQ runs once per adjoint
solver (`b_solvers`); the baselines run the preset's explicit model. The inputs are synthetic, of
the dataset's shape (uniform pixels in [0, 1], token ids 1..num_classes - 1, uniform labels), drawn
from the `perf` stream: memory does not depend on the pixel values, only the DEQ solvers' step
counts do (a real image can take more or fewer forward and adjoint steps than noise).
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from bench import config as C
from bench.loop import engine, memory, wire
from bench.loop.backends import Job, Kind, SerialBackend
from bench.report import text
from fedeq_bench.core import seeding
from fedeq_bench.core.errors import BenchError, choices
from fedeq_bench.core.types import ClientTensors, MethodSpec, Task
from fedeq_bench.datasets import cifar, femnist, shakespeare
from fedeq_bench.datasets.base import DataArgs, FederatedDataset, build_federated
from fedeq_bench.methods import METHODS
from fedeq_bench.methods.fedeq import FeDEQConfig

PAPER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "configs", "paper")
DATASETS: dict[str, tuple[tuple[int, ...], int]] = {
    "femnist": ((1, femnist.SIDE, femnist.SIDE), femnist.NUM_CLASSES),
    "cifar10": ((3, 32, 32), cifar.CIFAR10.num_classes),
    "cifar100": ((3, 32, 32), cifar.CIFAR100.num_classes),
    "shakespeare": ((shakespeare.SEQ_LEN,), shakespeare.VOCAB_SIZE),
}
"""Each paper dataset's input shape and classes, as its loader gives them (datasets/)."""
PAPER_BYTES_RATIO = 4.0
"""The paper: FeDEQ's communication is "up to 4 times" smaller than the baselines'."""
PAPER_MEMORY_RATIO = 1.5
"""The paper: FeDEQ's training memory footprint is "1.5 times" smaller than the baselines'."""
PRESET = "preset"
"""In `--b-solvers`: the adjoint the paper preset itself sets, the reference's (CG on the normal equations
on the vision presets, a 20-step Broyden on Shakespeare's)."""
DEFAULT_B_SOLVERS = tuple(dict.fromkeys((PRESET, FeDEQConfig.b_solver)))
"""The reference's adjoint solver (each preset's own) and the harness's default."""
MEMORY_METHODS = ("fedeq", "fedavg", "fedrep", "ditto", "knnper")
"""`--memory-claim`'s methods: FeDEQ, FedAvg (the explicit model alone), and those that do more in an
update: FedRep (a head step, then a body step), Ditto (a second, personal model) and kNN-Per (whose
datastore is built at evaluation only, so its update is FedAvg's). The presets' other baselines train
as FedAvg does (FedPer, FedAvg-FT before its switch round, Local); `--claim-methods` adds them."""
MB = 1e6


def paper_config(dataset: str) -> C.Config:
    """The paper preset of `dataset` (configs/paper/DATASET.toml) on the default config."""
    if dataset not in DATASETS:
        raise BenchError(f"unknown paper dataset {dataset!r}; choose from {choices(DATASETS)}")
    return C.apply(C.default_config(), C.load_toml(os.path.join(PAPER_DIR, f"{dataset}.toml")))


def check_b_solvers(names: Sequence[str]) -> tuple[str, ...]:
    """The adjoint solvers as FeDEQ's config takes them, checked the way `--set fedeq.b_solver=X` is
    (one BenchError line naming the valid ones), before anything is measured."""
    if not names:
        raise BenchError("--b-solvers needs at least one adjoint solver")
    cfg = C.default_config()
    for name in names:
        if name != PRESET:
            C.apply(cfg, {"fedeq.b_solver": name})
    return tuple(dict.fromkeys(names))


def check_methods(datasets: Sequence[str], methods: Sequence[str]) -> tuple[str, ...]:
    """`methods` if every one is in each chosen paper preset, else one BenchError line."""
    if not methods:
        raise BenchError("--claim-methods needs at least one method")
    for name in datasets:
        listed = paper_config(name).run.methods
        missing = [m for m in methods if m not in listed]
        if missing:
            raise BenchError(f"the {name} preset has no method {missing[0]!r}; it has {choices(listed)}")
    return tuple(dict.fromkeys(methods))


def synthetic_client(dataset: str, n: int, seed: int = 0) -> FederatedDataset:
    """One client of the dataset's shapes holding `n` training samples (and one test sample, which
    nothing here reads), from the `perf` stream: uniform [0, 1) pixels, or token ids 1..classes - 1
    (no padding id 0) with one label per position as the presets' Shakespeare (`targets = "all"`)."""
    shape, classes = DATASETS[dataset]
    g = seeding.generator(seed, "perf")
    total = n + 1
    if dataset == "shakespeare":
        x = torch.randint(1, classes, (total, *shape), generator=g).float()
        y = torch.randint(0, classes, (total, *shape), generator=g)
    else:
        x = torch.rand(total, *shape, generator=g)
        y = torch.randint(0, classes, (total,), generator=g)
    raw = [(x[:n].numpy(), y[:n].numpy(), x[n:].numpy(), y[n:].numpy())]
    return build_federated(dataset, raw, classes, DataArgs(seed, val_frac=0.0), "perf")


def cap_epochs(mcfg: Any, most: int) -> Any:
    """`mcfg` with every `*epochs` count above `most` set to `most` (a count of 0 stays 0)."""
    cut = {f.name: most for f in dataclasses.fields(mcfg)
           if f.name.endswith("epochs") and isinstance(getattr(mcfg, f.name), int) and getattr(mcfg, f.name) > most}
    return dataclasses.replace(mcfg, **cut)


def _client_round(cfg: C.Config, method: str, ds: FederatedDataset, seed: int, epochs: int,
                  backend: SerialBackend | None = None) -> dict[str, Any]:
    """Round 1 of client 0 as the engine runs it. With `backend`: the local update runs through the
    backend's worker and is metered (the engine's first update of a client); without: it runs here,
    unmetered and unchecked (epochs 0 report a NaN loss, which the worker would refuse)."""
    mcfg = cap_epochs(C.resolve_method(cfg, method, ds.default_models), epochs)
    device = backend.set_dataset(ds.fingerprint, ds) if backend is not None else "cpu"
    task = Task(mcfg.model, ds.input_shape, ds.num_classes, device, cfg.run.cpu_memory)
    cls = METHODS.get(method)
    # The server side works on CPU tensors, as the engine's driver copy does.
    algo = MethodSpec(cls, mcfg, dataclasses.replace(task, device="cpu")).build()
    server = algo.init_server(engine.build_initial_model(mcfg.model, ds, seed), seeding.generator(seed, "server_init"))
    state = engine.new_client(algo, 0, server, seed)
    down = wire.encode(algo.broadcast(server, 0, 1))
    out: dict[str, Any] = {"method": method, "model": mcfg.model, "down": len(down)}
    if backend is None:
        c = ds.clients[0]
        data = ClientTensors(*(torch.from_numpy(a) for a in (c.train_x, c.train_y, c.val_x, c.val_y, c.test_x,
                                                              c.test_y)))
        update = algo.local_update(wire.decode(down), state, data, seeding.generator(seed, "local", 1, 0))
        up = wire.encode(update.message)
        params = {n for n, _ in algo.net.named_parameters()}
        out.update(up=len(up), params=sum(t.numel() for k, t in wire.decode(up).items() if k in params))
        return out
    t0 = time.perf_counter()
    (res,) = engine.client_results(backend, Kind.TRAIN, MethodSpec(cls, mcfg, task), [Job(0, down, state)],
                                   seed, 1, measure=frozenset({0}))
    assert res.up is not None
    out.update(up=len(res.up), peak=res.peak_train_bytes, metrics=res.metrics, batch=mcfg.batch_size,
               seconds=time.perf_counter() - t0)
    return out


def round_bytes(datasets: Sequence[str] = tuple(DATASETS), seed: int = 0,
                methods: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per dataset and preset method, one client in round 1: {dataset, method, model, down, up, params}:
    the encoded downlink's and uplink's bytes, and the values in the uplink that are the network's
    trainable parameters (its buffers, `num_samples` and flags left out). `methods`: the presets' by default."""
    rows = []
    for name in datasets:
        cfg = paper_config(name)
        ds = synthetic_client(name, 1, seed)
        for method in cfg.run.methods if methods is None else check_methods([name], methods):
            rows.append({"dataset": name, **_client_round(cfg, method, ds, seed, epochs=0)})
    return rows


def _ratio(num: float, den: float, digits: int = 2) -> str:
    return f"{num / den:.{digits}f}x" if num and den else "-"


def bytes_table(datasets: Sequence[str] = tuple(DATASETS), seed: int = 0) -> str:
    """The Markdown table `python -m bench.perf --bytes-claim` prints (module docstring)."""
    rows = round_bytes(datasets, seed)
    fedeq = {r["dataset"]: r for r in rows if r["method"] == "fedeq"}
    body = []
    for r in rows:
        f = fedeq[r["dataset"]]
        body.append((r["dataset"], r["method"], r["model"], f"{r['down']:,}", f"{r['up']:,}", f"{r['params']:,}",
                     _ratio(r["down"] + r["up"], f["down"] + f["up"], 3), _ratio(r["params"], f["params"], 3)))
    title = (f"Bytes per client in round 1 (the wire codec's exact encoding of each method's messages) on the paper "
             f"presets, and the model parameters in the uplink; the paper: FeDEQ's communication up to "
             f"{PAPER_BYTES_RATIO:g}x smaller")
    columns = ["dataset", "method", "model", "down bytes", "up bytes", "parameters up", "bytes / FeDEQ's",
               "parameters / FeDEQ's"]
    return title + "\n" + text.table(columns, body, right=[False, False, False, True, True, True, True, True])


def meter_name(device: str) -> str:
    """Which meter a local update on `device` gets (bench/loop/memory make_meter), in words."""
    meter = memory.make_meter(device)
    return {"CudaMeter": "the CUDA allocator's peak (CudaMeter)",
            "LiveMeter": "the live CPU meter (LiveMeter)"}.get(type(meter).__name__, type(meter).__name__)


def update_memory(datasets: Sequence[str] = tuple(DATASETS), b_solvers: Sequence[str] = DEFAULT_B_SOLVERS,
                  methods: Sequence[str] = MEMORY_METHODS, seed: int = 0, device: str | None = None,
                  threads: int | None = None) -> list[dict[str, Any]]:
    """Per dataset and method, FeDEQ once per adjoint solver: {dataset, method, model, b_solver, batch,
    peak, metrics, seconds} of one metered local update of one batch per phase (module docstring)."""
    b_solvers = check_b_solvers(b_solvers)
    methods = check_methods(datasets, methods)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = SerialBackend(threads or torch.get_num_threads(), device)
    rows = []
    for name in datasets:
        cfg = paper_config(name)
        ds = synthetic_client(name, cfg.run.batch_size, seed)  # one batch of the preset's size
        for method in methods:
            for b in b_solvers if method == "fedeq" else (None,):
                run_cfg = cfg if b in (None, PRESET) else C.apply(cfg, {"fedeq.b_solver": b})
                r = _client_round(run_cfg, method, ds, seed, epochs=1, backend=backend)
                rows.append({"dataset": name, "b_solver": b, "b_used": run_cfg.methods["fedeq"].b_solver, **r})
    return rows


def memory_table(datasets: Sequence[str] = tuple(DATASETS), b_solvers: Sequence[str] = DEFAULT_B_SOLVERS,
                 methods: Sequence[str] = MEMORY_METHODS, seed: int = 0, device: str | None = None) -> str:
    """The Markdown table `python -m bench.perf --memory-claim` prints (module docstring): peak training
    MB of one local update per method, and each explicit method's peak over FeDEQ's per adjoint solver."""
    b_solvers = check_b_solvers(b_solvers)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = update_memory(datasets, b_solvers, methods, seed, device)
    fedeq = {(r["dataset"], r["b_solver"]): r["peak"] for r in rows if r["method"] == "fedeq"}
    body = []
    for r in rows:
        label = r["method"] if r["b_solver"] is None else (
            f"{r['method']} (b_solver={r['b_used']}{', the preset' if r['b_solver'] == PRESET else ''})")
        vjps = r["metrics"].get("deq/b_nstep_mean")
        ratios = ["-" if r["method"] == "fedeq" or (r["dataset"], b) not in fedeq
                  else _ratio(r["peak"], fedeq[(r["dataset"], b)]) for b in b_solvers]
        body.append((r["dataset"], label, r["model"], r["batch"], f"{r['peak'] / MB:.1f}",
                     "-" if vjps is None else f"{vjps:.1f}", f"{r['seconds']:.1f}", *ratios))
    title = (f"Peak training MB of one local update (one batch per phase, the paper presets' batch sizes, "
             f"synthetic inputs), metered by {meter_name(device)} on {device}; "
             f"the paper: FeDEQ's footprint {PAPER_MEMORY_RATIO:g}x smaller")
    columns = ["dataset", "method", "model", "batch", "peak MB", "adjoint steps", "update s",
               *(f"explicit / FeDEQ ({'the preset' if b == PRESET else b})" for b in b_solvers)]
    return title + "\n" + text.table(columns, body, right=[False, False, False, True, True, True, True,
                                                           *(True for _ in b_solvers)])
