"""MLflow: one parent run per invocation, one child run per method x seed, metrics with step=round.

Uses `MlflowClient` with explicit run ids (no fluent active-run stack), so a child run can be ended
FAILED or KILLED precisely, and every round is written as it finishes: an interrupted run keeps the
rounds it had. Runs are nested the way MLflow's UI expects (the `mlflow.parentRunId` tag).

Every run is opened with `Tracker.run(...)`, a context manager that ends it on every way out, so no
run is ever left RUNNING:

    normal exit                  FINISHED
    an exception                 FAILED    (the exception propagates)
    KeyboardInterrupt            KILLED    (Ctrl-C; bench/cli.py turns SIGTERM into one too)
    `Pruned` / optuna's
    `TrialPruned`                KILLED with the tag `pruned=true`

MLflow has no PRUNED status. A pruned run ends KILLED, not FINISHED: it stopped early on purpose and
its last metrics are those of an unfinished run, so anything that trusts `status = 'FINISHED'` (a
report, `search_runs`) must not take them for a completed result. The `pruned` tag tells a pruned
run from one a user interrupted (filter with `tags.pruned = 'true'`).

Every write to the store runs with Ctrl-C and SIGTERM deferred to its end (bench/cli.py,
`deferred_signals`): an interrupt raised inside an MLflow call can leave its database session unusable,
and the KILLED status written next would then fail and leave the run RUNNING.
"""
from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from collections.abc import Iterator

from bench.cli import deferred_signals, interrupt_requested
from bench.tracking.stores import check_artifacts, check_store, open_client
from fedeq_bench.core.errors import BenchError

PARAM_BATCH = 100  # MLflow's limit of params per log_batch call
STATUSES = ("FINISHED", "FAILED", "KILLED", "PRUNED")


class Pruned(Exception):
    """Raise inside `Tracker.run` to stop a run early on purpose (a sweep's pruner said so)."""


def is_pruned(exc: BaseException) -> bool:
    """Our `Pruned`, or Optuna's `TrialPruned` when Optuna is in use (checked without importing it)."""
    optuna = sys.modules.get("optuna")
    return isinstance(exc, Pruned) or (optuna is not None and isinstance(exc, optuna.TrialPruned))


def status_for(exc: BaseException | None) -> str:
    """The status a run ends with when its block exits with `exc` (None: normally)."""
    if exc is None:
        return "FINISHED"
    if isinstance(exc, KeyboardInterrupt) or interrupt_requested():  # a library may wrap the interrupt
        return "KILLED"
    return "PRUNED" if is_pruned(exc) else "FAILED"


class Tracker:
    """MLflow runs that always end (FINISHED, FAILED, KILLED or pruned), params in batches, and every
    write with Ctrl-C deferred to its end, so none is cut in half."""

    def __init__(self, uri: str, experiment: str):
        import mlflow

        # What `scoped` sets: a prefix of run names, params and tags added to every run it starts,
        # and metric names `log_metrics` leaves out.
        self.name_prefix = ""
        self.extra_params: dict[str, str] = {}
        self.extra_tags: dict[str, str] = {}
        self.dropped_metrics: frozenset[str] = frozenset()

        self._mlflow = mlflow
        self.uri = uri
        check_store(uri)
        try:
            self.client = open_client(uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                try:
                    self.experiment_id = self.client.create_experiment(experiment)
                except Exception:  # another process created it since: use theirs
                    exp = self.client.get_experiment_by_name(experiment)
                    if exp is None:
                        raise
            if exp is not None:
                self.experiment_id = exp.experiment_id
            else:
                exp = self.client.get_experiment(self.experiment_id)
        except Exception as e:  # an unreachable server or an unusable store is bad input, not a bug
            raise BenchError(f"cannot use MLflow tracking store {uri!r}: {str(e).splitlines()[0][:200]}") from None
        if exp.lifecycle_stage == "deleted":
            raise BenchError(f"MLflow experiment {experiment!r} in {uri} is deleted; restore it (mlflow experiments "
                             f"restore --experiment-id {exp.experiment_id}) or give another --experiment")
        check_artifacts(self.client, exp)

    @contextlib.contextmanager
    def run(self, name: str, params: dict[str, str], tags: dict[str, str] | None = None,
            parent: str | None = None) -> Iterator[str]:
        """`with tracker.run(name, params, parent=pid) as run_id:` a run that always ends (see the module doc)."""
        run_id = self.start(name, params, tags, parent)
        try:
            yield run_id
        except BaseException as e:
            self.end_quietly(run_id, status_for(e))
            raise
        self.end(run_id, "FINISHED")

    def scoped(self, name_prefix: str, params: dict[str, str], tags: dict[str, str],
               drop: tuple[str, ...] = ()) -> Tracker:
        """The same store and experiment, with every run it starts named `name_prefix + name` and given
        `params` and `tags` too, and the metrics named in `drop` never logged (a sweep's trial runs)."""
        scoped = copy.copy(self)
        scoped.name_prefix = self.name_prefix + name_prefix
        scoped.extra_params = {**self.extra_params, **params}
        scoped.extra_tags = {**self.extra_tags, **tags}
        scoped.dropped_metrics = self.dropped_metrics | frozenset(drop)
        return scoped

    def start(self, name: str, params: dict[str, str], tags: dict[str, str] | None = None,
              parent: str | None = None) -> str:
        """Create a run and log its params; prefer `run(...)`, which also ends it."""
        name = self.name_prefix + name
        params = {**params, **self.extra_params}
        tags = {**(tags or {}), **self.extra_tags}
        tags["mlflow.runName"] = name
        if parent:
            tags["mlflow.parentRunId"] = parent
        with deferred_signals():  # never a created run whose id is lost to a Ctrl-C
            run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id
        try:
            self.log_params(run_id, params)
        except BaseException as e:  # a run is never left RUNNING, even if logging its params fails
            self.end_quietly(run_id, status_for(e))
            raise
        return run_id

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), PARAM_BATCH):
            with deferred_signals():
                self.client.log_batch(run_id, params=items[i : i + PARAM_BATCH])

    def log_metrics(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        metrics = {k: v for k, v in metrics.items() if k not in self.dropped_metrics}
        if not metrics:
            return
        with deferred_signals():
            self.client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in sorted(metrics.items())])

    def log_text(self, run_id: str, text: str, path: str) -> None:
        with deferred_signals():
            self.client.log_text(run_id, text, path)

    def log_json(self, run_id: str, obj, path: str) -> None:
        self.log_text(run_id, json.dumps(obj, indent=2, sort_keys=True), path)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        """status: FINISHED, FAILED, KILLED, or PRUNED (recorded as KILLED + tag `pruned=true`)."""
        if status not in STATUSES:
            raise ValueError(f"run status {status!r}; choose from {', '.join(STATUSES)}")
        with deferred_signals():  # a status write cut in half would leave the run RUNNING
            if status == "PRUNED":
                self.client.set_tag(run_id, "pruned", "true")
                status = "KILLED"
            self.client.set_terminated(run_id, status=status)

    def end_quietly(self, run_id: str, status: str) -> None:
        """`end`, on a path that is already failing: never mask the original error with a store error."""
        try:
            self.end(run_id, status)
        except Exception:
            pass
