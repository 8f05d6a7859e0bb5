"""The library every command uses: check a config, load its data, run a method x seed inside its
MLflow run, summarize over seeds, and compare methods the way `python -m bench.run` does.

The command lines (`bench.run`, `bench.data`, `bench.perf`) only parse arguments and call one
function here; a sweep or a test calls the same functions, so there is one way to run an experiment.

    cfg = experiment.validate(config.from_cli(None, {"methods": "fedavg,fedrep"}, []))
    rows, parent_run_id = experiment.compare(cfg, command="python -m bench.run --methods fedavg,fedrep")
    print(experiment.format_table(rows))
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable, NamedTuple

from fedeq_bench.core.errors import BenchError

# -- checking and loading -------------------------------------------------------------------------


def validate(cfg):
    """Check names and ranges; expand `all`. Returns the config with concrete methods."""
    from fedeq_bench.core.errors import unknown
    from fedeq_bench.datasets.base import DATASETS, split_dataset_name
    from fedeq_bench.methods import METHODS
    from fedeq_bench.methods.nets import MODELS

    run = cfg.run
    methods = run.methods
    if methods == ("all",):
        methods = tuple(METHODS.names())
    if not methods:
        raise BenchError(f"--methods is empty; choose from {', '.join(METHODS.names())} or all")
    for m in methods:
        if m not in METHODS:
            raise unknown("method", m, METHODS.names())
    if len(set(methods)) != len(methods):
        raise BenchError(f"--methods lists a method twice: {','.join(methods)}")
    name, _ = split_dataset_name(run.dataset)
    if name not in DATASETS:
        raise BenchError(f"unknown dataset {run.dataset!r}; choose from {', '.join(DATASETS.names())} or npz:PATH")
    models = [run.model] + [cfg.methods[m].model for m in methods]
    for mod in models:
        if mod and mod not in MODELS:
            raise unknown("model", mod, MODELS.names())
    checks = [
        (run.rounds >= 1, f"rounds must be >= 1, got {run.rounds}"),
        (0 < run.fraction <= 1, f"fraction must be in (0, 1], got {run.fraction}"),
        (run.clients is None or run.clients >= 1, f"clients must be >= 1, got {run.clients}"),
        (run.local_epochs >= 0, f"local_epochs must be >= 0, got {run.local_epochs}"),
        (run.batch_size >= 1, f"batch_size must be >= 1, got {run.batch_size}"),
        (run.lr > 0, f"lr must be > 0, got {run.lr}"),
        (run.eval_every >= 1, f"eval_every must be >= 1, got {run.eval_every}"),
        (len(run.seeds) >= 1, "seeds is empty; give e.g. --seeds 0,1,2"),
        (run.workers is None or run.workers >= 1, f"workers must be >= 1, got {run.workers}"),
        (run.cpus_per_client >= 0 and run.gpus_per_client >= 0, "cpus/gpus per client must be >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise BenchError(msg)
    if run.device == "cuda":
        import torch

        if not torch.cuda.is_available() and run.address is None:
            raise BenchError("--device cuda but this machine has no CUDA device (torch.cuda.is_available() is False); "
                             "use --device cpu or install a CUDA build of torch (see README)")
    return dataclasses.replace(cfg, run=dataclasses.replace(run, methods=methods))


def load_dataset(cfg, seed: int):
    """The federated dataset of `cfg.run` at `seed` (the seed draws the partition and held-out clients)."""
    from fedeq_bench.datasets.base import DataArgs, get_dataset, split_dataset_name

    run = cfg.run
    name, _ = split_dataset_name(run.dataset)
    args = DataArgs(seed=seed, clients=run.clients, partition=run.partition, val_frac=run.val_frac,
                    frac_unseen=run.frac_unseen, data_dir=run.data_dir)
    return get_dataset(run.dataset, cfg.datasets[name], args)


def check_models(cfg, dataset) -> None:
    """Build each method's model once on the driver so a mismatch fails before anything is recorded."""
    from fedeq_bench.bench.config import resolve_method
    from fedeq_bench.methods.nets import build_model

    for m in cfg.run.methods:
        build_model(resolve_method(cfg, m, dataset.default_models).model, dataset.input_shape, dataset.num_classes)


def load_checked(cfg) -> dict:
    """`{seed: dataset}` for every seed, each checked against every method's model: all the bad input
    a run can meet in its data shows up here, before a backend starts or a run is recorded."""
    datasets = {}
    for seed in cfg.run.seeds:
        datasets[seed] = load_dataset(cfg, seed)
        check_models(cfg, datasets[seed])
    return datasets


