"""MLflow tracking stores: checked before anything runs (reachable, writable, of the right kind, and
what they seem: a SQLite file MLflow made or a new one, never an in-memory database or another
program's database), and opened with MLflow's INFO lines silenced and a file lock around a new SQLite
store's schema creation."""
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


# -- what a SQLite store is ----------------------------------------------------------------------------
# A SQLite URL reaches SQLite through SQLAlchemy (MLflow's store and Optuna's RDB storage both call
# `sqlalchemy.create_engine` with it). Its pysqlite dialect passes on six query options and, without
# `uri=true`, drops every other one in silence (sqlalchemy/dialects/sqlite/pysqlite.py,
# `create_connect_args`); with `uri=true` the path is a SQLite URI (`file:...?mode=memory`), whose
# options change what file is opened and how. So a store URL is checked by one rule, for both stores:

SQLITE_OPTIONS = ("timeout", "cached_statements")
"""The query options a SQLite store URL may carry: they reach the driver and change only how long a
write waits for another process's lock and how many statements it caches. The rest are refused:
an option SQLAlchemy drops (`?foo=1`) would seem to take effect and does not; `uri=true` turns the
path into a SQLite URI (`file:x.db?mode=ro`, `mode=memory`: another file, read-only or in memory);
`isolation_level`, `detect_types` and `check_same_thread` change how MLflow's and Optuna's own
transactions and threads work."""

SQLITE_INTERNAL = frozenset({"alembic_version", "sqlite_sequence", "sqlite_stat1", "sqlite_stat4"})
"""Tables that say nothing about which program made a database: SQLite's own (AUTOINCREMENT,
ANALYZE) and alembic's revision table, which MLflow and Optuna both keep."""

MLFLOW_TABLES = frozenset({
    "assessments", "budget_policies", "datasets", "endpoint_bindings", "endpoint_model_mappings", "endpoint_tags",
    "endpoints", "entity_associations", "evaluation_dataset_records", "evaluation_dataset_tags",
    "evaluation_datasets", "experiment_tags", "experiments", "guardrail_configs", "guardrails", "input_tags",
    "inputs", "issues", "job_locks", "jobs", "label_schemas", "latest_metrics", "logged_model_metrics",
    "logged_model_params", "logged_model_tags", "logged_models", "mcp_access_endpoints", "mcp_server_aliases",
    "mcp_server_tags", "mcp_server_version_tags", "mcp_server_versions", "mcp_servers", "metrics",
    "model_definitions", "model_version_tags", "model_versions", "online_scoring_configs", "params",
    "registered_model_aliases", "registered_model_tags", "registered_models", "review_queue_items",
    "review_queue_label_schemas", "review_queue_users", "review_queues", "runs", "scheduler_leases",
    "scorer_versions", "scorers", "secrets", "span_metrics", "spans", "sql_assessment_daily_rollups",
    "sql_span_cost_daily_rollups", "sql_trace_metric_daily_rollups", "sql_trace_rollup_rebuild_queue", "tags",
    "trace_info", "trace_metrics", "trace_request_metadata", "trace_tags", "webhook_events", "webhooks",
    "workspaces"})
"""The tables of a fresh MLflow store (MLflow 3.17's schema, less `SQLITE_INTERNAL`); an older MLflow's
store has a subset. A test compares this set with a store the installed MLflow creates, so an MLflow
upgrade that adds a table fails there until the set is updated."""


