"""Stores that are not what they seem, on the mechanism's functions: every opener of a tracking store
(`check_store`, `open_client`, the report's `client_for`) and of a study store (`check_storage`,
`make_storage`) x every hostile kind of SQLite URL is one BenchError of its rule, and the hostile
database is byte-identical afterwards, with no file added beside it. The table sets the rules compare
with are those of fresh stores made by the installed MLflow and Optuna. The commands themselves
(exit 2, one line) are tests/integration/test_store_cli.py."""
from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3

import pytest

from bench.report.collect import client_for
from bench.tracking import check_store, open_client
from bench.tracking.stores import MLFLOW_TABLES, SQLITE_INTERNAL, SQLITE_OPTIONS
from bench.tuning.storage import OPTUNA_TABLES, check_storage, make_storage
from fedeq_bench.core.errors import BenchError

MEMORY = ("sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite:///:memory:?cache=shared",
          "sqlite:///file::memory:?cache=shared&uri=true", "sqlite:///file::memory:?cache=shared",
          "sqlite:///file:x.db?mode=memory&uri=true", "sqlite+pysqlite://")
"""Every in-memory spelling SQLAlchemy's pysqlite dialect takes (an empty path, `:memory:`, SQLite URI
filenames); the one without uri=true would even create a file named `file::memory:`."""

# Options that reach SQLite but change what it opens or how it runs, and ones SQLAlchemy drops.
REFUSED_OPTIONS = ("foo", "uri", "mode", "isolation_level", "detect_types", "check_same_thread", "cache")


def snapshot(folder) -> dict[str, str]:
    """Every file under `folder`, with its sha256: what a refused command must leave as it was."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return make_dbs(tmp_path_factory.mktemp("stores"))


@pytest.fixture
def dbs(made, tmp_path):
    """A copy of `make_dbs`'s folder (made once per module: an MLflow store takes seconds to create)."""
    shutil.copytree(made, tmp_path, dirs_exist_ok=True)
    return tmp_path


def make_dbs(tmp_path):
    """A folder with another program's database, a file that is no database, a database with one of
    MLflow's (Optuna's) table names but no alembic revision, an MLflow store and an Optuna study store."""
    con = sqlite3.connect(tmp_path / "app.db")
    con.execute("CREATE TABLE users (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT)")
    con.execute("INSERT INTO users (name) VALUES ('ada')")
    con.commit()
    con.close()
    (tmp_path / "notes.db").write_text("not a database, but long enough to have a header " * 20)
    for name, table in (("mlflow_lookalike.db", "runs"), ("optuna_lookalike.db", "studies")):
        con = sqlite3.connect(tmp_path / name)
        con.execute(f"CREATE TABLE {table} (id TEXT)")
        con.commit()
        con.close()
    open_client(f"sqlite:///{tmp_path}/mlflow.db")
    optuna = pytest.importorskip("optuna")
    optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db", study_name="s")
    return tmp_path


def tracking_openers():
    """Every function that opens or checks a tracking store before MLflow sees it."""
    return {"check_store": check_store, "open_client": open_client, "client_for": client_for}


def study_openers(tracking_uri):
    return {"check_storage": lambda url: check_storage(url, tracking_uri),
            "make_storage": lambda url: make_storage(url, tracking_uri=tracking_uri)}


def hostile(folder, own: str) -> list[tuple[str, str]]:
    """(URL, what the one line says) for every hostile kind, generated from the rules: each in-memory
    spelling; each refused option (on a new file, so only the option is wrong); a file that is not
    SQLite; another program's database; one with tables but no alembic revision; the other program's
    store (`own` is `mlflow` or `optuna`)."""
    rows = [(uri, "is an in-memory SQLite database: nothing recorded there outlives the process") for uri in MEMORY]
    rows += [(f"sqlite:///{folder}/new.db?{o}=1", f"query option {o} is not taken") for o in REFUSED_OPTIONS]
    rows += [(f"sqlite:///{folder}/notes.db", "is not a SQLite database (file is not a database)")]
    who = {"mlflow": "MLflow", "optuna": "Optuna"}[own]
    store = "an MLflow store" if own == "mlflow" else "an Optuna study store"
    rows += [(f"sqlite:///{folder}/app.db", f"app.db is not {store} (table users is not {who}'s)"),
             (f"sqlite:///{folder}/{own}_lookalike.db", f"{own}_lookalike.db is not {store} (tables "
                                                          f"{'runs' if own == 'mlflow' else 'studies'} without "
                                                          f"alembic_version)")]
    if own == "mlflow":
        rows += [(f"sqlite:///{folder}/optuna.db", "optuna.db is not an MLflow store (tables studies, study_directions, "
                                                   "study_system_attributes, study_user_attributes, trial_heartbeats, "
                                                   "trial_intermediate_values and 6 more are not MLflow's)")]
    else:
        rows += [(f"sqlite:///{folder}/mlflow.db", "mlflow.db is an MLflow tracking store; a study store is an Optuna "
                                                   "database")]
    return rows


