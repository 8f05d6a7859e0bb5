"""MLflow tracking stores: checked before anything runs (reachable, writable, of the right kind), and
opened with MLflow's INFO lines silenced and a file lock around a new SQLite store's schema creation."""
from __future__ import annotations

import os

from fedeq_bench.core.errors import BenchError

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
