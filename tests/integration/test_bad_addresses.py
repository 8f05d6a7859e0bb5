"""Values bound for a library (Ray's address, MLflow's store and experiment) are checked before the
library sees them: one `error:` line, exit 2, no traceback, no store created, in seconds.

The forms themselves are unit-tested in-process (tests/unit/test_cluster.py for addresses, here for
tracking URIs); the subprocesses below are the paths a user takes: bench.run and bench.sweep with a
bad --address or $RAY_ADDRESS, and bench.run with a bad --tracking-uri or --experiment.
"""
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from bench.loop import addresses
from bench.tracking import check_store
from fedeq_bench.core.errors import BenchError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A bound on a whole refused invocation (imports included) on a loaded 2-core machine; what is
# measured is that the address is not retried for minutes (Ray: 13 min for a silent port, measured).
FAST_S = 60


def cli(module, args, cwd, env=None, timeout=120):
    """`python -m MODULE ARGS` in `cwd`: (process, seconds). MLflow's and Ray's address variables of
    whoever runs the tests are left out; Ray's temp dir is private (no `ray start --head` of another
    test is found); `env` adds variables."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "RAY_ADDRESS"}
    base.update(PYTHONPATH=ROOT, RAY_TMPDIR=tempfile.mkdtemp(prefix="rb", dir="/tmp"), **(env or {}))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=base, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - start


def assert_refused(proc, seconds, tmp_path, line):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [line]
    assert seconds < FAST_S
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.db").exists()  # nothing recorded


def forms(source, address, why):
    return f"error: {source} {address!r}: {why}; give {addresses.ADDRESS_FORMS}"


@pytest.fixture
def silent_port():
    """A port that accepts connections (the kernel's backlog) and never answers: not a GCS."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


RUN = ["--methods", "fedavg", "--rounds", "1", "--clients", "4", "--quiet", "--no-report",
       "--tracking-uri", "sqlite:///mlflow.db"]


def test_an_address_of_the_wrong_form(tmp_path):
    proc, s = cli("bench.run", [*RUN, "--address", "not_an_address"], tmp_path)
    assert_refused(proc, s, tmp_path, forms("--address", "not_an_address",
                                            "no port (a head's GCS listens on 6379: HOST:6379)"))


def test_an_unreachable_ray_client_address(tmp_path):
    proc, s = cli("bench.run", [*RUN, "--address", "ray://127.0.0.1:1"], tmp_path)
    assert_refused(proc, s, tmp_path,
                   "error: cannot reach a Ray cluster at 'ray://127.0.0.1:1' (Connection refused); start the head "
                   "with `ray start --head` (its Ray Client server listens on 10001) or omit --address to start a "
                   "local Ray")


def test_a_port_that_is_no_ray(tmp_path, silent_port):
    proc, s = cli("bench.run", [*RUN, "--address", f"127.0.0.1:{silent_port}"], tmp_path)
    assert_refused(proc, s, tmp_path,
                   f"error: '127.0.0.1:{silent_port}' accepts connections but no gRPC server answers there within "
                   f"{addresses.PROBE_TIMEOUT_S:g} s: not a Ray GCS (port 6379 by default); start one with `ray up "
                   "ray_cluster.yaml` (then --address auto on its head node, or HEAD:6379) or omit --address to "
                   "start a local Ray")


def test_a_bad_ray_address_in_the_environment(tmp_path):
    proc, s = cli("bench.run", RUN, tmp_path, env={"RAY_ADDRESS": "head:99999"})
    assert_refused(proc, s, tmp_path, forms("$RAY_ADDRESS", "head:99999", "port '99999' is not a number in 1..65535"))


def test_bench_sweep_takes_the_same_check(tmp_path):
    proc, s = cli("bench.sweep", ["--method", "fedavg", "--trials", "1", "--clients", "4", "--rounds", "1",
                                  "--address", "ray://127.0.0.1:1", "--tracking-uri", "sqlite:///mlflow.db"], tmp_path)
    assert_refused(proc, s, tmp_path,
                   "error: cannot reach a Ray cluster at 'ray://127.0.0.1:1' (Connection refused); start the head "
                   "with `ray start --head` (its Ray Client server listens on 10001) or omit --address to start a "
                   "local Ray")


# -- MLflow's store and experiment ---------------------------------------------------------------

STORES = ("give sqlite:///PATH (the default: sqlite:///mlflow.db), http(s)://HOST:PORT (an mlflow server), "
          "postgresql://, mysql:// or mssql:// (a database server)")


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a store\n")
    return str(path)


@pytest.mark.parametrize("uri, message", [
    ("", f"--tracking-uri '' is empty; {STORES}"),
    ("   ", f"--tracking-uri '   ' is empty; {STORES}"),
    ("foo://x", f"--tracking-uri 'foo://x': MLflow has no tracking store for scheme 'foo'; {STORES}"),
    ("http://", f"--tracking-uri 'http://' names no host; {STORES}"),
    ("http://head:abc", "--tracking-uri 'http://head:abc': the port is not a number in 0..65535"),
    ("postgresql://127.0.0.1:1/runs", "cannot reach the postgresql database server at postgresql://127.0.0.1:1/runs "
                                      "(Connection refused); start it or give another --tracking-uri"),
])
def test_a_store_uri_mlflow_cannot_use(uri, message):
    with pytest.raises(BenchError) as e:
        check_store(uri)
    assert str(e.value) == message


def test_a_file_store_that_is_a_file_or_a_sqlite_path_that_is_a_folder(a_file, tmp_path):
    for uri in (f"file:{a_file}", a_file):
        with pytest.raises(BenchError) as e:
            check_store(uri)
        assert str(e.value) == (f"--tracking-uri {uri!r}: {a_file} is a file, and a file store is a folder; for a "
                                f"SQLite database give sqlite:///{a_file}")
    with pytest.raises(BenchError, match=f"{tmp_path} is a folder, not a SQLite database file; give "
                                         f"sqlite:///{tmp_path}/mlflow.db"):
        check_store(f"sqlite:///{tmp_path}")


def test_a_file_store_needs_mlflows_opt_in(tmp_path, monkeypatch):
    """MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE=true; it said so in a paragraph."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(BenchError, match="is a file store, which this MLflow refuses unless MLFLOW_ALLOW_FILE_STORE"):
        check_store(f"file:{tmp_path}/mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_store(f"file:{tmp_path}/mlruns")


def test_the_schemes_are_mlflows():
    """check_store's list of schemes is MLflow's registry of tracking stores (an MLflow upgrade that adds
    or drops one fails here)."""
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    for scheme in _tracking_store_registry._registry:
        uri = f"{scheme}://127.0.0.1:1/x" if scheme else "relative-folder"
        try:
            check_store(uri)
        except BenchError as e:
            assert "has no tracking store" not in str(e), scheme
    with pytest.raises(BenchError, match="has no tracking store for scheme 'mlflow-artifacts'"):
        check_store("mlflow-artifacts://x")  # an artifact scheme, not a tracking store
    assert "mlflow-artifacts" not in _tracking_store_registry._registry


@pytest.mark.parametrize("args, line", [
    (["--tracking-uri", "foo://x"], f"error: --tracking-uri 'foo://x': MLflow has no tracking store for scheme 'foo'; "
                                    f"{STORES}"),
    (["--experiment", ""], "error: --experiment '' is empty; give a name (the default is fedeq-bench)"),
])
def test_bench_run_refuses_a_bad_store_or_experiment(tmp_path, args, line):
    proc, s = cli("bench.run", [*RUN, "--backend", "serial", *args], tmp_path)
    assert_refused(proc, s, tmp_path, line)
