"""Signals: Ctrl-C and SIGTERM at any moment end a command with exit 130, one line, no
traceback, every MLflow run KILLED (none RUNNING), and no Ray process left behind.

Each command runs in its own session with a private RAY_TMPDIR, so it starts (and must stop) its own
Ray; Ctrl-C is sent the way a terminal sends it, to the whole process group (Ray's processes
included), SIGTERM the way `kill` does, to the command's process only. The moments are observed, not
timed: Ray's session folder appearing (Ray is starting), a round logged in MLflow (training), and a
fault injected by tests/integration/faulty.py: SIGINT as an artifact's write starts.
"""
import math
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

import pytest

from bench.perf.workloads import pids_naming

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INTERRUPTED = "error: interrupted"


def start(args, tmp, env=None, module="bench.run"):
    """The command in its own process group; stdout and stderr to files (a pipe would be held open
    by any Ray process left behind, which is what some tests look for)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    base.update(RAY_TMPDIR=tmp, PYTHONPATH=ROOT, **(env or {}))
    out, err = open(os.path.join(tmp, "out"), "w"), open(os.path.join(tmp, "err"), "w")
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=tmp, env=base, stdout=out, stderr=err,
                            start_new_session=True)


def wait_for(cond, what, proc, timeout=240):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"the command ended (rc {proc.returncode}) before {what}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def rows(db, sql):
    if not os.path.exists(db):
        return []
    con = sqlite3.connect(db, timeout=30)
    try:
        return con.execute(sql).fetchall()
    except sqlite3.OperationalError:  # the schema is still being created
        return []
    finally:
        con.close()


def ray_processes(tmp):
    """Processes whose command line names this test's private Ray temp dir (its GCS, raylet, workers)."""
    return pids_naming(os.path.join(tmp, "ray"))


def finish(proc, tmp):
    """Wait for the command; then its stderr, and (after Ray's processes had 15 s to go) any left."""
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the command did not end within 120 s of the signal")
    deadline = time.time() + 15
    while ray_processes(tmp) and time.time() < deadline:
        time.sleep(0.2)
    left = ray_processes(tmp)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    with open(os.path.join(tmp, "err")) as f:
        return f.read(), left


def check_interrupted(proc, err, left, db):
    lines = [line for line in err.strip().splitlines()
             if not line.startswith("[I ")]  # Optuna's INFO lines (a study created) in a sweep
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "SIGTERM received" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith(INTERRUPTED), err[-3000:]
    assert left == [], f"Ray processes left behind: {left}"
    statuses = [s for (s,) in rows(db, "select status from runs")]
    assert "RUNNING" not in statuses, statuses
    finished = {r for (r,) in rows(db, "select run_uuid from runs where status = 'FINISHED'")}
    for run, value in rows(db, "select run_uuid, value from metrics"):
        assert run not in finished or math.isfinite(value)
    return statuses


@pytest.fixture
def tmp():
    with tempfile.TemporaryDirectory(prefix="sg", dir="/tmp") as d:  # short: Ray's socket paths
        yield d


ARGS = ["--methods", "fedavg,fedrep", "--rounds", "200", "--workers", "2", "--quiet", "--no-report"]


@pytest.mark.ray
def test_ctrl_c_while_ray_starts_stops_it_and_records_nothing(tmp):
    db = os.path.join(tmp, "m.db")
    proc = start([*ARGS, "--tracking-uri", f"sqlite:///{db}"], tmp)
    wait_for(lambda: os.path.isdir(os.path.join(tmp, "ray")), "Ray's session folder", proc)
    os.killpg(proc.pid, signal.SIGINT)
    err, left = finish(proc, tmp)
    assert check_interrupted(proc, err, left, db) == []  # stopped before anything was recorded


@pytest.mark.ray
@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGINT, signal.SIGINT]], ids=["sigterm", "ctrl-c-twice"])
def test_signal_during_training_ends_every_run_killed(tmp, signals):
    db = os.path.join(tmp, "m.db")
    proc = start([*ARGS, "--tracking-uri", f"sqlite:///{db}"], tmp)
    wait_for(lambda: rows(db, "select 1 from metrics where key = 'bytes/cumulative' limit 1"), "a round logged", proc)
    for i, sig in enumerate(signals):
        if i:
            time.sleep(0.5)  # the second Ctrl-C lands while the first one's cleanup runs
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    err, left = finish(proc, tmp)
    statuses = check_interrupted(proc, err, left, db)
    assert statuses and set(statuses) == {"KILLED"}, statuses  # the parent and the child it was in


def test_ctrl_c_in_the_middle_of_a_write_completes_it_and_ends_the_run_killed(tmp):
    """On the Serial backend (no Ray: not in the `ray` group)."""
    db = os.path.join(tmp, "m.db")
    proc = start(["sigint-in-write", "ledger.csv", "--", "--methods", "fedavg", "--rounds", "2", "--backend",
                  "serial", "--quiet", "--no-report", "--tracking-uri", f"sqlite:///{db}"], tmp,
                 module="tests.integration.faulty")
    err, left = finish(proc, tmp)
    check_interrupted(proc, err, left, db)
    runs = dict(rows(db, "select name, status from runs"))
    assert runs == {"fedavg on synthetic": "KILLED", "fedavg seed=0": "KILLED"}, runs
    # The write the signal arrived in was completed before the interrupt was raised.
    (child,) = [r for (r,) in rows(db, "select run_uuid from runs where name = 'fedavg seed=0'")]
    (art,) = [a for (a,) in rows(db, f"select artifact_uri from runs where run_uuid = '{child}'")]
    assert os.path.exists(os.path.join(art.removeprefix("file://"), "ledger.csv"))


@pytest.mark.ray
def test_sweep_sigterm_during_a_trial_ends_its_runs_killed(tmp):
    db = os.path.join(tmp, "m.db")
    proc = start(["--method", "fedavg", "--trials", "3", "--rounds", "100", "--workers", "2",
                  "--tracking-uri", f"sqlite:///{db}", "--storage", f"sqlite:///{tmp}/optuna.db"], tmp,
                 module="bench.sweep")
    wait_for(lambda: rows(db, "select 1 from metrics where key = 'acc/val' limit 1"), "a trial's round logged", proc)
    proc.send_signal(signal.SIGTERM)
    err, left = finish(proc, tmp)
    statuses = check_interrupted(proc, err, left, db)
    assert statuses and set(statuses) == {"KILLED"}, statuses
