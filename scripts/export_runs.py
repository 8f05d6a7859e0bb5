"""Print, as JSON, what an MLflow experiment holds of each comparison's child runs: run id, method,
seed, status, wire format, parent, every final metric, the per-round history of acc/weighted and, for
a run that diverged, where. The study keeps this export beside each report (reports/<comparison>/runs.json), so
a reader can check the report's numbers without the store, and tests/unit/test_findings.py does.

    python scripts/export_runs.py sqlite:///reports/synthetic/mlflow.db study-synthetic > reports/synthetic/runs.json
"""
import json
import sys

from mlflow.tracking import MlflowClient


def export(uri: str, experiment: str) -> dict:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"error: no experiment {experiment!r} in {uri}")
    runs = client.search_runs([exp.experiment_id], max_results=50000)
    out = []
    for r in sorted(runs, key=lambda r: (r.data.params.get("method", ""), r.data.params.get("seed", ""), r.info.run_id)):
        parent = r.data.tags.get("mlflow.parentRunId")
        if parent is None:
            continue
        history = sorted(client.get_metric_history(r.info.run_id, "acc/weighted"), key=lambda m: m.step)
        out.append({"run_id": r.info.run_id, "parent": parent, "method": r.data.params["method"],
                    "seed": int(r.data.params["seed"]), "status": r.info.status,
                    "wire": r.data.params.get("wire", "fp32"),
                    "metrics": dict(sorted(r.data.metrics.items())),
                    "acc/weighted history": [[m.step, m.value] for m in history],
                    **({"diverged": r.data.tags["diverged"]} if "diverged" in r.data.tags else {})})
    return {"tracking_uri": uri, "experiment": experiment, "runs": out}


if __name__ == "__main__":
    json.dump(export(sys.argv[1], sys.argv[2]), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
