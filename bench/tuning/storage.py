"""Optuna I/O: the storage (checked to be a study store, with heartbeats), pruners, running trials to
a budget, failing the trials and MLflow runs a dead process left, and reading the chosen trial back."""
from __future__ import annotations

import warnings
from typing import Any

from bench import cli
from fedeq_bench.core.errors import BenchError, choices

PRUNERS = ("median", "hyperband", "none")


HEARTBEAT_S = 10
"""Seconds between a running trial's heartbeats in the Optuna storage."""
GRACE_S = 30
"""A RUNNING trial whose last heartbeat is older than this is taken for dead and marked FAIL. A trial
whose owner process is known to be dead is failed at once instead (bench/tuning/identity.py); the
heartbeat remains for what that cannot see: an owner on another host (a database server's storage),
a trial killed between its creation and its owner's record, one recorded before owners were, and a
live process that stopped running its trial (hung, or stopped with SIGSTOP)."""


def make_pruner(name, rounds: int, objectives: int = 1):
    """Optuna's pruner by name (a library caller may pass a BasePruner); a bad name is bad input.
    None picks median for one objective and none for several: Optuna prunes only single-objective
    trials (`Trial.report` refuses a multi-objective one), so asking for a pruner there is refused."""
    import optuna

    if name is None:
        name = "median" if objectives == 1 else "none"
    if objectives > 1 and not (name == "none" or isinstance(name, optuna.pruners.NopPruner)):
        raise BenchError(f"--pruner {name}: Optuna cannot prune a multi-objective study; "
                         f"leave --pruner out or give --pruner none")
    if isinstance(name, optuna.pruners.BasePruner):
        return name
    if name == "median":
        # One completed trial is no median; warmup 0: prune from the first evaluated round on.
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, rounds))
    if name == "none":
        return optuna.pruners.NopPruner()
    raise BenchError(f"unknown pruner {name!r}; choose from {choices(PRUNERS)}")


OPTUNA_TABLES = frozenset({
    "studies", "study_directions", "study_system_attributes", "study_user_attributes", "trial_heartbeats",
    "trial_intermediate_values", "trial_params", "trial_system_attributes", "trial_user_attributes", "trial_values",
    "trials", "version_info"})
"""The tables of a fresh Optuna RDB storage (Optuna 5.1's schema, less alembic_version); a test compares
it with a storage the installed Optuna creates."""


def check_storage(url: str, tracking_uri: str | None = None) -> None:
    """A study store must be an Optuna RDB storage or a new file, checked before Optuna opens it (which
    would add its tables to any SQLite database): one line for an in-memory database or a query
    option SQLite does not get (bench/tracking/stores.py, `sqlite_database`, the same rule as the
    tracking URI), the MLflow tracking store (the same file as `tracking_uri`, or any MLflow store),
    a file that is not a SQLite database, and another program's database. A database server's URL
    (postgresql://, mysql://) is Optuna's to check (`make_storage`)."""
    import os

    from bench.tracking.stores import MLFLOW_TABLES, foreign, sqlite_database, sqlite_tables

    path = sqlite_database(url, "--storage")
    if not path:
        return
    tracking = sqlite_database(tracking_uri, "--tracking-uri") if tracking_uri else ""
    mlflow_store = "give its own file (the default: sqlite:///optuna.db)"
    if tracking and os.path.abspath(tracking) == os.path.abspath(path):
        raise BenchError(f"--storage {url!r} is the MLflow tracking store (--tracking-uri {tracking_uri}); a study "
                         f"store is an Optuna database: {mlflow_store}")
    tables = sqlite_tables(path, "--storage", url)
    why = foreign(tables, OPTUNA_TABLES, "Optuna")
    if why and not foreign(tables, MLFLOW_TABLES, "MLflow"):
        raise BenchError(f"--storage {url!r}: {path} is an MLflow tracking store; a study store is an Optuna "
                         f"database: {mlflow_store}")
    if why:
        raise BenchError(f"--storage {url!r}: {path} is not an Optuna study store ({why}); give a new file "
                         f"(sqlite:///optuna.db) or a study store")


