"""`python -m bench.run --resume PARENT_RUN_ID` as a user runs it: a run killed with SIGKILL after
round 3 of its second method, resumed, ends with the metrics, ledger and summary of an uninterrupted
run of the same command, bit for bit, in the same MLflow runs. And the one-line refusals."""
import json
import os
import signal

import pytest

from fedeq_bench.bench import checkpoint
from fedeq_bench.bench.experiment import TEST_KILL_ENV
from tests.integration.test_cli import bench_run, runs_of

# 2 methods x 6 rounds on 6 synthetic clients, a checkpoint every 2 rounds. Killed after fedrep's
# round 3: fedavg has FINISHED, fedrep's last checkpoint is round 2, and round 3 is logged already.
ARGS = ["--methods", "fedavg,fedrep", "--dataset", "synthetic", "--clients", "6", "--rounds", "6",
        "--fraction", "0.5", "--backend", "serial", "--checkpoint-every", "2", "--quiet", "--no-report"]
KILL_AT = "fedrep:0:3"
MACHINE_METRICS = {"time/round_s", "mem/peak_rss_bytes"}  # measure the machine: differ in any two runs


def store(d):
    os.makedirs(d, exist_ok=True)
    return f"sqlite:///{d}/mlflow.db"


def parent_and_children(uri):
    client, runs = runs_of(uri)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.params["method"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return client, parent, children


def histories(client, run):
    """{metric: [(step, value), ...]} in logging order, machine metrics left out."""
    return {k: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, k),
                                                  key=lambda m: (m.step, m.timestamp))]
            for k in sorted(run.data.metrics) if k not in MACHINE_METRICS}


