"""Run a method x seed inside its MLflow child run, and compare methods the way `python -m bench.run`
does: one parent run per invocation, a child run per method x seed, the summary and the report."""
from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable

from bench.experiment.load import load_checked
from bench.experiment.resume import drop_checkpoints, logged_steps, process_tags, reopened, resume_command, resume_plan
from bench.experiment.summary import clients_csv, format_table, summarize
from fedeq_bench.core.errors import Diverged


def run_one(cfg, tracker, parent: str | None, backend, method: str, seed: int, dataset, quiet: bool = True,
            on_round: Callable[[int, dict[str, float]], None] | None = None, checkpoints: bool = False,
            resume: str | None = None):
    """One method x seed in its own MLflow child run of `parent`, logged round by round.

    The run ends FINISHED, FAILED, KILLED (Ctrl-C, SIGTERM) or pruned (`on_round` raising
    `tracking.Pruned`, as a sweep's pruner will): `Tracker.run` says how. Returns the MethodResult.

    `checkpoints`: write bench/loop/checkpoint.py's checkpoint among the child run's artifacts every
    `checkpoint_every` rounds and after the last (bench.run's comparisons do; a sweep's trials do
    not: a study resumes trial by trial). `resume`: the child run of this method x seed that an
    interrupted invocation left; it is reopened and continued from its checkpoint (from round 1 if it
    has none). Rounds redone after the checkpoint log only the metrics MLflow does not have yet: the
    values it has are the ones an uninterrupted run logs (the same numbers, as deterministic), except
    time/* and mem/peak_rss_bytes, whose first value stays. So every metric has one value per round.
    """
    from bench import config as C
    from bench.loop import checkpoint, devices, wire
    from bench.loop.engine import run_method

    mcfg = C.resolve_method(cfg, method, dataset.default_models)
    params = {k: v for k, v in C.flatten(cfg, [method], None).items() if k.startswith(f"{method}.")}
    params.update({
        "method": method, "seed": str(seed), "model": mcfg.model, "dataset": cfg.run.dataset,
        "dataset_fingerprint": dataset.fingerprint, "partition": dataset.partition,
        "backend": backend.name, "workers": str(backend.workers),
        "wire": wire.codec_of(mcfg).label, "devices": devices.load(cfg.run.devices).label,
    })
    opened = (reopened(tracker, resume) if resume else
              tracker.run(f"{method} seed={seed}", params, tags={"method": method, "seed": str(seed)}, parent=parent))
    with opened as child:
        ckpts = checkpoint.RunCheckpoints(tracker.client, child) if checkpoints or resume else None
        start = ckpts.load() if resume and ckpts is not None else None
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
                                on_checkpoint=ckpts.save if checkpoints and ckpts is not None else None)
        except Diverged as e:  # the run ends FAILED; the tag says why (reports name it)
            tracker.client.set_tag(child, "diverged", str(e)[:5000])
            raise
        finally:
            if bar is not None:
                bar.close()
        tracker.log_params(child, {"params/shared": str(result.params_shared),
                                   "params/personal": str(result.params_personal)})
        tracker.log_text(child, result.ledger.to_csv(), "ledger.csv")
        if result.clients:
            tracker.log_text(child, clients_csv(result.clients), "clients.csv")
    return result


@dataclasses.dataclass
class Progress:
    """What `compare` has recorded so far, for the line an interrupt prints (`interrupted`): which runs
    end KILLED, which stay FINISHED, and the command that continues. The caller makes it and may set
    `command` (the invocation as it runs here), `resume_flags` (flags the --resume command repeats)
    and, once every run has finished, `report` (the command that writes the report)."""

    command: str = ""
    resume_flags: tuple[str, ...] = ()
    report: str = ""
    parent: str | None = None
    """The parent run, once it is recorded (or reopened)."""
    resume: str = ""
    """The command that continues the parent run (`resume_command`)."""
    pairs: list[str] = dataclasses.field(default_factory=list)
    """Every method x seed of the invocation, `fedrep seed 0`, in the order they run."""
    finished: list[str] = dataclasses.field(default_factory=list)
    diverged: dict[str, str] = dataclasses.field(default_factory=dict)
    """`fedeq seed 0` -> its divergence, for the runs `keep_going` went on past (FAILED)."""
    running: str | None = None
    done: bool = False
    """Every run FINISHED and the parent run ended FINISHED."""

    def interrupted(self) -> str:
        """One line: what the interrupt left and how to go on."""
        if self.parent is None:
            return "interrupted before anything was recorded" + (f"; start again with: {self.command}"
                                                                  if self.command else "")
        if self.done:
            return (f"interrupted after every run had FINISHED (parent run {self.parent}); "
                    + (f"the report was not finished; write it with: {self.report}" if self.report
                       else "nothing is lost"))
        killed = ", ".join([f"the parent run {self.parent}"]
                           + ([f"{self.running} (its rounds so far are kept)"] if self.running else []))
        parts = [f"KILLED: {killed}"]
        if self.finished:
            parts.append(f"FINISHED (kept as they are): {', '.join(self.finished)}")
        if self.diverged:
            parts.append(f"FAILED, diverged: {', '.join(self.diverged)}")
        left = [p for p in self.pairs if p not in self.finished and p not in self.diverged and p != self.running]
        if left:
            parts.append(f"not started: {', '.join(left)}")
        return f"interrupted; {'; '.join(parts)}; continue with: {self.resume}"