def sqlite_database(uri: str, flag: str) -> str:
    """The database file of a SQLite URL (`sqlite:///PATH`, `sqlite+DRIVER:///PATH`), '' for a URL of
    another scheme. One line (BenchError) for a URL that would not keep anything or not do what it
    says: an in-memory database (`sqlite://`, `sqlite:///:memory:`, `sqlite:///file::memory:?...`,
    `mode=memory`: nothing survives the process), a host (SQLite has none), or a query option not in
    `SQLITE_OPTIONS`. `flag` names where the URL came from in the message (`--tracking-uri`)."""
    from urllib.parse import parse_qsl

    scheme, sep, rest = uri.partition("://")
    if scheme.split("+")[0].lower() != "sqlite":
        return ""
    location, _, query = rest.partition("?")
    options = [k for k, _ in parse_qsl(query, keep_blank_values=True)]
    host, slash, path = location.partition("/")
    forms = "give sqlite:///RELATIVE/PATH.db or sqlite:////ABSOLUTE/PATH.db"
    if not sep or host:
        raise BenchError(f"{flag} {uri!r} is not a SQLite file URL (it names a host, or lacks ://); {forms}")
    memory = (path in ("", ":memory:") or path.startswith("file:") and ":memory:" in path
              or "mode=memory" in query.replace(" ", ""))
    if memory:
        raise BenchError(f"{flag} {uri!r} is an in-memory SQLite database: nothing recorded there outlives the "
                         f"process; {forms}")
    bad = list(dict.fromkeys(k for k in options if k not in SQLITE_OPTIONS))
    if bad:
        what = f"option {bad[0]} is" if len(bad) == 1 else f"options {', '.join(bad)} are"
        raise BenchError(f"{flag} {uri!r}: query {what} not taken (SQLAlchemy "
                         f"drops unknown ones in silence, and the others change which file is opened or how "
                         f"transactions work); a SQLite store takes only {', '.join(SQLITE_OPTIONS)}")
    return path


def sqlite_tables(path: str, flag: str, uri: str) -> frozenset[str]:
    """The tables of the SQLite file `path`, read without changing a byte of it (a read-only
    connection); empty for a file that does not exist yet or is empty (a new store). One line for a
    file that is not a SQLite database."""
    import sqlite3
    from urllib.parse import quote

    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return frozenset()
    try:
        con = sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True)
        try:
            names = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.Error as e:
        raise BenchError(f"{flag} {uri!r}: {path} is not a SQLite database ({e}); give a new file or a store "
                         f"this program made") from None
    return frozenset(names)


def foreign(tables: frozenset[str], own: frozenset[str], who: str) -> str:
    """Why a database with `tables` was not made by `who` (`MLflow`), whose tables are `own`: '' when
    it has no table (a new store) or is `who`'s (its tables among `own`, with alembic's revision table,
    which MLflow and Optuna both create with their first table); else `tables users, orders are not
    MLflow's` (at most 6 named) or `tables runs without alembic_version`."""
    extra = sorted(tables - own - SQLITE_INTERNAL)
    if extra:
        more = f" and {len(extra) - 6} more" if len(extra) > 6 else ""
        return f"table{'s' * (len(extra) > 1)} {', '.join(extra[:6])}{more} {'are' if len(extra) > 1 else 'is'} " \
               f"not {who}'s"
    if tables - SQLITE_INTERNAL and "alembic_version" not in tables:
        return f"tables {', '.join(sorted(tables - SQLITE_INTERNAL)[:6])} without alembic_version"
    return ""


def check_kind(uri: str) -> None:
    """A SQLite tracking URI must be an MLflow store or a new file: refuse, with one line and before
    MLflow opens it (which would add its tables to another program's database), an in-memory
    database, a query option SQLite does not get (`sqlite_database`), a file that is not a SQLite
    database, and a database with tables MLflow does not make (an Optuna study store, any other
    program's database). Other schemes pass (a server checks its own store)."""
    path = sqlite_database(uri, "--tracking-uri")
    if not path:
        return
    why = foreign(sqlite_tables(path, "--tracking-uri", uri), MLFLOW_TABLES, "MLflow")
    if why:
        raise BenchError(f"--tracking-uri {uri!r}: {path} is not an MLflow store ({why}); give a new file "
                         f"(sqlite:///mlflow.db) or an MLflow store")


def check_store(uri: str) -> None:
    """Refuse, in seconds and with one line, a store MLflow would retry for minutes or fail on later
    with a message about something else: an empty URI, a scheme MLflow has no store for, an HTTP
    server or database server that does not accept connections, a SQLite file in a missing folder,
    one that is a folder, or one that cannot be written (a read-only file or filesystem), a SQLite URL
    that is not what it seems (in memory, an option SQLite does not get, another program's database:
    `check_kind`), and a file store (a folder) that is a file, or that this MLflow refuses without
    MLFLOW_ALLOW_FILE_STORE."""
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
    path = sqlite_database(uri, "--tracking-uri")
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
    check_kind(uri)


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
    check_kind(uri)  # every opener: MLflow would add its tables to another program's database
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