def make_storage(url: str, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S, tracking_uri: str | None = None):
    """An Optuna RDB storage with heartbeats (so a dead process's trial is failed, not left RUNNING),
    once `check_storage` has passed it (`tracking_uri`: the MLflow store it must not be)."""
    import optuna

    check_storage(url, tracking_uri)
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=grace_s)
    except Exception as e:  # a bad URL, an unwritable file: bad input, not a bug
        raise BenchError(f"cannot use Optuna storage {url!r}: {str(e).splitlines()[0][:200]}") from None


def counted(study) -> int:
    """Trials that count toward the budget: COMPLETE and PRUNED (FAIL ones are redone)."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def end_orphans(tracker, study, study_name: str) -> int:
    """Fail the trials of this study whose owner process is dead (`identity.fail_dead_owners`, at once)
    or whose heartbeat stopped (Optuna's `fail_stale_trials`, after GRACE_S), and end FAILED the MLflow
    runs a dead process left RUNNING: trial runs whose Optuna trial is no longer RUNNING, and parent
    runs when no trial of the study is RUNNING. Returns how many runs were ended."""
    import optuna
    from optuna.trial import TrialState

    from bench.tuning.identity import fail_dead_owners

    fail_dead_owners(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    runs = tracker.client.search_runs([tracker.experiment_id],
                                      filter_string=f"tags.study = '{study_name}' and attributes.status = 'RUNNING'")
    ended = 0
    for r in runs:
        number = r.data.tags.get("trial_number")
        alive = (int(number) in running) if number is not None else bool(running)
        if not alive:
            tracker.end_quietly(r.info.run_id, "FAILED")
            ended += 1
    return ended


def run_trials(study, objective, trials: int, n_jobs: int = 1) -> None:
    """Run trials until the study holds `trials` counted ones, `n_jobs` at a time.

    Each `optimize` call asks for exactly the missing number, so trials running at once never
    overshoot the budget; failed trials do not count and are redrawn by the next call, up to as many
    failures as the budget was missing (so a space that always fails ends)."""
    import optuna

    missing = max(0, trials - counted(study))
    failures_left = missing
    while missing > 0:
        before = counted(study)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # catch=(): a bug stops the study with its traceback (a trial's BenchError is a FAIL, above).
            study.optimize(objective, n_trials=missing, n_jobs=n_jobs, catch=())
        done = counted(study) - before
        failures_left -= missing - done
        missing = max(0, trials - counted(study))
        if failures_left <= 0:
            break


def chosen_trial(study, multi: bool):
    """The trial whose values go to the tuned preset: the best one, or with several objectives the
    most accurate trial of the Pareto front (fewest bytes, then least memory, among equals). None when
    no trial completed."""
    from optuna.trial import TrialState

    if not multi:
        try:
            return study.best_trial
        except ValueError:  # no COMPLETE trial (all pruned or failed)
            return None
    front = [t for t in study.best_trials if t.state == TrialState.COMPLETE]
    if not front:
        return None
    return min(front, key=lambda t: (-t.values[0], *t.values[1:], t.number))


def best_values(trial, space) -> dict[str, Any]:
    """The best trial's values keyed by --set keys, read back from its stored params.

    `spaces.suggest` names each Optuna param by its --set key, so trial.params is already that."""
    return {k: trial.params[k] for k in space if k in trial.params} or dict(trial.params)


class _DropInterrupts:
    """A logging filter: Optuna logs a trial stopped by Ctrl-C or SIGTERM as failed, with the
    KeyboardInterrupt's traceback; the CLI says it was interrupted in one line instead."""

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, KeyboardInterrupt) or cli.interrupt_requested():
            return False
        return True


def _quiet_interrupts(logger) -> None:
    """On the handlers of Optuna's library logger: records of its child loggers (where Optuna logs a
    failed trial) pass the handlers, not the parent logger's own filters."""
    for h in logger.handlers:
        if not any(isinstance(f, _DropInterrupts) for f in h.filters):
            h.addFilter(_DropInterrupts())
