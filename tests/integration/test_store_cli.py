"""Every command that takes a tracking URI x where it comes from (--tracking-uri, $MLFLOW_TRACKING_URI) x
every kind of store that is not what it seems (another program's database, an Optuna study store, each
in-memory spelling, a query option SQLite does not get), and bench.sweep's --storage likewise: exit 2,
exactly one `error:` line, no traceback, the folder byte-identical (nothing created, the foreign
database unchanged). In-process through each command's `main(argv)`; two real subprocesses prove the
wiring. The rules themselves: tests/unit/test_store_identity.py."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from tests.unit.test_store_identity import MEMORY, make_dbs, snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--rounds", "1", "--clients", "4", "--backend", "serial"]
COMMANDS = {
    "bench.run": ["--methods", "fedavg", *TINY, "--quiet", "--no-report"],
    "bench.sweep": ["--method", "fedavg", "--trials", "1", "--space", "space.toml", *TINY, "--quiet"],
    "bench.report.__main__": [],
}


def hostile_uris() -> list[tuple[str, str]]:
    """(URI relative to the folder, what the line says)."""
    return ([(uri, "is an in-memory SQLite database") for uri in MEMORY]
            + [("sqlite:///new.db?foo=1", "query option foo is not taken"),
               ("sqlite:///app.db", "app.db is not an MLflow store (table users is not MLflow's)"),
               ("sqlite:///optuna.db", "optuna.db is not an MLflow store (tables studies")])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    d = make_dbs(tmp_path_factory.mktemp("stores"))
    os.remove(d / "mlflow.db")  # the commands' default store: must not be created by a refused command
    for f in os.listdir(d):
        if f.endswith(".lock"):
            os.remove(d / f)
    (d / "space.toml").write_text("fedavg.lr = {low = 0.01, high = 0.3, log = true}\n")
    return d


@pytest.fixture
def folder(made, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(made, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path


def refused(module, argv, capsys, said):
    rc = importlib.import_module(module).main(argv)
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert rc == 2, (module, argv, out.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0], (module, argv, out.err)
    assert "Traceback" not in out.err + out.out


def test_every_command_refuses_every_hostile_tracking_uri_from_flag_or_environment(folder, capsys, monkeypatch):
    before = snapshot(folder)
    for module, argv in COMMANDS.items():
        for uri, said in hostile_uris():
            refused(module, [*argv, "--tracking-uri", uri], capsys, said)
            assert snapshot(folder) == before, (module, uri)
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
            refused(module, argv, capsys, said)
            monkeypatch.delenv("MLFLOW_TRACKING_URI")
            assert snapshot(folder) == before, (module, uri, "env")


def test_the_sweep_refuses_every_hostile_study_store(folder, capsys):
    before = snapshot(folder)
    stores = ([(uri, "is an in-memory SQLite database") for uri in MEMORY]
              + [("sqlite:///optuna.db?foo=1", "query option foo is not taken"),
                 ("sqlite:///app.db", "app.db is not an Optuna study store (table users is not Optuna's)"),
                 ("sqlite:///mlflow_lookalike.db", "is not an Optuna study store (table runs is not Optuna's)"),
                 ("sqlite:///mlflow.db", "is the MLflow tracking store (--tracking-uri sqlite:///mlflow.db)")])
    for url, said in stores:
        refused("bench.sweep", [*COMMANDS["bench.sweep"], "--storage", url, "--tracking-uri", "sqlite:///mlflow.db"],
                capsys, said)
        assert snapshot(folder) == before, url


@pytest.mark.parametrize("module, args, env, said", [
    ("bench.run", COMMANDS["bench.run"], {"MLFLOW_TRACKING_URI": "sqlite:///:memory:"},
     "error: --tracking-uri 'sqlite:///:memory:' is an in-memory SQLite database"),
    ("bench.sweep", [*COMMANDS["bench.sweep"], "--storage", "sqlite:///app.db", "--tracking-uri", "sqlite:///m.db"], {},
     "error: --storage 'sqlite:///app.db': app.db is not an Optuna study store (table users is not Optuna's)"),
])
def test_the_wiring_in_a_real_process(folder, module, args, env, said):
    before = snapshot(folder)
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=folder, env={**base, "PYTHONPATH": ROOT, **env},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(said) and "Traceback" not in proc.stderr
    assert snapshot(folder) == before
