"""Shared test setup: the repo root on sys.path (also works without `pip install -e .`), and the
fixtures that tests in several folders use."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_shakespeare() -> str:
    """The path of tinyshakespeare.txt, in the folder `FEDEQ_BENCH_SHARED_DATA` names, else in
    `shared/data` beside the checkout (docs/datasets.md, "Data the tests use"). The text is not in the
    repository, so a test that needs it is skipped where it is absent."""
    folder = os.environ.get("FEDEQ_BENCH_SHARED_DATA") or os.path.join(os.path.dirname(ROOT), "shared", "data")
    path = os.path.join(folder, "tinyshakespeare.txt")
    if not os.path.isfile(path):
        pytest.skip(f"tiny Shakespeare not found at {path} (set FEDEQ_BENCH_SHARED_DATA to the folder "
                    "holding tinyshakespeare.txt)")
    return path


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


def pytest_collection_modifyitems(config, items):
    """Groups for `pytest -n 2 --dist loadgroup` (`make test`): every test that starts Ray (marked
    `ray`) in one group, run one at a time on one worker, since two local Rays on two cores starve
    each other's actors and some tests read every Ray process of the machine; every other test file
    is a group of its own, so its module fixtures are built once, on one worker."""
    for item in items:
        group = "ray" if item.get_closest_marker("ray") else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
