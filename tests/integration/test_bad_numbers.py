"""Bad numbers, as a user meets them: `--lr inf` and `--set fedavg.lr=nan` used to run to FINISHED
with a NaN model in the summary table. Now a non-finite or out-of-range number, at any level, is one
`error:` line, exit code 2, no traceback, and nothing recorded (no MLflow store is even created). A
few real `python -m bench.run` processes here; tests/unit/test_config.py checks the many members
in-process."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("args, preset, line", [
    (["--lr", "inf"], None, "lr must be a finite number > 0, got inf"),
    (["--set", "fedavg.lr=nan"], None, "fedavg.lr must be a finite number > 0, got nan"),
    (["--methods", "fedeq"], "[run]\nrounds = 2\n\n[fedeq]\nrho = inf\n",
     "fedeq.rho must be a finite number > 0, got inf"),
], ids=["flag", "set-method-key", "toml-method-section"])
def test_a_non_finite_number_is_one_line_exit_2_and_records_nothing(tmp_path, args, preset, line):
    if preset is not None:
        (tmp_path / "preset.toml").write_text(preset)
        args = [*args, "--config", "preset.toml"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--methods", "fedavg", "--rounds", "2", "--backend", "serial",
         "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--quiet", *args],
        cwd=tmp_path, env={**env, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {line}"]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "mlflow.db").exists()  # rejected before anything was recorded
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "reports").exists()