def artifact(client, run, path, dst):
    with open(client.download_artifacts(run.info.run_id, path, str(dst))) as f:
        return f.read()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run (a), and the same command killed then resumed (b)."""
    base = tmp_path_factory.mktemp("resume")
    a, b = base / "a", base / "b"
    uri_a, uri_b = store(a), store(b)
    whole = bench_run([*ARGS, "--tracking-uri", uri_a], a)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = bench_run([*ARGS, "--tracking-uri", uri_b], b, env={TEST_KILL_ENV: KILL_AT})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    client, parent, children = parent_and_children(uri_b)
    left = {"parent": parent.info.status, **{m: c.info.status for m, c in children.items()},
            "fedrep_checkpoint": checkpoint.RunCheckpoints(client, children["fedrep"].info.run_id).load().round,
            "fedrep_steps": sorted(m.step for m in client.get_metric_history(children["fedrep"].info.run_id,
                                                                             "loss/train")),
            "ids": {m: c.info.run_id for m, c in children.items()}}

    resumed = bench_run(["--resume", parent.info.run_id, "--tracking-uri", uri_b, "--quiet", "--no-report"], b)
    return {"a": uri_a, "b": uri_b, "dir": base, "whole": whole, "resumed": resumed, "left": left,
            "parent_b": parent.info.run_id}


def test_the_kill_left_a_finished_method_and_a_checkpoint_to_continue(runs):
    left = runs["left"]
    # kill -9 gives no process a chance to end its runs: they stay RUNNING.
    assert (left["parent"], left["fedavg"], left["fedrep"]) == ("RUNNING", "FINISHED", "RUNNING")
    assert left["fedrep_checkpoint"] == 2  # written after rounds 2, 4, 6: round 2 was the last before the kill
    assert left["fedrep_steps"] == [1, 2, 3]


def test_resume_continues_the_same_runs_and_equals_an_uninterrupted_run_bit_for_bit(runs, tmp_path):
    resumed = runs["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    client_a, parent_a, kids_a = parent_and_children(runs["a"])
    client_b, parent_b, kids_b = parent_and_children(runs["b"])
    # The same parent and child runs, ended as an uninterrupted invocation ends them.
    assert parent_b.info.run_id == runs["parent_b"] and parent_b.info.status == "FINISHED"
    assert {m: c.info.run_id for m, c in kids_b.items()} == runs["left"]["ids"]
    assert {c.info.status for c in kids_b.values()} == {"FINISHED"}
    for method in ("fedavg", "fedrep"):
        a, b = kids_a[method], kids_b[method]
        ha, hb = histories(client_a, a), histories(client_b, b)
        assert ha == hb, method  # every round of every metric, one value per round: rounds 3's was not logged twice
        assert all([s for s, _ in h] == [1, 2, 3, 4, 5, 6] for h in hb.values())
        assert a.data.params == b.data.params
        for name in ("ledger.csv", "clients.csv"):
            assert artifact(client_a, a, name, tmp_path / "a" / method) == \
                artifact(client_b, b, name, tmp_path / "b" / method), (method, name)
    # The summary is the uninterrupted run's, but for the wall-clock seconds.
    sa, sb = (json.loads(artifact(c, p, "summary.json", tmp_path / n))
              for c, p, n in ((client_a, parent_a, "sa"), (client_b, parent_b, "sb")))
    assert [{k: v for k, v in r.items() if k != "wall_s"} for r in sa] == \
        [{k: v for k, v in r.items() if k != "wall_s"} for r in sb]
    table = lambda out: [line.rsplit("|", 2)[0] for line in out.splitlines() if line.startswith("|")]  # noqa: E731
    assert table(runs["whole"].stdout) == table(resumed.stdout) and len(table(resumed.stdout)) == 4
    # A finished invocation keeps no checkpoints (nothing can resume it; they hold every client state).
    for client, kids in ((client_a, kids_a), (client_b, kids_b)):
        for c in kids.values():
            assert checkpoint.RunCheckpoints(client, c.info.run_id).load() is None
    assert parent_b.data.tags["resumed_by"].startswith("python -m bench.run --resume ")


def test_resume_refuses_in_one_line_with_exit_2(runs):
    uri_a, uri_b = runs["a"], runs["b"]
    _, parent_a, kids_a = parent_and_children(uri_a)
    cases = [
        (["--resume", "0123456789abcdef", "--tracking-uri", uri_a], "no run '0123456789abcdef'"),
        (["--resume", parent_a.info.run_id, "--tracking-uri", uri_a], "nothing to resume"),
        (["--resume", kids_a["fedavg"].info.run_id, "--tracking-uri", uri_a], "is a child run"),
        (["--resume", parent_a.info.run_id, "--tracking-uri", uri_a, "--rounds", "8"], "--rounds would change"),
        (["--resume", parent_a.info.run_id, "--tracking-uri", uri_a, "--set", "fedrep.head_epochs=3"],
         "--set would change"),
    ]
    from fedeq_bench.bench import run as bench_run_module

    for argv, message in cases:
        # In-process: each fails before any work; the CLI's exit code and stderr are what is checked.
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = bench_run_module.main(argv)
        lines = err.getvalue().strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (argv, err.getvalue())


def test_checkpoint_every_is_validated(tmp_path, capsys):
    from fedeq_bench.bench import run as bench_run_module

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert bench_run_module.main(["--checkpoint-every", "-1", "--backend", "serial", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: checkpoint_every must be >= 0 (0: no checkpoints), got -1"]
    assert not (tmp_path / "mlflow.db").exists()  # rejected before anything was recorded


@pytest.fixture
def http_store(tmp_path):
    """An `mlflow server` process (SQLite behind it, artifacts served by it) on a free local port."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                 f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "served"),
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_checkpoints_go_through_an_mlflow_server_when_its_artifacts_are_not_local(http_store):
    from mlflow.tracking import MlflowClient

    from tests.unit.test_checkpoint import loop_state

    client = MlflowClient(tracking_uri=http_store)
    run_id = client.create_run(client.create_experiment("remote")).info.run_id
    ckpts = checkpoint.RunCheckpoints(client, run_id)
    assert ckpts.local is None  # mlflow-artifacts:/...: staged locally, then uploaded
    assert ckpts.load() is None
    for rnd in (2, 4):  # the second upload replaces the first
        ckpts.save(loop_state(rnd=rnd))
        ck = checkpoint.RunCheckpoints(client, run_id).load()
        assert ck.round == rnd and [cid for cid, _ in ck.clients()] == [0, 3, 5]
        assert ck.server()["body.w"].equal(loop_state().server["body.w"])
    assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == [checkpoint.ARTIFACT_PATH]
    ckpts.remove()
    assert checkpoint.RunCheckpoints(client, run_id).load() is None
