"""Round time and memory against the number of clients: `python -m bench.perf --scale`.

The workload: FedProx's Synthetic(0.5, 0.5) (datasets/synthetic.py) with 100, 1,000 and 10,000
clients, FedAvg (`mlp`) and FeDEQ (`deq_mlp`), the serial backend with 1 thread, a fixed cohort of
COHORT clients per round, evaluation every EVAL_EVERY rounds on a sample of EVAL_CLIENTS clients
(`--eval-clients`). What should hold: time per round follows the clients trained and evaluated (the
same at every size here), memory follows the client states kept (the clients that have trained),
and neither grows with the clients that sit idle.

Each (method, clients) runs in a process of its own, so its peak RSS is its own. The run stops
before its final round: that round scores every client (personalizing the never-sampled ones) by
design, so it costs what the whole federation costs and is not a per-round figure.

Columns: `data MB` RSS added by generating and holding the dataset (all clients' samples: it grows
with the federation, idle clients included, since it is the data); `load s` its generation time;
`train s/round` the median time of a round's local updates, `eval s` of an evaluation (rounds 2 on:
the first pays one-off start-up); `samples/round` the median number of training samples in a
round's cohort (clients' sizes are heavy-tailed, LogNormal(4, 2) + 50: a round's time follows
them, whichever clients the schedule draws); `engine ms/round` the median time of a round outside
the clients' work (local updates, evaluation): schedule, broadcast, encoding, aggregation, the client store,
choosing the evaluation sample, i.e. what would grow if idle clients cost anything; `states` the client states kept at the end (in memory + on
disk) and their MB; `RSS growth MB` the largest RSS during the rounds minus the RSS before the
first; `peak RSS MB` the process's high-water mark (`ru_maxrss`, data generation included).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from bench.report import text

CLIENTS = (100, 1000, 10000)
METHODS = ("fedavg", "fedeq")
COHORT = 10
"""Clients trained per round, at every size (a fixed cohort: fraction = COHORT / clients)."""
ROUNDS = 6
"""Rounds measured (the run is set up with one more, the final one, which is not run)."""
EVAL_EVERY = 2
EVAL_CLIENTS = 20


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _Stop(Exception):
    """Raised from on_round after the last measured round, before the (whole-federation) final one."""


def measure(method: str, clients: int, cohort: int = COHORT, rounds: int = ROUNDS, eval_every: int = EVAL_EVERY,
            eval_clients: int | None = EVAL_CLIENTS, state_budget_gb: float | None = None, seed: int = 0) -> dict:
    """One (method, clients) in this process: the figures of one table row (see the module docstring)."""
    import dataclasses

    import torch

    from bench import config as C
    from bench.experiment import load_dataset
    from bench.loop import engine
    from bench.loop.backends import Kind, SerialBackend
    from bench.loop.memory import peak_rss_bytes

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the driver too, like the clients (SerialBackend(threads=1)): one core's figures
    keys = {f.name for f in dataclasses.fields(C.RunConfig)}
    over = {"methods": method, "dataset": "synthetic", "clients": clients, "rounds": rounds + 1,
            "fraction": cohort / clients, "eval_every": eval_every, "backend": "serial",
            "eval_clients": eval_clients, "state_budget_gb": state_budget_gb}
    # Older revisions (a before/after comparison) lack the scale keys: they evaluate everyone.
    cfg = C.apply(C.default_config(), {k: v for k, v in over.items() if k in keys})
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    ds = load_dataset(cfg, seed)
    load_s = time.perf_counter() - t0
    rss_data = rss_bytes()

    # The store the engine makes, to read how many states it kept (a measurement hook, put back below).
    # Any: the engine module of the revision measured, whose ClientStore may be missing, and is swapped.
    hooked: Any = engine
    stores: list[Any] = []
    real_store: Any = getattr(engine, "ClientStore", None)
    if real_store is not None:
        class Seen(real_store):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                stores.append(self)

        hooked.ClientStore = Seen
    history, rss_max, spent = [], [rss_bytes()], {"train": 0.0, "eval": 0.0}

    class Timed(SerialBackend):
        """Seconds of clients' work, training and evaluation apart."""

        def run(self, kind, *a, **kw):
            t = time.perf_counter()
            try:
                return super().run(kind, *a, **kw)  # a list: the clients' work is done on return
            finally:
                spent["train" if kind is Kind.TRAIN else "eval"] += time.perf_counter() - t

    rows = []  # (round, train s, eval s, engine s)

    def on_round(rnd, metrics):
        history.append(metrics)
        rows.append((rnd, spent["train"], spent["eval"], metrics["time/round_s"] - spent["train"] - spent["eval"]))
        spent.update(train=0.0, eval=0.0)
        rss_max.append(rss_bytes())
        if rnd == rounds:
            raise _Stop

    rss_start = rss_bytes()
    try:
        engine.run_method(cfg, method, seed, ds, Timed(threads=1), on_round)
    except _Stop:
        pass
    finally:
        if real_store is not None:
            hooked.ClientStore = real_store
        torch.set_num_threads(threads)
    cohorts = engine.make_schedule(seed, ds.train_ids, rounds + 1, cfg.run.fraction)[1:rounds]
    samples = statistics.median(sum(ds.clients[c].num_train for c in cohort) for cohort in cohorts)
    steady = rows[1:]  # round 1 pays one-off start-up (building the method, first touches)
    evald = [ev for rnd, _, ev, _ in steady if rnd % eval_every == 0]
    store = stores[0] if stores else None
    return {
        "method": method, "clients": clients, "cohort": cohort, "eval_clients": eval_clients if "eval_clients" in keys
        else None, "load_s": load_s, "data_mb": (rss_data - rss0) / 1e6,
        "train_s": statistics.median(tr for _, tr, _, _ in steady),
        "eval_s": statistics.median(evald) if evald else float("nan"), "samples": samples,
        "engine_ms": 1e3 * statistics.median(en for _, _, _, en in steady),
        "states": len(store) if store is not None else None,
        "states_mb": (store.mem_bytes + store.disk_bytes) / 1e6 if store is not None else None,
        "on_disk": store.stats()["on_disk"] if store is not None else None,
        "rss_growth_mb": (max(rss_max) - rss_start) / 1e6, "peak_rss_mb": peak_rss_bytes() / 1e6,
    }


