"""`python -m bench.run --tracking-uri http://HOST:PORT` logging to a real `mlflow server` process (a
SQLite database behind it, artifacts served by the server), as on a cluster's head node
(ray_cluster.yaml starts one there). Runs are read back over HTTP with MLflow's client, and from
the server's database directly: the server, not a local file store, holds them."""
import os
import subprocess
import sys

from mlflow.tracking import MlflowClient

from tests.helpers import write_tiny_npz

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_run_logs_to_an_mlflow_server_over_http(mlflow_server, tmp_path):
    uri, db = mlflow_server
    npz = write_tiny_npz(tmp_path / "t.npz")
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--methods", "fedavg,fedrep", "--dataset", f"npz:{npz}", "--rounds", "2",
         "--backend", "serial", "--tracking-uri", uri, "--experiment", "on-server", "--quiet",
         "--no-report"],  # the report's own test covers it; this one is about the server (and stays ~1 min)
        cwd=tmp_path, env={**base, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"recorded in {uri} (experiment 'on-server'" in proc.stdout

    client = MlflowClient(tracking_uri=uri)  # over HTTP
    exp = client.get_experiment_by_name("on-server")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and sorted(r.data.params["method"] for r in children) == ["fedavg", "fedrep"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert parents[0].data.params["run.tracking_uri"] == uri
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "acc/mean")] == [1, 2]
        # Artifacts went to the server (mlflow-artifacts:/ is the server's proxied store), and come back.
        assert child.info.artifact_uri.startswith("mlflow-artifacts:/")
        ledger = client.download_artifacts(child.info.run_id, "ledger.csv", str(tmp_path / child.info.run_id))
        assert open(ledger).readline().strip()
    parent_arts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"summary.md", "summary.json"} <= parent_arts
    summary = client.download_artifacts(parents[0].info.run_id, "summary.md", str(tmp_path / "parent"))
    assert "| fedrep " in open(summary).read()

    # The server's own database holds the same runs (no local store was written instead).
    direct = MlflowClient(tracking_uri=db)
    assert {r.info.run_id for r in direct.search_runs([exp.experiment_id])} == {r.info.run_id for r in runs}
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