def describe_data(cfg, seed: int, plot: str | None = None) -> str:
    """`bench.data describe`: per-client sizes and label histograms, and the heat map saved to `plot`."""
    from fedeq_bench.datasets.describe import describe, plot_label_distribution

    ds = load_dataset(cfg, seed)
    text = describe(ds)
    if plot:
        try:
            path = plot_label_distribution(ds, plot)
        except (OSError, ValueError) as e:  # unwritable path, unknown image format
            raise BenchError(f"cannot save the plot to {plot!r}: {e}") from None
        text += f"\n\nlabel distribution plot saved to {path}"
    return text


# -- over seeds -----------------------------------------------------------------------------------


class Stat(NamedTuple):
    """A metric over seeds. A pair, so summary.json holds `[mean, std]` as it always has."""

    mean: float
    std: float
    """The SAMPLE standard deviation (ddof=1) over seeds; 0.0 with one seed (no spread to estimate)."""


def seed_stat(values) -> Stat:
    """Mean and sample std (ddof=1) of one metric over seeds; std 0.0 for a single seed.

    Seeds are a small sample of the runs one could draw, so the sample std (divide by n - 1) is the
    estimate of their spread; the population std (numpy's default ddof=0) understates it by a factor
    sqrt((n - 1) / n), 0.82 with three seeds.
    """
    import numpy as np

    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("seed_stat of no values")
    return Stat(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0)


# Summary column -> how to read it from a MethodResult (final round, never the best round).
SUMMARY = {
    "acc/mean": lambda r: r.final["acc/mean"],
    "acc/weighted": lambda r: r.final["acc/weighted"],
    "acc/bottom10": lambda r: r.final["acc/bottom10"],
    "mb_up": lambda r: r.ledger.total("up") / 1e6,
    "mb_down": lambda r: r.ledger.total("down") / 1e6,
    "peak_train_mb": lambda r: r.peak("mem/peak_train_bytes") / 1e6,
    "wall_s": lambda r: r.wall_s,
}


def summarize(results) -> list[dict]:
    """One row per method (in first-seen order): its model, its number of seeds, and a `Stat`
    (mean, sample std with ddof=1) over seeds of each `SUMMARY` column."""
    rows = []
    for method in dict.fromkeys(r.method for r in results):
        rs = [r for r in results if r.method == method]
        row = {"method": method, "model": rs[0].model, "seeds": len(rs)}
        row.update({name: seed_stat(get(r) for r in rs) for name, get in SUMMARY.items()})
        rows.append(row)
    return rows


# (header, summary column, format) of the terminal table, in order.
TABLE = [("acc/mean", "acc/mean", ".4f"), ("acc/weighted", "acc/weighted", ".4f"),
         ("acc/bottom10", "acc/bottom10", ".4f"), ("MB up", "mb_up", ".2f"), ("MB down", "mb_down", ".2f"),
         ("peak train MB", "peak_train_mb", ".3f"), ("wall s", "wall_s", ".1f")]


def format_table(rows) -> str:
    """The Markdown table the CLI prints and stores as summary.md.

    A cell is the mean; with several seeds it is `mean ± std` (even `± 0.00`: equal bytes across
    seeds is a finding too), and a footnote says the std is the sample std over how many seeds.
    """
    def cell(stat, fmt, seeds):
        return f"{stat.mean:{fmt}}" + (f" ± {stat.std:{fmt}}" if seeds > 1 else "")

    head = ["method", "model", *(h for h, _, _ in TABLE)]
    body = [[r["method"], r["model"], *(cell(Stat(*r[key]), fmt, r["seeds"]) for _, key, fmt in TABLE)]
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)]
    seeds = sorted({r["seeds"] for r in rows if r["seeds"] > 1})
    if seeds:
        out.append(f"\nmean ± sample std (ddof=1) over {' or '.join(map(str, seeds))} seeds; final round")
    return "\n".join(out)


# -- runs in MLflow -------------------------------------------------------------------------------


