"""`python -m bench.sweep` as a user runs it (subprocess): a tiny study, and bad input."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest
from mlflow.tracking import MlflowClient

from bench import config as C

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_sweep(args, cwd, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "bench.sweep", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_two_trial_study_from_the_command_line(tmp_path):
    (tmp_path / "space.toml").write_text("fedavg.lr = {low = 0.01, high = 0.3, log = true}\n")
    proc = bench_sweep(["--method", "fedavg", "--trials", "2", "--space", "space.toml", "--pruner", "hyperband",
                        "--dataset", "synthetic", "--clients", "6", "--rounds", "2", "--backend", "serial",
                        "--tracking-uri", "sqlite:///mlflow.db", "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "fedavg: study 'fedavg-synthetic', 2 trials; best acc/val=" in proc.stdout
    st = optuna.load_study(study_name="fedavg-synthetic", storage=f"sqlite:///{tmp_path}/optuna.db")  # default
    assert len(st.trials) == 2
    tuned = tmp_path / "configs" / "tuned" / "synthetic.toml"  # default --tuned-out
    assert C.apply(C.default_config(), C.load_toml(str(tuned))).methods["fedavg"].lr == st.best_params["fedavg.lr"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("fedeq-bench")
    statuses = sorted(r.info.status for r in client.search_runs([exp.experiment_id]))
    assert statuses == ["FINISHED"] * 4  # parent, 2 trials, the best on test
    # The printed `rerun on test: PYTHON -m bench.run --config configs/tuned/synthetic.toml` runs as printed
    # from a shell without the venv (a smaller task appended, to keep the test short).
    rerun = re.search(r"\(rerun on test: (.+)\)$", proc.stdout, re.M).group(1)
    assert rerun == f"{sys.executable} -m bench.run --config configs/tuned/synthetic.toml", rerun
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV" and not k.startswith("MLFLOW_")}
    again = subprocess.run(f"{rerun} --clients 6 --rounds 1 --backend serial --quiet --no-report", shell=True,
                           cwd=tmp_path, env={**env, "PATH": "/usr/bin:/bin", "PYTHONPATH": ROOT}, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "| fedavg " in again.stdout


def test_bad_pruner_is_one_line_exit_2_and_records_nothing(tmp_path):
    (tmp_path / "space.toml").write_text("fedavg.lr = {low = 0.01, high = 0.3, log = true}\n")
    proc = bench_sweep(["--method", "fedavg", "--trials", "2", "--space", "space.toml", "--pruner", "medain",
                        "--backend", "serial", "--tracking-uri", "sqlite:///mlflow.db"], tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown pruner 'medain'; choose from hyperband, median, none"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.db").exists()


def test_an_acc_bytes_study_prints_its_pareto_front(tmp_path):
    (tmp_path / "space.toml").write_text("lg_fedavg.global_layers = {low = 1, high = 2}\n")
    proc = bench_sweep(["--method", "lg_fedavg", "--trials", "3", "--space", "space.toml", "--objective", "acc,bytes",
                        "--dataset", "synthetic", "--clients", "6", "--rounds", "2", "--backend", "serial",
                        "--tracking-uri", "sqlite:///mlflow.db", "--no-final-test", "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    st = optuna.load_study(study_name="lg_fedavg-synthetic-acc-bytes", storage=f"sqlite:///{tmp_path}/optuna.db")
    front = sorted(t.number for t in st.best_trials)
    out = proc.stdout
    assert "Pareto front of lg_fedavg (acc, bytes; validation, mean over seeds):" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].split("|")[1:4] == [" trial ", " acc/val ", " MB sent "]
    assert sorted(int(line.split("|")[1]) for line in table[1:]) == front
    # The printed `watch: .../optuna-dashboard sqlite:///optuna.db`, run as printed (no active venv),
    # shows this study: its API lists it with both directions, its trials and its Pareto front.
    study_json = dashboard_study(out, tmp_path, st._study_id)
    assert study_json["name"] == "lg_fedavg-synthetic-acc-bytes"
    assert [t["state"] for t in study_json["trials"]] == ["Complete"] * 3
    assert sorted(t["number"] for t in study_json["best_trials"]) == front


def dashboard_study(stdout, cwd, study_id):
    """Run the `watch: ...` command bench.sweep printed, in `cwd`, from a shell whose PATH lacks the
    virtual environment, on a free local port (added), and read one study from its API."""
    watch = re.search(r"\(watch: (.+)\)$", stdout, re.M)
    if watch is None:
        assert "optuna-dashboard, which is not installed" in stdout, stdout
        if os.environ.get("CI"):
            pytest.fail("optuna-dashboard is not installed (it is in the dev extras)")
        pytest.skip("optuna-dashboard not installed (pip install -e '.[dev]')")
    assert watch.group(1).split()[1:] == ["sqlite:///optuna.db"], watch.group(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    proc = subprocess.Popen(f"exec {watch.group(1)} --host 127.0.0.1 --port {port}", shell=True, cwd=cwd,
                            env={**env, "PATH": "/usr/bin:/bin"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study_id}?after=0", timeout=5) as r:
                    return json.load(r)
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_objective_and_n_jobs_mistakes_are_one_line_exit_2(tmp_path):
    common = ["--method", "fedavg", "--trials", "2", "--backend", "serial", "--tracking-uri", "sqlite:///mlflow.db"]
    for extra, line in [
        (["--objective", "acc,speed"], "error: unknown objective 'speed'; give a comma list of acc, bytes, memory, time "
                                       "(e.g. acc,bytes)"),
        (["--objective", "acc,bytes", "--pruner", "median"],
         "error: --pruner median: Optuna cannot prune a multi-objective study; leave --pruner out or give "
         "--pruner none"),
        (["--n-jobs", "2"], "error: --n-jobs 2 runs trials at once on Ray actors; give --backend ray (the serial "
                            "backend runs one trial at a time)"),
    ]:
        proc = bench_sweep(common + extra, tmp_path, timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [line], proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.db").exists()
