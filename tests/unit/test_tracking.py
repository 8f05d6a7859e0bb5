"""bench/tracking.py: opening a store that several processes create at once."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OPEN = """
import sys, time
from fedeq_bench.bench.tracking import Tracker
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
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
    assert [e.name for e in MlflowClient(tracking_uri=uri).search_experiments()].count("exp") == 1
