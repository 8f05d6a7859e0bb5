"""One entry guard for every command (bench/cli.py `run_guarded`): every command's entry point x every
event that ends a command from outside, during its work (SIGINT, SIGTERM, SIGHUP; stdout closed by
its reader; stdout on a full disk), ends with the stated exit code, exactly one `error:` line on
stderr, no traceback, and for bench.run and bench.sweep no MLflow run left RUNNING.

The commands are bench/__main__.py's COMMANDS (and `python -m bench` itself): a command added there
without a row in WORK fails `test_every_command_has_a_row`. In-process, through each command's
`main(argv)`: the work point named in WORK is wrapped so that the event happens while it runs (a real
tiny run for bench.run and bench.sweep, a stand-in for the others, whose own work is not what is
tested). A few real subprocesses at the end prove the wiring (the handlers, stdout, the exit code).
"""
from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time

import pytest

from bench import cli
from bench.__main__ import COMMANDS, MODULES
from tests.helpers import new_store

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--rounds", "2", "--clients", "4", "--backend", "serial"]
EVENTS = {
    "SIGINT": cli.EXIT_INTERRUPTED, "SIGTERM": cli.EXIT_INTERRUPTED, "SIGHUP": cli.EXIT_INTERRUPTED,
    "closed-pipe": cli.EXIT_OUTPUT_CLOSED, "full-disk": cli.EXIT_BAD_INPUT,
}
LINES = {"SIGINT": "error: interrupted", "SIGTERM": "error: interrupted", "SIGHUP": "error: interrupted",
         "closed-pipe": "error: standard output was closed by its reader",
         "full-disk": "error: no space left on the device (or over the disk quota) writing standard output"}


def WORK(tmp) -> dict[str, tuple[list[str], str, object]]:
    """command -> (argv, the function its work calls, what a stand-in returns: None for a real run)."""
    uri = f"sqlite:///{tmp}/m.db"
    return {
        "run": ([*TINY, "--methods", "fedavg", "--quiet", "--no-report", "--tracking-uri", uri],
                "bench.loop.engine.evaluate", None),
        "sweep": ([*TINY, "--method", "fedavg", "--trials", "1", "--quiet", "--no-final-test", "--tracking-uri", uri,
                   "--storage", f"sqlite:///{tmp}/o.db", "--tuned-out", f"{tmp}/tuned.toml"],
                  "bench.loop.engine.evaluate", None),
        "report": (["--tracking-uri", uri, "--out", f"{tmp}/r"], "bench.report.build",
                   type("Paths", (), {"html": "r/index.html", "markdown": "r/report.md"})()),
        "data": (["describe", "--clients", "4"], "bench.experiment.describe_data", "client table\n" * 2000),
        "perf": (["--rounds", "3", "--warmup", "0", "--workers", "1"], "bench.perf.workloads.overhead_table",
                 "perf table\n" * 2000),
    }


def test_every_command_has_a_row(tmp_path):
    assert set(WORK(tmp_path)) == set(COMMANDS)


def hostile_stdout(event, monkeypatch):
    """A closed pipe (its reader gone) or /dev/full as sys.stdout (and its descriptor, for the guard)."""
    if event == "closed-pipe":
        r, w = os.pipe()
        os.close(r)
        stream = os.fdopen(w, "w")
    else:
        stream = open("/dev/full", "w")  # noqa: SIM115 - closed below
    monkeypatch.setattr(sys, "stdout", stream)
    return stream


def entry(command):
    if command == "bench":
        return importlib.import_module("bench.__main__").main
    return importlib.import_module(f"bench.{MODULES.get(command, command)}").main


def statuses(tmp):
    import sqlite3

    db = os.path.join(tmp, "m.db")
    if not os.path.exists(db):
        return []
    con = sqlite3.connect(db)
    try:
        return [s for (s,) in con.execute("select status from runs")]
    finally:
        con.close()


CASES = [(c, via, e) for c in COMMANDS for via in ("module", "bench") for e in EVENTS
         if via == "module" or e in ("SIGHUP", "closed-pipe")]  # `python -m bench CMD`: its own guard too


