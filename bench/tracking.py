"""MLflow: one parent run per invocation, one child run per method x seed, metrics with step=round.

Uses `MlflowClient` with explicit run ids (no fluent active-run stack), so a child run can be ended
FAILED or KILLED precisely, and every round is written as it finishes: an interrupted run keeps the
rounds it had. Runs are nested the way MLflow's UI expects (the `mlflow.parentRunId` tag).
"""
from __future__ import annotations

import json
import os
import subprocess
import time

from fedeq_bench.core.errors import BenchError

PARAM_BATCH = 100  # MLflow's limit of params per log_batch call


def git_commit() -> str:
    """HEAD of the checkout the harness runs from, with `-dirty` if it has uncommitted changes."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    def __init__(self, uri: str, experiment: str):
        import logging

        import mlflow

        # MLflow and alembic log INFO lines (database migrations) on stderr; warnings still show.
        # Set after importing mlflow, which configures its loggers on import.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        self._mlflow = mlflow
        self.uri = uri
        try:
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        except Exception as e:  # an unreachable server or an unusable store is bad input, not a bug
            raise BenchError(f"cannot use MLflow tracking store {uri!r}: {str(e).splitlines()[0][:200]}") from None

    def start(self, name: str, params: dict[str, str], tags: dict[str, str] | None = None,
              parent: str | None = None) -> str:
        tags = dict(tags or {})
        tags["mlflow.runName"] = name
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=name)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(run_id, params=items[i : i + PARAM_BATCH])

    def log_metrics(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in sorted(metrics.items())])

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    def log_json(self, run_id: str, obj, path: str) -> None:
        self.client.log_text(run_id, json.dumps(obj, indent=2, sort_keys=True), path)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        """status: FINISHED, FAILED or KILLED."""
        self.client.set_terminated(run_id, status=status)
