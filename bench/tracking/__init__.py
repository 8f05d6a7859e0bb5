"""MLflow, and only MLflow: the run lifecycle (runs.py: `Tracker`, runs that always end FINISHED,
FAILED, KILLED or pruned), tracking stores checked and opened (stores.py), provenance (provenance.py).
It imports only bench.cli and the library's core, so the round loop, reports and the experiment
library can all record through it. The names other packages use are re-exported here.
"""
from bench.tracking.provenance import VERSIONED, git_commit, package_versions
from bench.tracking.runs import STATUSES, Pruned, Tracker, is_pruned, status_for
from bench.tracking.stores import check_artifacts, check_store, open_client, sqlite_path

__all__ = ["STATUSES", "VERSIONED", "Pruned", "Tracker", "check_artifacts", "check_store", "git_commit",
           "is_pruned", "open_client", "package_versions", "sqlite_path", "status_for"]