def run_one(cfg, tracker, parent: str | None, backend, method: str, seed: int, dataset, quiet: bool = True,
            on_round: Callable[[int, dict[str, float]], None] | None = None):
    """One method x seed in its own MLflow child run of `parent`, logged round by round.

    The run ends FINISHED, FAILED, KILLED (Ctrl-C, SIGTERM) or pruned (`on_round` raising
    `tracking.Pruned`, as a sweep's pruner will): `Tracker.run` says how. Returns the MethodResult.
    """
    from fedeq_bench.bench import config as C
    from fedeq_bench.bench.engine import run_method

    model = C.resolve_method(cfg, method, dataset.default_models).model
    params = {k: v for k, v in C.flatten(cfg, [method], None).items() if k.startswith(f"{method}.")}
    params.update({
        "method": method, "seed": str(seed), "model": model, "dataset": cfg.run.dataset,
        "dataset_fingerprint": dataset.fingerprint, "partition": dataset.partition,
        "backend": backend.name, "workers": str(backend.workers),
    })
    with tracker.run(f"{method} seed={seed}", params, tags={"method": method, "seed": str(seed)},
                     parent=parent) as child:
        bar = None
        if not quiet:
            from tqdm import tqdm

            bar = tqdm(total=cfg.run.rounds, desc=f"{method:>8} seed {seed}", unit="round", file=sys.stderr,
                       leave=True, dynamic_ncols=True)

        def logged(rnd, metrics):
            tracker.log_metrics(child, rnd, metrics)
            if bar is not None:
                post = {"MB": f"{metrics['bytes/cumulative'] / 1e6:.2f}"}
                if "acc/mean" in metrics:
                    post["acc"] = f"{metrics['acc/mean']:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if on_round is not None:
                on_round(rnd, metrics)

        try:
            result = run_method(cfg, method, seed, dataset, backend, logged)
        finally:
            if bar is not None:
                bar.close()
        tracker.log_params(child, {"params/shared": str(result.params_shared),
                                   "params/personal": str(result.params_personal)})
        tracker.log_text(child, result.ledger.to_csv(), "ledger.csv")
        if result.clients:
            tracker.log_text(child, clients_csv(result.clients), "clients.csv")
    return result


CLIENT_COLUMNS = ("cid", "group", "test_acc", "test_n", "val_acc", "val_n")


def clients_csv(rows) -> str:
    """The final evaluation per client (engine.client_rows) as CSV; floats as repr (exact round trip)."""
    lines = [",".join(CLIENT_COLUMNS)]
    lines += [",".join(str(r[c]) if c in ("cid", "group") else repr(float(r[c])) for c in CLIENT_COLUMNS)
              for r in rows]
    return "\n".join(lines) + "\n"


def compare(cfg, command: str = "", quiet: bool = False) -> tuple[list[dict], str]:
    """What `python -m bench.run` does: every method x seed of a validated config, recorded in MLflow.

    Order matters for what a failure leaves behind: all data is loaded and every model checked, then
    the backend starts (a bad --address fails here), and only then is anything recorded. One parent
    run (params: the resolved config, git commit, `command`) holds a child run per method x seed and
    the summary (summary.md, summary.json). Returns (summary rows, parent run id). Raises BenchError on
    bad input and KeyboardInterrupt on Ctrl-C, with every run it started ended (FAILED or KILLED).
    """
    from fedeq_bench.bench import config as C
    from fedeq_bench.bench.backends import make_backend
    from fedeq_bench.bench.tracking import Tracker, git_commit, package_versions

    run = cfg.run
    datasets = load_checked(cfg)
    backend = make_backend(run)
    closed = False
    try:
        tracker = Tracker(run.tracking_uri, run.experiment)
        params = C.flatten(cfg, list(run.methods), run.dataset.split(":")[0])
        params.update({"git_commit": git_commit(), "command": command, **package_versions()})
        name = run.run_name or f"{'+'.join(run.methods)} on {run.dataset}"
        with tracker.run(name, params, tags={"kind": "comparison"}) as parent:
            results = [run_one(cfg, tracker, parent, backend, method, seed, datasets[seed], quiet)
                       for seed in run.seeds for method in run.methods]
            closed = True
            backend.close()  # free Ray's workers before the (quick) summary
            rows = summarize(results)
            tracker.log_text(parent, format_table(rows) + "\n", "summary.md")
            tracker.log_json(parent, rows, "summary.json")
    finally:
        if not closed:
            backend.close()
    return rows, parent


def report(cfg, parent: str, report_dir: str = "reports"):
    """Build the comparison report of one invocation (its parent run) into
    `report_dir/<experiment>-<parent id[:8]>/` and log it as artifacts of the parent run (report/).
    Returns bench.report's ReportPaths."""
    import os

    from mlflow.tracking import MlflowClient

    from fedeq_bench.bench import report as R
    from fedeq_bench.bench.report.markdown import slug

    run = cfg.run
    out = os.path.join(report_dir, f"{slug(run.experiment, 60)}-{parent[:8]}")
    paths = R.build(run.tracking_uri, run.experiment, runs=[parent], out=out)
    R.log_artifacts(paths, MlflowClient(tracking_uri=run.tracking_uri), parent)
    return paths


def recorded_line(cfg, parent: str) -> str:
    """Where the runs went, and how to look at them."""
    run = cfg.run
    return (f"recorded in {run.tracking_uri} (experiment {run.experiment!r}, parent run {parent}); "
            f"browse with: mlflow ui --backend-store-uri {run.tracking_uri}")
