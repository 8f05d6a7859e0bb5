"""Resuming an interrupted invocation (`python -m bench.run --resume PARENT_RUN_ID`): the config
recorded on its parent run, what each method x seed left (a finished result or a child run to
continue), reopening runs, and removing checkpoints once nothing can resume it."""
from __future__ import annotations

import contextlib
import sys

from bench.experiment.load import validate
from fedeq_bench.core.errors import BenchError

PROG_HINT = "python -m bench.run"


def resume_command(cfg, parent_id: str, flags: tuple[str, ...] = ()) -> str:
    """The command that continues invocation `parent_id` of `cfg`, as it runs here (bench/commands.py's
    `runnable`): `--resume ID`, `--tracking-uri` where the runs are not in the default store (the one
    --resume looks in without it), and `flags` (e.g. the invocation's --quiet, --report-dir)."""
    import shlex

    from bench import commands
    from bench import config as C

    words = [*PROG_HINT.split(), "--resume", parent_id]
    if cfg.run.tracking_uri != C.env_defaults().get("tracking_uri", C.RunConfig.tracking_uri):
        words += ["--tracking-uri", cfg.run.tracking_uri]
    return commands.runnable(shlex.join([*words, *flags]))

RESUME_KEYS = ("tracking_uri", "backend", "workers", "address", "state_budget_gb", "checkpoint_every", "keep_going")
"""Run keys `--resume` accepts: where and how the work runs, never what it computes (Serial and Ray
runs are bit-identical, any worker count and state budget give the same numbers; `keep_going` only
says whether a diverged run stops the others). Every other key
comes from the parent run's params; giving one would make the result differ from the run resumed."""


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
    from bench.tracking import status_for

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
    from bench import config as C
    from bench.tracking import open_client

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
    from bench.tracking import git_commit

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
    from bench.loop import checkpoint, devices

    parent = client.get_run(parent_id)
    fleet = devices.load(cfg.run.devices).label  # a file's label carries its digest
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
        then = c.data.params.get("devices", fleet)  # (runs from before devices existed: the default set)
        if then != fleet:
            raise BenchError(f"child run {c.info.run_id} ({method} seed={seed}) ran on the device profile set "
                             f"{then}, and --devices {cfg.run.devices} is now {fleet}: the file changed since; "
                             "put it back as it was to resume, or start a new comparison")
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
    from bench.loop import checkpoint

    parent = client.get_run(parent_id)
    for c in client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                max_results=50000):
        try:
            checkpoint.RunCheckpoints(client, c.info.run_id).remove()
        except OSError as e:  # the results are recorded; a file left behind is only disk space
            print(f"warning: could not remove the checkpoint of run {c.info.run_id}: {e}", file=sys.stderr)


def finished_result(child, ck):
    """The MethodResult of a FINISHED child run, from its final checkpoint and its params."""
    from bench.loop.engine import MethodResult

    p = child.data.params
    ck.check(method=p["method"], seed=int(p["seed"]), dataset_fingerprint=p.get("dataset_fingerprint"))
    result = MethodResult(p["method"], int(p["seed"]), p.get("model", "?"), history=ck.history(), ledger=ck.ledger(),
                          wall_s=float(ck.meta["wall_s"]), params_shared=int(p.get("params/shared", 0)),
                          params_personal=int(p.get("params/personal", 0)))
    result.clients = ck.meta["clients"]
    return result
