"""bench/tracking/: opening a store that several processes create at once."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OPEN = """
import sys, time
from bench.tracking import Tracker
start = float(sys.argv[2])
while time.time() < start:  # every process opens the new store at the same instant
    time.sleep(0.001)
Tracker(sys.argv[1], "exp")
print("ok")
"""


def test_processes_opening_a_new_sqlite_store_together_all_succeed(tmp_path):
    """Without the schema lock, two bench.run started together on a new SQLite file collide in
    MLflow's migrations ('table _alembic_tmp_metrics already exists'); with it, all four succeed and
    there is one experiment."""
    import time

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = dict(os.environ, PYTHONPATH=ROOT)
    start = time.time() + 8  # after every interpreter has imported mlflow
    procs = [subprocess.Popen([sys.executable, "-c", OPEN, uri, str(start)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
    assert [e.name for e in MlflowClient(tracking_uri=uri).search_experiments()].count("exp") == 1


# -- stores that cannot work: one line, at once -------------------------------------------------------

import contextlib  # noqa: E402

import pytest  # noqa: E402

from bench.tracking import Tracker  # noqa: E402
from fedeq_bench.core.errors import BenchError  # noqa: E402


def test_an_unreachable_tracking_server_is_refused_with_one_line():
    # Port 9 (discard) has no listener here: MLflow's client would retry it for minutes.
    with pytest.raises(BenchError, match=r"cannot reach the MLflow tracking server at http://127.0.0.1:9 \("):
        Tracker("http://127.0.0.1:9", "exp")


def test_a_store_in_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(BenchError, match="the folder .*/nope does not exist"):
        Tracker(f"sqlite:///{tmp_path}/nope/mlflow.db", "exp")
    assert not (tmp_path / "nope").exists()


def test_a_deleted_experiment_is_refused_with_how_to_restore_it(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    t = Tracker(uri, "gone")
    t.client.delete_experiment(t.experiment_id)
    with pytest.raises(BenchError, match=rf"experiment 'gone' in {uri} is deleted; restore it \(mlflow experiments "
                                         rf"restore --experiment-id {t.experiment_id}\)"):
        Tracker(uri, "gone")


@contextlib.contextmanager
def tmpfs(path):
    """A small tmpfs mounted at `path` (root only); skips the test where mounting is not allowed."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root in a privileged container)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def read_only(path):
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)


def test_a_store_on_a_read_only_filesystem_is_refused(tmp_path):
    with tmpfs(tmp_path / "fs") as fs:
        uri = f"sqlite:///{fs}/mlflow.db"
        # A store that exists (made by another process: this one would keep the file open), then its
        # filesystem turns read-only.
        subprocess.run([sys.executable, "-c", OPEN, uri, "0"], env=dict(os.environ, PYTHONPATH=ROOT), check=True,
                       capture_output=True, timeout=120)
        read_only(fs)
        with pytest.raises(BenchError, match=r"mlflow.db is not writable \(a read-only file or filesystem\)"):
            Tracker(uri, "exp")


def test_a_read_only_artifact_location_is_refused_before_anything_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with tmpfs(tmp_path / "art") as art:
        MlflowClient(tracking_uri=uri).create_experiment("exp", artifact_location=str(art / "exp"))
        read_only(art)
        with pytest.raises(BenchError, match=r"the artifact location .*/art/exp of MLflow experiment 'exp' is not "
                                             r"writable"):
            Tracker(uri, "exp")