def measure_in_subprocess(method: str, clients: int, **kw) -> dict:
    """`measure` in a fresh Python process (its own peak RSS); raises with the child's stderr on failure."""
    args = [sys.executable, "-m", "bench.perf.scale", "--one", method, str(clients), json.dumps(kw)]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{method} at {clients} clients failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


COLUMNS = ["method", "clients", "data MB", "load s", "train s/round", "eval s", "engine ms/round", "samples/round",
           "states kept", "RSS growth MB", "peak RSS MB"]


def fmt_row(r: dict) -> list[str]:
    states = "-" if r["states"] is None else f"{r['states']} ({r['states_mb']:.1f} MB" + (
        f", {r['on_disk']} on disk)" if r["on_disk"] else ")")
    return [r["method"], f"{r['clients']:,}", f"{r['data_mb']:.0f}", f"{r['load_s']:.1f}", f"{r['train_s']:.3f}",
            f"{r['eval_s']:.3f}", f"{r['engine_ms']:.1f}", f"{r['samples']:.0f}", states,
            f"{r['rss_growth_mb']:.1f}", f"{r['peak_rss_mb']:.0f}"]


def scale_table(clients=CLIENTS, methods=METHODS, **kw) -> str:
    """Measure every (method, clients) and return the Markdown table `python -m bench.perf --scale` prints."""
    rows = [measure_in_subprocess(m, n, **kw) for m in methods for n in clients]
    cohort, rounds = kw.get("cohort", COHORT), kw.get("rounds", ROUNDS)
    every, sample = kw.get("eval_every", EVAL_EVERY), kw.get("eval_clients", EVAL_CLIENTS)
    budget = kw.get("state_budget_gb")
    title = (f"synthetic, serial backend, 1 thread; {cohort} clients trained per round, evaluation every {every} "
             f"rounds on {sample} sampled clients; rounds 2..{rounds} (medians), final round not run"
             + (f"; --state-budget-gb {budget}" if budget is not None else "") + f"; {os.cpu_count()} CPUs")
    right = [c not in ("method", "states kept") for c in COLUMNS]
    return title + "\n" + text.table(COLUMNS, [fmt_row(r) for r in rows], right)


def main(argv=None) -> int:
    """The child of `measure_in_subprocess`: `--one METHOD CLIENTS KWARGS_JSON` prints one measurement
    as JSON. The table itself is `python -m bench.perf --scale`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] != ["--one"] or len(argv) != 4:
        sys.stderr.write("usage: python -m bench.perf.scale --one METHOD CLIENTS KWARGS_JSON "
                         "(the scale table: python -m bench.perf --scale)\n")
        return 2
    method, clients, kw = argv[1], int(argv[2]), json.loads(argv[3])
    print(json.dumps(measure(method, clients, **kw)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
