"""The library every command uses: check a config, load its data, run a method x seed inside its
MLflow run, summarize over seeds, and compare methods the way `python -m bench.run` does.

The command lines (`bench.run`, `bench.data`, `bench.perf`) only parse arguments and call one
function here; a sweep or a test calls the same functions, so there is one way to run an experiment.

    cfg = experiment.validate(config.from_cli(None, {"methods": "fedavg,fedrep"}, []))
    rows, parent_run_id = experiment.compare(cfg, command="python -m bench.run --methods fedavg,fedrep")
    print(experiment.format_table(rows))
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Callable, NamedTuple

from fedeq_bench.core.errors import BenchError

# -- checking and loading -------------------------------------------------------------------------


def validate(cfg):
    """Check names and ranges; expand `all`. Returns the config with concrete methods."""
    from fedeq_bench.bench.config import check_config
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
    # Ranges (finite floats, ints, bounds) are declared with each field; one rule checks them all.
    check_config(cfg)
    if not run.seeds:
        raise BenchError("seeds is empty; give e.g. --seeds 0,1,2")
    if not run.experiment.strip():
        raise BenchError(f"--experiment {run.experiment!r} is empty; give a name (the default is fedeq-bench)")
    if run.backend == "ray":  # --address and $RAY_ADDRESS: their form, and that a Ray answers there
        from fedeq_bench.bench.cluster import target

        target(run.address)
    if run.device == "cuda":
        import torch

        if not torch.cuda.is_available() and run.address is None:
            raise BenchError("--device cuda but this machine has no CUDA device (torch.cuda.is_available() is False); "
                             "use --device cpu or install a CUDA build of torch (see README)")
    return dataclasses.replace(cfg, run=dataclasses.replace(run, methods=methods))


def load_dataset(cfg, seed: int, sized: bool = False):
    """The federated dataset of `cfg.run` at `seed` (the seed draws the partition and held-out clients).

    Refused with one line, before anything is generated or read, when the dataset's own size
    estimate exceeds the memory available (bench/sizing.py; `sized`: the caller has estimated it
    already, as `load_checked` does for every seed at once); `get_dataset` checks what the loader
    returns (labels, lengths, empty clients, finite features: datasets/base.py `check_dataset`)."""
    from fedeq_bench.bench import sizing
    from fedeq_bench.datasets.base import DataArgs, get_dataset, split_dataset_name

    run = cfg.run
    name, _ = split_dataset_name(run.dataset)
    if not sized:
        sizing.check_before_load(cfg, seeds=[seed], whole_run=False)
    args = DataArgs(seed=seed, clients=run.clients, partition=run.partition, val_frac=run.val_frac,
                    frac_unseen=run.frac_unseen, data_dir=run.data_dir)
    return get_dataset(run.dataset, cfg.datasets[name], args)


def check_models(cfg, dataset) -> None:
    """Build each method's model on the driver and run two real training samples through it
    (`nets.probe`), so a model that cannot take this data fails before anything is recorded."""
    import torch

    from fedeq_bench.bench.config import resolve_method
    from fedeq_bench.methods.nets import probe

    first = next(c for c in dataset.clients if len(c.train_y))
    x = torch.from_numpy(first.train_x[:2].copy())  # as a worker hands it to the model (datasets stay read-only)
    for model in dict.fromkeys(resolve_method(cfg, m, dataset.default_models).model for m in cfg.run.methods):
        probe(model, dataset.input_shape, dataset.num_classes, x)


def load_checked(cfg) -> dict:
    """`{seed: dataset}` for every seed, each checked against every method's model: all the bad input
    a run can meet in its data shows up here, before a backend starts or a run is recorded. So does a
    run too big for this machine's memory (bench/sizing.py): estimated before any data is made (every
    seed's data, Ray's copy of it, the client states the methods keep), and again once it is loaded."""
    from fedeq_bench.bench import sizing

    sizing.check_before_load(cfg)  # every seed's data, more than each load_dataset would count
    datasets = {seed: load_dataset(cfg, seed, sized=True) for seed in cfg.run.seeds}
    sizing.check_after_load(cfg, datasets)  # before check_models builds a model that may not fit
    for ds in datasets.values():
        check_models(cfg, ds)
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
            on_round: Callable[[int, dict[str, float]], None] | None = None, checkpoints: bool = False,
            resume: str | None = None):
    """One method x seed in its own MLflow child run of `parent`, logged round by round.

    The run ends FINISHED, FAILED, KILLED (Ctrl-C, SIGTERM) or pruned (`on_round` raising
    `tracking.Pruned`, as a sweep's pruner will): `Tracker.run` says how. Returns the MethodResult.

    `checkpoints`: write bench/checkpoint.py's checkpoint among the child run's artifacts every
    `checkpoint_every` rounds and after the last (bench.run's comparisons do; a sweep's trials do
    not: a study resumes trial by trial). `resume`: the child run of this method x seed that an
    interrupted invocation left; it is reopened and continued from its checkpoint (from round 1 if it
    has none). Rounds redone after the checkpoint log only the metrics MLflow does not have yet: the
    values it has are the ones an uninterrupted run logs (the same numbers, as deterministic), except
    time/* and mem/peak_rss_bytes, whose first value stays. So every metric has one value per round.
    """
    from fedeq_bench.bench import checkpoint
    from fedeq_bench.bench import config as C
    from fedeq_bench.bench.engine import run_method

    model = C.resolve_method(cfg, method, dataset.default_models).model
    params = {k: v for k, v in C.flatten(cfg, [method], None).items() if k.startswith(f"{method}.")}
    params.update({
        "method": method, "seed": str(seed), "model": model, "dataset": cfg.run.dataset,
        "dataset_fingerprint": dataset.fingerprint, "partition": dataset.partition,
        "backend": backend.name, "workers": str(backend.workers),
    })
    opened = (reopened(tracker, resume) if resume else
              tracker.run(f"{method} seed={seed}", params, tags={"method": method, "seed": str(seed)}, parent=parent))
    with opened as child:
        ckpts = checkpoint.RunCheckpoints(tracker.client, child) if checkpoints or resume else None
        start = ckpts.load() if resume else None
        have = logged_steps(tracker.client, child) if resume else {}
        bar = None
        if not quiet:
            from tqdm import tqdm

            bar = tqdm(total=cfg.run.rounds, initial=start.round if start else 0, desc=f"{method:>8} seed {seed}",
                       unit="round", file=sys.stderr, leave=True, dynamic_ncols=True)

        def logged(rnd, metrics):
            new = {k: v for k, v in metrics.items() if rnd not in have.get(k, ())}
            if new:
                tracker.log_metrics(child, rnd, new)
            _kill_for_tests(method, seed, rnd)
            if bar is not None:
                post = {"MB": f"{metrics['bytes/cumulative'] / 1e6:.2f}"}
                if "acc/mean" in metrics:
                    post["acc"] = f"{metrics['acc/mean']:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if on_round is not None:
                on_round(rnd, metrics)

        try:
            result = run_method(cfg, method, seed, dataset, backend, logged, resume=start,
                                on_checkpoint=ckpts.save if checkpoints else None)
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


def compare(cfg, command: str = "", quiet: bool = False, resume: str | None = None,
            early=None) -> tuple[list[dict], str]:
    """What `python -m bench.run` does: every method x seed of a validated config, recorded in MLflow.

    Order matters for what a failure leaves behind: all data is loaded and every model checked, then
    the backend starts (a bad --address fails here), and only then is anything recorded. One parent
    run (params: the resolved config, git commit, `command`) holds a child run per method x seed and
    the summary (summary.md, summary.json). Returns (summary rows, parent run id). Raises BenchError on
    bad input and KeyboardInterrupt on Ctrl-C, with every run it started ended (FAILED or KILLED).

    `resume`: the parent run id of an interrupted invocation, with `cfg` its `recorded_config`: the
    same parent run and child runs are reopened (RUNNING again); a method x seed whose child run
    FINISHED is taken from its final checkpoint, one KILLED, FAILED or left RUNNING (kill -9)
    continues from its last checkpoint, one never started starts; the summary is as an uninterrupted
    invocation writes it.

    `early`: the actor pool bench.run started from its flags before loading the config and torch
    (bench/actor.py: `early_pool`). compare owns it from the call on: it is used if this config asks
    for the same pool, and stopped otherwise or on any error.
    """
    from fedeq_bench.bench import actor as A
    from fedeq_bench.bench import cli
    from fedeq_bench.bench import config as C
    from fedeq_bench.bench.backends import RayBackend, make_backend
    from fedeq_bench.bench.cluster import Background
    from fedeq_bench.bench.tracking import Tracker, check_store, git_commit, package_versions

    run = cfg.run
    starting = None

    try:
        if early is not None and (run.backend != "ray" or early.keys != A.pool_keys(run)):
            with cli.deferred_signals():  # not the pool this config asks for: stopped before another starts
                early.discard(A.Pool.close)
            early = None
        check_store(run.tracking_uri)  # an unreachable or read-only store: one line before Ray or data start
        if run.backend == "ray":
            # Ray and its actors start in the background while the data loads and MLflow is imported
            # (bench/cluster.py: Background), or started already (`early`, from bench.run's flags).
            # A bad --address is still raised before anything is recorded.
            starting, early = early or Background(lambda: A.start_pool_for(run), name="ray-start"), None
        with cli.handlers_kept():  # Ray starting in the background installs its own (bench/cli.py)
            datasets = load_checked(cfg)
            if starting is not None:
                _import_tracking(run.tracking_uri)
            backend = RayBackend(pool=starting.result()) if starting is not None else make_backend(run)
    except BaseException:
        for bg in (starting, early):
            if bg is not None:
                with cli.deferred_signals():  # a second Ctrl-C must not leave the starting Ray behind
                    bg.discard(A.Pool.close)  # stop the Ray nobody will use
        raise
    closed = False
    try:
        tracker = Tracker(run.tracking_uri, run.experiment)
        plan: dict = {}
        if resume is None:
            params = C.flatten(cfg, list(run.methods), run.dataset.split(":")[0])
            params.update({"git_commit": git_commit(), "command": command, **package_versions()})
            name = run.run_name or f"{'+'.join(run.methods)} on {run.dataset}"
            opened = tracker.run(name, params, tags={"kind": "comparison", **process_tags()})
        else:
            plan = resume_plan(tracker.client, resume, cfg)
            opened = reopened(tracker, resume, {**process_tags(), "resumed_by": command})
        with opened as parent:
            if not quiet:
                print(f"parent run {parent} (if interrupted: {PROG_HINT} --resume {parent})", file=sys.stderr)

            def one(method, seed):  # resuming: a finished pair's result, or the child run to continue
                done = plan.get((method, seed))
                if done is not None and not isinstance(done, str):
                    return done
                return run_one(cfg, tracker, parent, backend, method, seed, datasets[seed], quiet,
                               checkpoints=run.checkpoint_every > 0, resume=done)

            results = [one(method, seed) for seed in run.seeds for method in run.methods]
            closed = True
            with cli.deferred_signals():  # a Ctrl-C inside ray.shutdown would leave Ray's processes behind
                backend.close()  # free Ray's workers before the (quick) summary
            rows = summarize(results)
            tracker.log_text(parent, format_table(rows) + "\n", "summary.md")
            tracker.log_json(parent, rows, "summary.json")
        drop_checkpoints(tracker.client, parent)
    finally:
        if not closed:
            with cli.deferred_signals():
                backend.close()
    return rows, parent


def _import_tracking(uri: str) -> None:
    """Import MLflow's client (and its database store for a database URI) without opening a store:
    a second or two of imports that overlap Ray's start, while a bad --address still leaves no
    database behind."""
    import mlflow.tracking  # noqa: F401

    if uri.split(":", 1)[0].split("+")[0] in ("sqlite", "postgresql", "mysql", "mssql"):
        try:
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        except ImportError:  # moved in another MLflow version: the store imports it when opened
            pass


def report(cfg, parent: str, report_dir: str = "reports"):
    """Build the comparison report of one invocation (its parent run) into
    `report_dir/<experiment>-<parent id[:8]>/` and log it as artifacts of the parent run (report/).
    Returns bench.report's ReportPaths."""
    import os

    from fedeq_bench.bench import report as R
    from fedeq_bench.bench.report.markdown import slug
    from fedeq_bench.bench.tracking import open_client

    run = cfg.run
    out = os.path.join(report_dir, f"{slug(run.experiment, 60)}-{parent[:8]}")
    paths = R.build(run.tracking_uri, run.experiment, runs=[parent], out=out)
    R.log_artifacts(paths, open_client(run.tracking_uri), parent)
    return paths


def recorded_line(cfg, parent: str) -> str:
    """Where the runs went, and how to look at them."""
    run = cfg.run
    return (f"recorded in {run.tracking_uri} (experiment {run.experiment!r}, parent run {parent}); "
            f"browse with: mlflow ui --backend-store-uri {run.tracking_uri}")


# -- resuming an interrupted invocation (python -m bench.run --resume PARENT_RUN_ID) ---------------

PROG_HINT = "python -m bench.run"

RESUME_KEYS = ("tracking_uri", "backend", "workers", "address", "state_budget_gb", "checkpoint_every")
"""Run keys `--resume` accepts: where and how the work runs, never what it computes (Serial and Ray
runs are bit-identical, any worker count and state budget give the same numbers). Every other key
comes from the parent run's params; giving one would make the result differ from the run resumed."""

TEST_KILL_ENV = "FEDEQ_BENCH_TEST_KILL_AFTER"
"""TEST ONLY (tests/integration/test_resume.py). `METHOD:SEED:ROUND` makes the process SIGKILL itself
right after that round of that method x seed is logged: a `kill -9` at a known point, which the test
cannot time from outside. Unset (always, outside that test) it does nothing."""


def _kill_for_tests(method: str, seed: int, rnd: int) -> None:
    """See TEST_KILL_ENV: test-only, a no-op unless that variable names this very round."""
    import os

    if os.environ.get(TEST_KILL_ENV) == f"{method}:{seed}:{rnd}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def process_tags() -> dict[str, str]:
    """Host and process id on the parent run, so a resume can refuse a run whose process still lives."""
    import os
    import socket

    return {"bench.host": socket.gethostname(), "bench.pid": str(os.getpid())}


def _alive(pid: int) -> bool:
    """A bench process `pid` on this host (a reused pid of another program does not count)."""
    import os

    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"bench" in f.read()
    except OSError:
        return True


@contextlib.contextmanager
def reopened(tracker, run_id: str, tags: dict[str, str] | None = None):
    """`Tracker.run`'s lifecycle for a run that exists: RUNNING again (MLflow lets a run's status be
    updated), `tags` set, and ended as `Tracker.run` ends a run (FINISHED, FAILED or KILLED)."""
    from fedeq_bench.bench.tracking import status_for

    tracker.client.update_run(run_id, status="RUNNING")
    try:
        for k, v in (tags or {}).items():
            tracker.client.set_tag(run_id, k, str(v)[:5000])
        yield run_id
    except BaseException as e:
        tracker.end_quietly(run_id, status_for(e))
        raise
    tracker.end(run_id, "FINISHED")


def logged_steps(client, run_id: str) -> dict[str, set[int]]:
    """`{metric: {steps}}` the run has in MLflow."""
    run = client.get_run(run_id)
    return {k: {m.step for m in client.get_metric_history(run_id, k)} for k in run.data.metrics}


def _parent_run(client, tracking_uri: str, parent_id: str):
    """The comparison parent run `parent_id`, or one line saying why it cannot be resumed."""
    from mlflow.exceptions import MlflowException

    try:
        parent = client.get_run(parent_id)
    except MlflowException:
        raise BenchError(f"--resume: no run {parent_id!r} in tracking store {tracking_uri!r} (give the parent "
                         "run id bench.run printed, and --tracking-uri if its runs went elsewhere)") from None
    except Exception as e:  # an unreachable server, an unusable store
        raise BenchError(f"cannot use MLflow tracking store {tracking_uri!r}: {str(e).splitlines()[0][:200]}") from None
    tags = parent.data.tags
    if tags.get("kind") != "comparison" or "mlflow.parentRunId" in tags:
        what = "a child run (one method x seed)" if "mlflow.parentRunId" in tags else f"a {tags.get('kind', 'non-bench')} run"
        raise BenchError(f"--resume: run {parent_id} is {what}, not a bench.run comparison; give the parent run id "
                         "bench.run printed")
    if parent.info.status == "FINISHED":
        raise BenchError(f"nothing to resume: run {parent_id} is FINISHED")
    pid = tags.get("bench.pid", "")
    if (parent.info.status == "RUNNING" and pid.isdigit() and tags.get("bench.host") == process_tags()["bench.host"]
            and _alive(int(pid))):
        raise BenchError(f"run {parent_id} is still RUNNING in process {pid} on this host; stop it first "
                         "(Ctrl-C ends it KILLED) or let it finish")
    return parent


def recorded_config(tracking_uri: str, parent_id: str, overrides: dict | None = None):
    """The config an interrupted invocation ran with, read back from its parent run's params (the
    resolved config `compare` recorded), with `overrides` of `RESUME_KEYS` only. Validated.

    Its experiment is the parent run's, its store `tracking_uri` (where the run was found). Raises
    BenchError (one line) for an unknown run, a run that is not a comparison parent, a finished one,
    one whose process still runs, or an override that would change the results.
    """
    from fedeq_bench.bench import config as C
    from fedeq_bench.bench.tracking import open_client

    overrides = dict(overrides or {})
    bad = sorted(set(overrides) - set(RESUME_KEYS))
    if bad:
        raise BenchError(f"--resume continues run {parent_id} with the config recorded on it; "
                         f"{', '.join('--' + k.replace('_', '-') for k in bad)} would change its results "
                         f"(with --resume give only {', '.join('--' + k.replace('_', '-') for k in RESUME_KEYS)})")
    client = open_client(tracking_uri)  # MLflow's INFO lines silenced there, as for every store
    parent = _parent_run(client, tracking_uri, parent_id)
    cfg = C.default_config()
    sections = {"run", *cfg.methods, *cfg.datasets}
    recorded = {k: v for k, v in parent.data.params.items() if k.rpartition(".")[0] in sections}
    try:
        cfg = C.apply(cfg, recorded)
    except BenchError as e:
        raise BenchError(f"run {parent_id} was recorded with a config this version cannot read back: {e}") from None
    from fedeq_bench.bench.tracking import git_commit

    then, now = parent.data.params.get("git_commit", "unknown"), git_commit()
    if then != now:  # a warning, not a refusal: a checkout with local edits is the everyday case
        print(f"warning: run {parent_id} was recorded at commit {then}, this checkout is {now}; if the code "
              "that computes results changed, the resumed rounds differ from an uninterrupted run", file=sys.stderr)
    experiment = client.get_experiment(parent.info.experiment_id).name
    cfg = C.apply(cfg, {**overrides, "tracking_uri": tracking_uri, "experiment": experiment})
    return validate(cfg)


def resume_plan(client, parent_id: str, cfg) -> dict:
    """What an interrupted invocation left, per (method, seed) of `cfg`: the MethodResult of a child
    run that FINISHED (from its final checkpoint), or the id of a child run to continue. A pair with
    no child run is absent (it starts afresh). Checked whole before anything is reopened."""
    from fedeq_bench.bench import checkpoint

    parent = client.get_run(parent_id)
    wanted = {(m, s) for m in cfg.run.methods for s in cfg.run.seeds}
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                  max_results=50000)
    found = {}
    for c in sorted(children, key=lambda r: r.info.start_time):  # a pair run twice: the newest
        seed = c.data.params.get("seed", "")
        key = (c.data.params.get("method"), int(seed) if seed.lstrip("-").isdigit() else None)
        if key in wanted:
            found[key] = c
    plan: dict = {}
    for (method, seed), c in found.items():
        ck = checkpoint.RunCheckpoints(client, c.info.run_id).load()  # a damaged one fails here, before any change
        if c.info.status != "FINISHED":
            plan[method, seed] = c.info.run_id
            continue
        if ck is None or ck.round != cfg.run.rounds:
            raise BenchError(f"child run {c.info.run_id} ({method} seed={seed}) is FINISHED but has no final checkpoint "
                             f"({checkpoint.ARTIFACT_PATH}; recorded with --checkpoint-every 0?), so its summary "
                             "row cannot be rebuilt")
        plan[method, seed] = finished_result(c, ck)
    return plan


def drop_checkpoints(client, parent_id: str) -> None:
    """Remove the checkpoints of a FINISHED invocation's child runs: nothing can resume it any more,
    and each holds every client state (the rest of the child's artifacts and metrics stay)."""
    from fedeq_bench.bench import checkpoint

    parent = client.get_run(parent_id)
    for c in client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                max_results=50000):
        try:
            checkpoint.RunCheckpoints(client, c.info.run_id).remove()
        except OSError as e:  # the results are recorded; a file left behind is only disk space
            print(f"warning: could not remove the checkpoint of run {c.info.run_id}: {e}", file=sys.stderr)


def finished_result(child, ck):
    """The MethodResult of a FINISHED child run, from its final checkpoint and its params."""
    from fedeq_bench.bench.engine import MethodResult

    p = child.data.params
    ck.check(method=p["method"], seed=int(p["seed"]), dataset_fingerprint=p.get("dataset_fingerprint"))
    result = MethodResult(p["method"], int(p["seed"]), p.get("model", "?"), history=ck.history(), ledger=ck.ledger(),
                          wall_s=float(ck.meta["wall_s"]), params_shared=int(p.get("params/shared", 0)),
                          params_personal=int(p.get("params/personal", 0)))
    result.clients = ck.meta["clients"]
    return result
