"""The workload behind `python -m bench.perf`: the harness's steady-state round time next to a plain
PyTorch loop. A library module, so the CLI and benchmark tests (tests/perf/) share one workload.

The workload: FedAvg with the `mlp` model on an `npz:` Fashion-MNIST-like
split (20 clients x 480 training samples of 28x28 pixels, 10 classes), every client every round,
1 local epoch, batch 32, 30 rounds. The plain loop is what one would write by hand in one process
(torch's default thread count): load the global weights, train each client in turn, average.

Both sides do the same training and no per-round evaluation (the harness evaluates only after the
last round, `eval_every = rounds`), so the ratio measures the harness's own overhead: encoding and
decoding every message, moving it through Ray, client state, memory metering. Steady state = the
median of the rounds after `--warmup` (Ray actor start-up and first-touch costs excluded).

Targets: 1 worker within 1.3x of the plain loop; 2 workers on 2 cores faster than it. Each Ray
actor gets `cpus // workers` CPUs (`--cpus-per-client`, also its torch thread count), so one worker
has the whole machine, like the plain loop.

Memory metering is part of the harness and included: each client's first local update is metered
(bench/loop/engine.py says why that is every distinct footprint).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bench import config as C
from bench.report import text
from fedeq_bench.core.seeding import generator, numpy_rng

CLIENTS, N_TRAIN, N_TEST, SHAPE, CLASSES = 20, 480, 120, (1, 28, 28), 10


def write_fmnist_like(path: str, seed: int = 0) -> str:
    """Random 28x28 'images' whose label is a linear function of the pixels (learnable, like FMNIST)."""
    rng = numpy_rng(seed, "perf")
    w = rng.normal(size=(int(np.prod(SHAPE)), CLASSES)).astype(np.float32)
    arrays: dict[str, Any] = {}  # Any: np.savez's **kwds also names its `allow_pickle: bool`
    for k in range(CLIENTS):
        for split, n in (("train", N_TRAIN), ("test", N_TEST)):
            x = rng.random((n, *SHAPE), dtype=np.float32)
            arrays[f"{split}_x_{k}"] = x
            arrays[f"{split}_y_{k}"] = (x.reshape(n, -1) @ w).argmax(1)
    np.savez(path, **arrays)
    return path


def plain_loop(npz_path: str, rounds: int, lr: float, batch: int, seed: int = 0) -> list[float]:
    """FedAvg by hand in one process; returns seconds per round."""
    from fedeq_bench.methods.nets import build_model

    f = np.load(npz_path)
    data = [(torch.from_numpy(f[f"train_x_{k}"]), torch.from_numpy(f[f"train_y_{k}"])) for k in range(CLIENTS)]
    torch.manual_seed(seed)
    net = build_model("mlp", SHAPE, CLASSES)
    glob = {k: v.clone() for k, v in net.state_dict().items()}
    times = []
    for rnd in range(rounds):
        t0 = time.perf_counter()
        acc = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in glob.items()}
        for cid, (x, y) in enumerate(data):
            net.load_state_dict(glob)
            opt = torch.optim.SGD(net.parameters(), lr=lr)
            g = generator(seed, "local", rnd, cid)
            order = torch.randperm(len(y), generator=g)
            for s in range(0, len(y), batch):
                idx = order[s : s + batch]
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
            for k, v in net.state_dict().items():
                acc[k] += v.double() * len(y)
        glob = {k: (v / (CLIENTS * N_TRAIN)).float() for k, v in acc.items()}
        times.append(time.perf_counter() - t0)
    return times


def harness(npz_path: str, rounds: int, lr: float, batch: int, backend: str, workers: int,
            cpus: float = 1.0) -> list[np.float64]:
    """The harness's round loop (engine + backend), wall seconds per round."""
    from bench.experiment import load_dataset
    from bench.experiment.load import make_backend
    from bench.loop.engine import run_method

    cfg = C.apply(C.default_config(), {
        "methods": "fedavg", "dataset": f"npz:{npz_path}", "model": "mlp", "rounds": rounds, "fraction": 1.0,
        "local_epochs": 1, "batch_size": batch, "lr": lr, "val_frac": 0.0, "eval_every": rounds,
        "backend": backend, "workers": workers, "cpus_per_client": cpus,
    })
    ds = load_dataset(cfg, 0)
    assert all(c.num_train == N_TRAIN for c in ds.clients)
    be = make_backend(cfg.run)
    stamps = [time.perf_counter()]
    try:
        run_method(cfg, "fedavg", 0, ds, be, on_round=lambda r, m: stamps.append(time.perf_counter()))
    finally:
        be.close()
    # The last round also runs the final evaluation, which the plain loop does not do: drop it.
    return list(np.diff(stamps))[:-1]


