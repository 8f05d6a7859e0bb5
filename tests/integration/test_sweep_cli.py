"""`python -m bench.sweep` as a user runs it (subprocess): a tiny study, and bad input."""
from __future__ import annotations

import os
import subprocess
import sys

import optuna
from mlflow.tracking import MlflowClient

from fedeq_bench.bench import config as C

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


def test_bad_pruner_is_one_line_exit_2_and_records_nothing(tmp_path):
    (tmp_path / "space.toml").write_text("fedavg.lr = {low = 0.01, high = 0.3, log = true}\n")
    proc = bench_sweep(["--method", "fedavg", "--trials", "2", "--space", "space.toml", "--pruner", "medain",
                        "--backend", "serial", "--tracking-uri", "sqlite:///mlflow.db"], tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown pruner 'medain'; choose from hyperband, median, none"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.db").exists()