@pytest.mark.parametrize("command, via, event", CASES, ids=[f"{via}-{c}-{e}" for c, via, e in CASES])
def test_every_command_ends_every_event_with_its_code_and_one_line(tmp_path, monkeypatch, capfd, guarded,
                                                                   command, via, event):
    monkeypatch.chdir(tmp_path)
    for k in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(k)
    argv, point, stand_in = WORK(str(tmp_path))[command]
    new_store(tmp_path / "m.db")  # the store is not the subject here: a copy of a new one (tests/helpers.py)
    module, _, name = point.rpartition(".")
    real = getattr(importlib.import_module(module), name)

    def during_work(*args, **kwargs):
        out = real(*args, **kwargs) if stand_in is None else stand_in
        if event.startswith("SIG"):
            os.kill(os.getpid(), getattr(signal, event))
            time.sleep(5)  # the handler raises here, at once
        return out

    monkeypatch.setattr(importlib.import_module(module), name, during_work)
    stream = hostile_stdout(event, monkeypatch) if not event.startswith("SIG") else None
    try:
        code = entry("bench")([command, *argv]) if via == "bench" else entry(command)(argv)
    finally:
        if stream is not None:
            stream.close() if event != "full-disk" else None
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == EVENTS[event], err[-2000:]
    assert len(lines) == 1 and lines[0].startswith(LINES[event]), err[-2000:]
    assert "Traceback" not in err
    runs = statuses(str(tmp_path))
    assert "RUNNING" not in runs, runs
    if command in ("run", "sweep"):
        assert runs, "the real run was recorded"
        if event.startswith("SIG"):
            assert "KILLED" in runs and "FINISHED" not in runs, runs


# -- real processes: the handlers, the descriptors and the exit code as a shell sees them ---------------

def env():
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    return {**base, "PYTHONPATH": ROOT}


def one_error_line(err: str, start: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(start) and "Traceback" not in err, err[-3000:]


def test_sighup_during_a_real_run_of_a_trillion_rounds_ends_it_killed(tmp_path):
    """`--rounds 1000000000000` starts at once (round 1 logged within seconds of the imports), and a
    closed terminal (SIGHUP) ends it like Ctrl-C: exit 130, one line, the runs KILLED."""
    db = tmp_path / "m.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.run", "--methods", "fedavg", "--rounds", "1000000000000", "--clients", "4",
         "--backend", "serial", "--quiet", "--no-report", "--tracking-uri", f"sqlite:///{db}"],
        cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))  # a terminal's, even under nohup
    import sqlite3

    deadline = time.time() + 120
    while True:
        assert proc.poll() is None and time.time() < deadline, "no round logged"
        try:
            con = sqlite3.connect(db)
            if con.execute("select 1 from metrics where key = 'bytes/cumulative' limit 1").fetchall():
                break
        except sqlite3.OperationalError:
            pass
        finally:
            con.close()
        time.sleep(0.2)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == cli.EXIT_INTERRUPTED, err[-3000:]
    one_error_line(err, "error: interrupted; KILLED: the parent run")
    assert statuses(str(tmp_path)) == ["KILLED", "KILLED"]


@pytest.mark.parametrize("stdout, code, line", [
    ("closed-pipe", cli.EXIT_OUTPUT_CLOSED, LINES["closed-pipe"]),
    ("/dev/full", cli.EXIT_BAD_INPUT, LINES["full-disk"]),
])
def test_bench_perf_and_python_m_bench_to_hostile_stdout(tmp_path, stdout, code, line):
    """The commands that print without a run: `python -m bench --help` and bench.perf's bad number."""
    for args in (["-m", "bench", "--help"], ["-m", "bench", "data", "describe", "--help"]):
        if stdout == "closed-pipe":
            r, w = os.pipe()
            os.close(r)
            proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env(), stdout=w,
                                  stderr=subprocess.PIPE, text=True, timeout=120)
            os.close(w)
        else:
            with open(stdout, "w") as out:
                proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env(), stdout=out,
                                      stderr=subprocess.PIPE, text=True, timeout=120)
        assert proc.returncode == code, (args, proc.stderr[-3000:])
        one_error_line(proc.stderr, line)


@pytest.mark.parametrize("args, line", [
    (["--rounds", "-1"], "error: --rounds must be >= 1, got -1"),
    (["--workers", "x"], "error: --workers expects comma list of int, got 'x'"),
    (["--lr", "nan"], "error: --lr must be a finite number > 0, got nan"),
])
def test_bench_perf_bad_numbers_are_one_line_exit_2(args, line):
    from bench.perf.__main__ import main

    proc = subprocess.run([sys.executable, "-m", "bench.perf", *args], env=env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [line], proc.stderr
    assert main is not None