def steady(times: Sequence[float], warmup: int) -> float:
    return statistics.median(times[warmup:])


def overhead_table(rounds: int = 30, warmup: int = 5, lr: float = 0.05, batch_size: int = 32,
                   workers: tuple[int, ...] = (1, 2)) -> str:
    """Measure the plain loop, the serial backend (1 thread and all cores) and Ray with each worker
    count; the Markdown table `python -m bench.perf` prints (seconds per round, ratio to plain)."""
    with tempfile.TemporaryDirectory() as d:
        path = write_fmnist_like(os.path.join(d, "fmnist_like.npz"))
        rows = []
        base = steady(plain_loop(path, rounds, lr, batch_size), warmup)
        rows.append((f"plain PyTorch loop (1 process, {torch.get_num_threads()} threads)", base))
        ncpu = os.cpu_count() or 1
        for threads in sorted({1, ncpu}):
            rows.append((f"harness, serial backend, {threads} thread{'s' if threads > 1 else ''}",
                         steady(harness(path, rounds, lr, batch_size, "serial", 1, threads), warmup)))
        for w in workers:
            # Each actor gets an equal share of the machine (as the plain loop gets all of it).
            cpus = max(1, ncpu // w)
            rows.append((f"harness, Ray, {w} worker{'s' if w > 1 else ''} x {cpus} CPU{'s' if cpus > 1 else ''}",
                         steady(harness(path, rounds, lr, batch_size, "ray", w, cpus), warmup)))
    return ratio_table(f"FedAvg, mlp, {CLIENTS} clients x {N_TRAIN} samples, all clients, 1 epoch, batch {batch_size}, "
                       f"{rounds} rounds; steady state = median of rounds {warmup + 1}..{rounds - 1}; "
                       f"{os.cpu_count()} CPUs", "setup", "s/round", rows, ".3f")


def ratio_table(title: str, first: str, unit: str, rows: list[tuple[str, float]], fmt: str) -> str:
    """A Markdown table of (name, seconds) rows with each row's ratio to the first (the plain loop)."""
    base = rows[0][1]
    body = [(name, f"{t:{fmt}}", f"{t / base:.2f}") for name, t in rows]
    return title + "\n" + text.table([first, unit, "ratio to plain"], body, right=[False, True, True])


# -- FeDEQ's local update -------------------------------------------------------------------------
# One client's local update, timed alone (no engine): FeDEQ on a DEQ model next to FedRep on the
# paired explicit model at equal epochs (FedRep's head_epochs = FeDEQ's personal_epochs, its
# local_epochs = shared_epochs), the reference's FEMNIST/CIFAR settings: 3 + 5 epochs, batch 10,
# lr 0.01. Inputs are 28x28 Fashion-MNIST-like images (write_fmnist_like's distribution).
UPDATE_PAIRS = {"deq_mlp": "mlp", "deq_resnet_s": "resnet20"}
UPDATE_SAMPLES = {"deq_mlp": 480, "deq_resnet_s": 40}  # deq_resnet_s: ~1/12 of a reference client
PERSONAL_EPOCHS, SHARED_EPOCHS, UPDATE_BATCH, UPDATE_LR = 3, 5, 10, 0.01


def update_setup(method: str, model: str, n: int, seed: int = 0, **overrides):
    """(update() closure, method instance) for one local update of `method` on `model` with n samples."""
    from bench.loop import wire
    from fedeq_bench.core.types import ClientTensors, Task
    from fedeq_bench.methods import METHODS
    from fedeq_bench.methods.nets import build_model

    g = generator(seed, "perf")
    w = torch.randn(int(np.prod(SHAPE)), CLASSES, generator=g)
    x = torch.rand(n, *SHAPE, generator=g)
    y = (x.flatten(1) @ w).argmax(1)
    data = ClientTensors(x, y, x[:8], y[:8], x[:8], y[:8])
    cls = METHODS.get(method)
    kw = {"model": model, "lr": UPDATE_LR, "batch_size": UPDATE_BATCH}
    if method == "fedeq":
        kw.update(personal_epochs=PERSONAL_EPOCHS, shared_epochs=SHARED_EPOCHS)
    elif method == "fedrep":
        kw.update(head_epochs=PERSONAL_EPOCHS, local_epochs=SHARED_EPOCHS)
    fields = set(getattr(cls.Config, "__dataclass_fields__", {}))
    kw.update({k: v for k, v in overrides.items() if k in fields})
    algo = cls(cls.Config(**kw), Task(model, SHAPE, CLASSES))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_model(model, SHAPE, CLASSES)
    server = algo.init_server(net, generator(seed, "server_init"))
    state = algo.init_client(0, server, generator(seed, "client_init", 0))
    down = wire.decode(wire.encode(algo.broadcast(server, 0, 1)))

    def update():
        return algo.local_update(down, state, data, generator(seed, "local", 1, 0))

    return update, algo


def time_update(method: str, model: str, n: int, repeats: int = 3, **overrides) -> tuple[float, dict]:
    """Median seconds of `repeats` local updates (after one warm-up call), and the last metrics."""
    update, _ = update_setup(method, model, n, **overrides)
    update()
    times, metrics = [], {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, _, metrics = update()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), metrics


def fedeq_update_table(models: tuple[str, ...] = ("deq_mlp", "deq_resnet_s"), repeats: int = 3,
                       threads: int = 1) -> str:
    """The Markdown table `python -m bench.perf --method fedeq` prints: seconds per local update."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        title = (f"One local update, {PERSONAL_EPOCHS} personal/head + {SHARED_EPOCHS} shared/body epochs, "
                 f"batch {UPDATE_BATCH}, {threads} thread{'s' if threads > 1 else ''}; median of {repeats}")
        body = []
        for model in models:
            n = UPDATE_SAMPLES[model]
            explicit = UPDATE_PAIRS[model]
            t_rep, _ = time_update("fedrep", explicit, n, repeats)
            rows: list[tuple[str, dict[str, Any]]]
            rows = [("fedeq (defaults: abs stop, reference Anderson, cached head z*, GMRES adjoint)", {}),
                    ("fedeq (rel stop, reference Anderson, cached head z*, GMRES adjoint)", {"stop_mode": "rel"}),
                    ("fedeq (abs stop, reference Anderson, head z* per batch, GMRES adjoint)",
                     {"cache_head_features": False}),
                    ("fedeq (defaults, but the old adjoint: Anderson, 20 steps)",
                     {"b_solver": "anderson", "b_max_iter": 20}),
                    ("fedeq (earlier defaults: rel stop, torchdeq Anderson, z* per batch, Anderson adjoint)",
                     {"stop_mode": "rel", "anderson_variant": "torchdeq", "cache_head_features": False,
                      "b_solver": "anderson", "b_max_iter": 20})]
            for name, kw in rows:
                t, m = time_update("fedeq", model, n, repeats, **kw)
                body.append((name, model, n, f"{t:.3f}", f"{m.get('deq/nstep_mean', float('nan')):.2f}",
                             f"{t / t_rep:.2f}"))
            body.append(("fedrep", explicit, n, f"{t_rep:.3f}", "-", "1.00"))
        columns = ["method", "model", "samples", "s/update", "deq/nstep_mean", "ratio to FedRep"]
        return title + "\n" + text.table(columns, body, right=[False, False, True, True, True, True])
    finally:
        torch.set_num_threads(prev)


# -- Whole process ---------------------------------------------------------------------------------
# The same workload timed as a user meets it: each command a fresh process, from `python` to exit,
# so imports, Ray's start, MLflow's store and the final evaluation count. The plain loop is a script
# doing only its training (torch imported, data loaded, 30 rounds, exit).
PLAIN_SCRIPT = ("import sys\nfrom bench.perf.workloads import plain_loop\n"
                "plain_loop(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))\n")


def bench_run_args(npz_path: str, rounds: int, lr: float, batch: int, uri: str) -> list[str]:
    """`python -m bench.run` flags of the workload (the module docstring's; no report, no bars)."""
    return ["--methods", "fedavg", "--dataset", f"npz:{npz_path}", "--model", "mlp", "--rounds", str(rounds),
            "--fraction", "1", "--local-epochs", "1", "--batch-size", str(batch), "--lr", str(lr),
            "--val-frac", "0", "--eval-every", str(rounds), "--tracking-uri", uri, "--quiet", "--no-report"]


def timed_process(argv: list[str], env: dict[str, str], cwd: str) -> float:
    """Wall seconds of one process, start to exit; a failure raises with its stderr's end."""
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {proc.returncode}: {proc.stderr[-2000:]}")
    return wall


def start_ray_head(env: dict[str, str], cpus: int):
    """`ray start --head --block` in its own process group (RAY_TMPDIR in `env` keeps it private);
    returns the Popen once its address file is written. `stop_ray_head` ends exactly this one
    (never `ray stop`, which stops every Ray instance of this user on the machine)."""
    import subprocess
    import sys

    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    address_file = os.path.join(env["RAY_TMPDIR"], "ray", "ray_current_cluster")
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--num-cpus={cpus}", "--port=0",
                             "--include-dashboard=false"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not os.path.exists(address_file):
        if head.poll() is not None or time.time() > deadline:
            stop_ray_head(head, env["RAY_TMPDIR"])
            raise RuntimeError("`ray start --head` did not come up")
        time.sleep(0.2)
    return head


def stop_ray_head(head, temp_dir: str | None = None) -> None:
    """SIGTERM to the head's process group (`--block` tears its node down), then SIGKILL to any
    process left whose command line names this head's private temp dir (Ray starts some of its
    node's processes in sessions of their own)."""
    import signal

    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
    except Exception:
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except OSError:
            pass
    if not temp_dir:
        return
    for pid in pids_naming(os.path.join(temp_dir, "ray", "session")):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def pids_naming(text: str) -> list[int]:
    """The processes whose command line contains `text` (e.g. a Ray instance's private temp dir)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def whole_process_table(rounds: int = 30, lr: float = 0.05, batch_size: int = 32,
                        workers: tuple[int, ...] = (1, 2), attach: bool = True, repeats: int = 3,
                        serial: bool = True, starting: bool = True) -> str:
    """Seconds from process start to exit: the plain loop as a script, `bench.run` on the serial
    backend, on Ray starting its own instance, and attached to a running `ray start --head`
    (`attach`; `serial` and `starting` drop those rows); for each worker count both the machine's
    CPUs shared out (`--cpus-per-client cpus // N`, like the plain loop's threads) and `--workers N`
    as typed (one CPU, one thread each). Each command runs `repeats` times, the commands interleaved
    (one of each, then again), and the table shows the median: on 2 cores one busy moment (the
    plain loop's 2 threads are the most sensitive) moves a single run by seconds. The head runs
    throughout, in its own temp dir, so every command meets the same machine. The Markdown table `python -m bench.perf --whole` prints."""
    import sys

    from bench.tracking import Tracker

    ncpu = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="wp", dir="/tmp") as d:  # short: Ray's socket paths
        path = write_fmnist_like(os.path.join(d, "fmnist_like.npz"))
        uri = f"sqlite:///{d}/mlflow.db"
        Tracker(uri, "fedeq-bench")  # the store and experiment exist, as after a user's first run
        # Private Ray temp dirs: a run attaches to the head only when told its temp dir, never by accident.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
        env["RAY_TMPDIR"] = d
        head_env = {**env, "RAY_TMPDIR": os.path.join(d, "h")}
        os.makedirs(head_env["RAY_TMPDIR"])
        run = [sys.executable, "-m", "bench.run", *bench_run_args(path, rounds, lr, batch_size, uri)]
        commands = [("plain PyTorch loop (a script)",
                     [sys.executable, "-c", PLAIN_SCRIPT, path, str(rounds), str(lr), str(batch_size)], env)]
        if serial:
            commands.append(("bench.run --backend serial", [*run, "--backend", "serial"], env))
        modes = ([("starting Ray", env)] if starting else []) + \
            ([("attached to `ray start --head`", head_env)] if attach else [])
        for how, where in modes:
            # Each worker count with the machine's CPUs shared out, and `--workers N` alone (its default
            # --cpus-per-client 1: one thread per actor) where that differs.
            for w, cpus in dict.fromkeys((n, c) for n in workers for c in (max(1, ncpu // n), 1)):
                commands.append((f"bench.run, Ray {w} worker{'s' if w > 1 else ''} x {cpus} CPU, {how}",
                                 [*run, "--workers", str(w), "--cpus-per-client", str(cpus)], where))
        head = start_ray_head(head_env, ncpu) if attach else None
        try:
            times: dict[str, list[float]] = {label: [] for label, _, _ in commands}
            for _ in range(repeats):
                for label, argv, where in commands:
                    times[label].append(timed_process(argv, where, d))
        finally:
            if head is not None:
                stop_ray_head(head, head_env["RAY_TMPDIR"])
    rows = [(label, statistics.median(t)) for label, t in times.items()]
    return ratio_table(f"Whole process (start to exit), FedAvg, mlp, {CLIENTS} clients x {N_TRAIN} samples, all "
                       f"clients, 1 epoch, batch {batch_size}, {rounds} rounds, final evaluation, no report; "
                       f"{ncpu} CPUs; median of {repeats} interleaved runs", "command", "wall s", rows, ".1f")