def test_every_tracking_opener_refuses_every_hostile_store(dbs, monkeypatch):
    monkeypatch.chdir(dbs)  # a relative in-memory spelling must not create a file here either
    before = snapshot(dbs)
    for name, opener in tracking_openers().items():
        for uri, said in hostile(dbs, "mlflow"):
            with pytest.raises(BenchError) as e:
                opener(uri)
            assert said in str(e.value), (name, uri, str(e.value))
            assert "\n" not in str(e.value)
            assert snapshot(dbs) == before, (name, uri)  # the foreign database byte-identical, nothing added


def test_every_study_opener_refuses_every_hostile_store(dbs, monkeypatch):
    monkeypatch.chdir(dbs)
    before = snapshot(dbs)
    for name, opener in study_openers(f"sqlite:///{dbs}/tracking.db").items():
        for url, said in hostile(dbs, "optuna"):
            with pytest.raises(BenchError) as e:
                opener(url)
            assert said in str(e.value), (name, url, str(e.value))
            assert snapshot(dbs) == before, (name, url)


def test_a_study_store_is_never_the_tracking_store_even_when_both_are_new(tmp_path):
    for spelling in (f"sqlite:///{tmp_path}/both.db", f"sqlite:////{str(tmp_path).lstrip('/')}/./both.db"):
        with pytest.raises(BenchError, match="is the MLflow tracking store"):
            check_storage(spelling, f"sqlite:///{tmp_path}/both.db")
    assert os.listdir(tmp_path) == []


def test_what_each_store_takes(dbs):
    """The accepted side of each rule: a new file, the store's own kind, and the options that reach SQLite."""
    for opt in SQLITE_OPTIONS:
        check_store(f"sqlite:///{dbs}/mlflow.db?{opt}=5")
        check_storage(f"sqlite:///{dbs}/optuna.db?{opt}=5", f"sqlite:///{dbs}/mlflow.db")
    check_store(f"sqlite:///{dbs}/new.db")
    check_storage(f"sqlite:///{dbs}/new2.db", f"sqlite:///{dbs}/new.db")
    (dbs / "empty.db").write_bytes(b"")  # what `touch` leaves: SQLite takes it as an empty database
    check_store(f"sqlite:///{dbs}/empty.db")
    check_storage("postgresql://127.0.0.1:1/studies")  # a server's store: Optuna checks it when it connects


def tables(path) -> frozenset[str]:
    con = sqlite3.connect(path)
    try:
        return frozenset(r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
    finally:
        con.close()


def test_the_table_sets_are_those_of_fresh_stores(dbs):
    """MLFLOW_TABLES and OPTUNA_TABLES are what the installed MLflow and Optuna create (an upgrade that
    adds a table fails here until the set is updated), each with alembic's revision table."""
    assert tables(dbs / "mlflow.db") - SQLITE_INTERNAL == MLFLOW_TABLES
    assert tables(dbs / "optuna.db") - SQLITE_INTERNAL == OPTUNA_TABLES
    assert "alembic_version" in tables(dbs / "mlflow.db") & tables(dbs / "optuna.db")


def test_the_accepted_options_are_ones_sqlalchemy_passes_to_sqlite():
    """SQLITE_OPTIONS are among the query options SQLAlchemy's pysqlite dialect gives the driver
    (sqlalchemy/dialects/sqlite/pysqlite.py, `create_connect_args`), so none is dropped in silence."""
    from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
    from sqlalchemy.engine import make_url

    url = make_url("sqlite:///x.db?" + "&".join(f"{o}=5" for o in SQLITE_OPTIONS))
    _, kwargs = SQLiteDialect_pysqlite().create_connect_args(url)
    assert set(SQLITE_OPTIONS) <= set(kwargs)