def compare(cfg, command: str = "", quiet: bool = False, resume: str | None = None,
            early=None, on_round: Callable[[str, int, int, dict[str, float]], None] | None = None,
            progress: Progress | None = None) -> tuple[list[dict], str]:
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
    (bench/loop/early_pool.py). compare owns it from the call on: it is used if this config asks
    for the same pool, and stopped otherwise or on any error.

    `on_round(method, seed, round, metrics)`: called after each round of each method x seed is logged
    (the tests inject faults through it, e.g. a SIGKILL at a known round).

    `progress`: filled in as runs start and finish (`Progress`), for the line bench.run prints when
    it is interrupted; the hint printed at the start (not `quiet`) is its `resume` command.
    """
    from bench import cli
    from bench import config as C
    from bench.experiment.load import make_backend
    from bench.loop import actor as A
    from bench.loop.cluster import Background
    from bench.loop.ray_backend import RayBackend
    from bench.tracking import Tracker, check_store, git_commit, package_versions

    run = cfg.run
    starting = None
    progress = Progress() if progress is None else progress
    progress.pairs = [f"{method} seed {seed}" for seed in run.seeds for method in run.methods]

    try:
        if early is not None and (run.backend != "ray" or early.keys != A.pool_keys(run)):
            with cli.deferred_signals():  # not the pool this config asks for: stopped before another starts
                early.discard(A.Pool.close)
            early = None
        check_store(run.tracking_uri)  # an unreachable or read-only store: one line before Ray or data start
        if run.backend == "ray":
            # Ray and its actors start in the background while the data loads and MLflow is imported
            # (bench/loop/cluster.py: Background), or started already (`early`, from bench.run's flags).
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
            progress.parent, progress.resume = parent, resume_command(cfg, parent, progress.resume_flags)
            progress.finished = [f"{m} seed {s}" for (m, s), done in plan.items() if not isinstance(done, str)]
            if not quiet:
                print(f"parent run {parent} (if interrupted: {progress.resume})", file=sys.stderr)

            def one(method, seed):  # resuming: a finished pair's result, or the child run to continue
                done, label = plan.get((method, seed)), f"{method} seed {seed}"
                if done is not None and not isinstance(done, str):  # in progress.finished already
                    return done
                observe = None if on_round is None else functools.partial(on_round, method, seed)
                progress.running = label
                try:
                    result = run_one(cfg, tracker, parent, backend, method, seed, datasets[seed], quiet,
                                     on_round=observe, checkpoints=run.checkpoint_every > 0, resume=done)
                except Diverged as e:
                    if not run.keep_going:
                        raise
                    progress.diverged[label] = str(e)
                    progress.running = None
                    print(f"{label} diverged (its run ends FAILED; going on, --keep-going): {e}", file=sys.stderr)
                    return None
                progress.finished.append(label)
                progress.running = None
                return result

            ran = [one(method, seed) for seed in run.seeds for method in run.methods]
            results = [r for r in ran if r is not None]
            closed = True
            with cli.deferred_signals():  # a Ctrl-C inside ray.shutdown would leave Ray's processes behind
                backend.close()  # free Ray's workers before the (quick) summary
            rows = summarize(results)
            if progress.diverged:
                tracker.client.set_tag(parent, "diverged", "; ".join(progress.diverged)[:5000])
            tracker.log_text(parent, format_table(rows, progress.diverged) + "\n", "summary.md")
            tracker.log_json(parent, rows, "summary.json")
        progress.done = True
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
    from bench import report as R
    from bench.tracking import open_client

    run = cfg.run
    paths = R.build(run.tracking_uri, run.experiment, runs=[parent], out=report_out(cfg, parent, report_dir),
                    hint="remove it, or give another --report-dir")
    R.log_artifacts(paths, open_client(run.tracking_uri), parent)
    return paths


def report_out(cfg, parent: str, report_dir: str = "reports") -> str:
    """The folder `report` writes: `report_dir/<experiment>-<parent id[:8]>/`."""
    import os

    from bench.report.markdown import slug

    return os.path.join(report_dir, f"{slug(cfg.run.experiment, 60)}-{parent[:8]}")


def report_command(cfg, parent: str, report_dir: str = "reports") -> str:
    """The `python -m bench.report` command that writes `report`'s files, as it runs here (bench/commands.py's
    `runnable`); it does not copy them to the parent run's artifacts as `report` does."""
    import shlex

    from bench import commands
    from bench import config as C

    env = C.env_defaults()
    words = ["python", "-m", "bench.report", "--runs", parent, "--out", report_out(cfg, parent, report_dir)]
    if cfg.run.tracking_uri != env.get("tracking_uri", C.RunConfig.tracking_uri):
        words += ["--tracking-uri", cfg.run.tracking_uri]
    if cfg.run.experiment != env.get("experiment", C.RunConfig.experiment):
        words += ["--experiment", cfg.run.experiment]
    return commands.runnable(shlex.join(words))


def recorded_line(cfg, parent: str) -> str:
    """Where the runs went, and how to look at them: a command that runs as printed (bench/commands.py's
    `program`: MLflow's script by path, venv active or not), or the address of an MLflow server."""
    import shlex

    from bench import commands

    run = cfg.run
    if run.tracking_uri.startswith(("http://", "https://")):
        browse = f"open {run.tracking_uri} in a browser"
    else:
        browse = f"{commands.program('mlflow', 'mlflow', 'mlflow')} ui --backend-store-uri {shlex.quote(run.tracking_uri)}"
    return (f"recorded in {run.tracking_uri} (experiment {run.experiment!r}, parent run {parent}); "
            f"browse with: {browse}")
