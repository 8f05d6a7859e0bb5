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
import os
import subprocess
import sys
import time
from collections.abc import Iterator

from bench.cli import deferred_signals, interrupt_requested
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


def git_commit() -> str:
    """HEAD of the checkout the harness runs from, with `-dirty` if it has uncommitted changes."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


VERSIONED = ("fedeq-bench", "torch", "numpy", "mlflow", "ray", "optuna")


def package_versions() -> dict[str, str]:
    """`version.<name>` params: Python's and each VERSIONED distribution's version ("absent" if not
    installed), so a report can say what produced its numbers."""
    import platform
    from importlib import metadata

    out = {"version.python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[f"version.{name}"] = "absent"
    return out


STORE_CONNECT_TIMEOUT_S = 5.0
"""How long a tracking server may take to accept a connection before the run is refused (MLflow's
own client retries an unreachable server for minutes, printing nothing)."""


def sqlite_path(uri: str) -> str:
    """The database file of a `sqlite:///` URI ('' for other URIs and in-memory stores)."""
    path = uri[len("sqlite:///"):].split("?")[0] if uri.startswith("sqlite:///") else ""
    return "" if path == ":memory:" else path


def check_store(uri: str) -> None:
    """Refuse, in seconds and with one line, a store MLflow would retry for minutes or fail on later
    with a message about something else: an empty URI, a scheme MLflow has no store for, an HTTP
    server or database server that does not accept connections, a SQLite file in a missing folder,
    one that is a folder, or one that cannot be written (a read-only file or filesystem), and a file
    store (a folder) that is a file, or that this MLflow refuses without MLFLOW_ALLOW_FILE_STORE."""
    import socket
    from urllib.parse import urlparse

    # MLflow's tracking-store schemes (its _tracking_store_registry; a database scheme may name a
    # driver: postgresql+psycopg2). A test compares this list with the installed MLflow's.
    schemes = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks",
               "databricks-uc", "uc")
    db_ports = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
    valid = ("give sqlite:///PATH (the default: sqlite:///mlflow.db), http(s)://HOST:PORT (an mlflow server), "
             "postgresql://, mysql:// or mssql:// (a database server)")
    if not uri.strip():
        raise BenchError(f"--tracking-uri {uri!r} is empty; {valid}")
    if uri.split(":", 1)[0] in ("databricks", "databricks-uc", "uc"):
        return  # Databricks' hosted store (`databricks` alone, or `databricks://PROFILE`): its client checks it
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme not in schemes:
        raise BenchError(f"--tracking-uri {uri!r}: MLflow has no tracking store for scheme {parsed.scheme!r}; {valid}")
    if scheme in ("http", "https") or scheme in db_ports:
        try:
            port = parsed.port or db_ports.get(scheme) or (443 if scheme == "https" else 80)
        except ValueError:
            raise BenchError(f"--tracking-uri {uri!r}: the port is not a number in 0..65535") from None
        if not parsed.hostname:
            raise BenchError(f"--tracking-uri {uri!r} names no host; {valid}")
        server = "MLflow tracking server" if scheme in ("http", "https") else f"{scheme} database server"
        try:
            socket.create_connection((parsed.hostname, port), timeout=STORE_CONNECT_TIMEOUT_S).close()
        except OSError as e:
            start = "(mlflow server ...) " if scheme in ("http", "https") else ""
            raise BenchError(f"cannot reach the {server} at {uri} ({e.strerror or e}); start it {start}"
                             f"or give another --tracking-uri") from None
        return
    if scheme in ("", "file"):  # a file store: a folder of runs (./mlruns)
        folder = parsed.path if scheme == "file" else uri
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise BenchError(f"--tracking-uri {uri!r}: {folder} is a file, and a file store is a folder; for a "
                             f"SQLite database give sqlite:///{folder}")
        try:
            from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
        except ImportError:  # an MLflow without the switch takes file stores
            return
        if not MLFLOW_ALLOW_FILE_STORE.get():
            raise BenchError(f"--tracking-uri {uri!r} is a file store, which this MLflow refuses unless "
                             f"MLFLOW_ALLOW_FILE_STORE=true; give sqlite:///mlflow.db (what `mlflow migrate-filestore` "
                             f"converts an old ./mlruns to)")
        return
    path = sqlite_path(uri)
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise BenchError(f"MLflow store {uri!r}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise BenchError(f"MLflow store {uri!r}: {path} is a folder, not a SQLite database file; give "
                         f"sqlite:///{os.path.join(path, 'mlflow.db')}")
    for target in ([path] if os.path.exists(path) else []) + [folder]:
        if not os.access(target, os.W_OK):
            raise BenchError(f"MLflow store {uri!r}: {target} is not writable (a read-only file or filesystem); "
                             f"give a --tracking-uri this user can write")


def check_artifacts(client, experiment) -> None:
    """The experiment's artifact location, where every run's ledger, clients.csv and report go, must be
    writable when it is local: checked before anything runs, not after training."""
    from urllib.parse import urlparse

    loc = experiment.artifact_location or ""
    parsed = urlparse(loc)
    if parsed.scheme not in ("", "file"):
        return  # a server-side or cloud store: the server checks its own
    folder = parsed.path if parsed.scheme == "file" else loc
    try:
        os.makedirs(folder, exist_ok=True)
        ok = os.access(folder, os.W_OK)
    except OSError:
        ok = False
    if not ok:
        raise BenchError(f"the artifact location {loc} of MLflow experiment {experiment.name!r} is not writable; "
                         f"make it writable or use another --experiment")


def open_client(uri: str):
    """An `MlflowClient` whose store exists and is migrated when this returns.

    On a SQLite URI the first access creates the schema (alembic migrations). Two processes doing that
    at once on a new file collide ("table _alembic_tmp_metrics already exists"), so the first access
    happens under an exclusive lock on `<db>.lock` beside the database; everything that opens a store
    (bench.run, bench.sweep, bench.report, the tests that watch a running store) comes through here."""
    import fcntl
    import logging

    from mlflow.tracking import MlflowClient

    # MLflow and alembic log INFO lines (database migrations) on stderr; warnings still show.
    # Set after importing mlflow, which configures its loggers on import.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    path = sqlite_path(uri)
    if not path or not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
        return client
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)  # creates or migrates the schema, once
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return client


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
