"""Shared test setup: the repo root on sys.path (also works without `pip install -e .`)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def report_store(tmp_path_factory):
    """A small real MLflow store, as `python -m bench.run` leaves it, for the report tests.

    One comparison (parent run + child runs): fedeq, fedavg and fedrep on `synthetic` (6 clients,
    one held out, 3 rounds, evaluated every round), seeds 0 and 1, serial backend. Returns
    {"uri", "experiment", "parent", "rows", "command", "dir"}. Built once per session (about 20 s).
    """
    from bench import config as C
    from bench import experiment

    d = tmp_path_factory.mktemp("report_store")
    uri = f"sqlite:///{d}/mlflow.db"
    command = "python -m bench.run --methods fedeq,fedavg,fedrep --dataset synthetic --clients 6 --rounds 3 --seeds 0,1"
    cfg = C.apply(C.default_config(), {
        "methods": "fedeq,fedavg,fedrep", "dataset": "synthetic", "clients": 6, "rounds": 3, "seeds": "0,1",
        "backend": "serial", "tracking_uri": uri, "experiment": "report-test", "frac_unseen": 0.2,
    })
    cfg = experiment.validate(cfg)
    rows, parent = experiment.compare(cfg, command=command, quiet=True)
    return {"uri": uri, "experiment": "report-test", "parent": parent, "rows": rows, "command": command,
            "dir": str(d)}
