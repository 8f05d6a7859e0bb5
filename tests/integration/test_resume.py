"""`python -m bench.run --resume PARENT_RUN_ID` as a user runs it: a run killed with SIGKILL (after
round 3 of its second method; after round 1 of its first, before any checkpoint), resumed, ends with
the metrics, ledger and summary of an uninterrupted run of the same command, bit for bit, in the same
MLflow runs. Checkpoints through an `mlflow server`. And the one-line refusals."""
import json
import os
import signal

import pytest

from bench.loop import checkpoint
from tests.helpers import new_store
from tests.integration.test_cli import bench_run, runs_of

# 2 methods x 6 rounds on 6 synthetic clients, half of them per round, a checkpoint every 2 rounds.
ARGS = ["--methods", "fedavg,fedrep", "--dataset", "synthetic", "--clients", "6", "--rounds", "6",
        "--fraction", "0.5", "--backend", "serial", "--checkpoint-every", "2", "--quiet", "--no-report"]
# Where tests/integration/faulty.py kills the process (METHOD:SEED:ROUND).
KILLS = {
    # fedavg has FINISHED; fedrep's last checkpoint is round 2, and its round 3 is logged already.
    "late": "fedrep:0:3",
    # fedavg's round 1 is logged but it has no checkpoint yet (it restarts at round 1 in the same
    # child run); fedrep has no child run yet (it starts afresh under the same parent).
    "early": "fedavg:0:1",
}
MACHINE_METRICS = {"time/round_s", "mem/peak_rss_bytes"}  # measure the machine: differ in any two runs


def store(d):
    """The store a command records in: made once per folder (a copy: tests/helpers.py new_store)."""
    path = os.path.join(d, "mlflow.db")
    return f"sqlite:///{path}" if os.path.exists(path) else new_store(path)


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


def killed_then_resumed(d, kill_at):
    """The command killed at `kill_at`, what it left, then `--resume`d."""
    uri = store(d)
    killed = bench_run(["kill-after", kill_at, "--", *ARGS, "--tracking-uri", uri], d, module="tests.integration.faulty")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    client, parent, children = parent_and_children(uri)
    left = {"parent": parent.info.status, "ids": {m: c.info.run_id for m, c in children.items()}}
    for m, c in children.items():
        ck = checkpoint.RunCheckpoints(client, c.info.run_id).load()
        left[m] = (c.info.status, ck and ck.round,
                   sorted(x.step for x in client.get_metric_history(c.info.run_id, "loss/train")))
    resumed = bench_run(["--resume", parent.info.run_id, "--tracking-uri", uri, "--quiet", "--no-report"], d)
    return {"uri": uri, "parent": parent.info.run_id, "left": left, "resumed": resumed}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run ("whole"), and the same command killed then resumed at each of KILLS."""
    base = tmp_path_factory.mktemp("resume")
    whole = bench_run([*ARGS, "--tracking-uri", store(base / "whole")], base / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = {"whole": {"uri": store(base / "whole"), "proc": whole}}
    for name, kill_at in KILLS.items():
        out[name] = killed_then_resumed(base / name, kill_at)
    return out


def test_a_kill_leaves_runs_running_with_what_they_had_logged_and_checkpointed(runs):
    # kill -9 gives no process a chance to end its runs: they stay RUNNING.
    late, early = runs["late"]["left"], runs["early"]["left"]
    assert late["parent"] == early["parent"] == "RUNNING"
    # (status, checkpoint round, rounds logged); checkpoints after rounds 2, 4, 6.
    assert late["fedavg"] == ("FINISHED", 6, [1, 2, 3, 4, 5, 6])
    assert late["fedrep"] == ("RUNNING", 2, [1, 2, 3])
    assert early["fedavg"] == ("RUNNING", None, [1]) and "fedrep" not in early


@pytest.mark.parametrize("name", list(KILLS))
def test_resume_continues_the_same_runs_and_equals_an_uninterrupted_run_bit_for_bit(runs, tmp_path, name):
    resumed = runs[name]["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr == ""  # --quiet: no progress bars, no log lines
    client_a, parent_a, kids_a = parent_and_children(runs["whole"]["uri"])
    client_b, parent_b, kids_b = parent_and_children(runs[name]["uri"])
    # The same parent and child runs (one more where none had started), ended as an uninterrupted
    # invocation ends them.
    assert parent_b.info.run_id == runs[name]["parent"] and parent_b.info.status == "FINISHED"
    assert runs[name]["left"]["ids"].items() <= {m: c.info.run_id for m, c in kids_b.items()}.items()
    assert sorted(kids_b) == ["fedavg", "fedrep"] and {c.info.status for c in kids_b.values()} == {"FINISHED"}
    for method in ("fedavg", "fedrep"):
        a, b = kids_a[method], kids_b[method]
        ha, hb = histories(client_a, a), histories(client_b, b)
        assert ha == hb, method  # every metric, every round, one value per round: none logged twice
        assert all([s for s, _ in h] == [1, 2, 3, 4, 5, 6] for h in hb.values())
        assert a.data.params == b.data.params
        for art in ("ledger.csv", "clients.csv"):
            assert artifact(client_a, a, art, tmp_path / "a" / method) == \
                artifact(client_b, b, art, tmp_path / "b" / method), (method, art)
    # The summary is the uninterrupted run's, but for the wall-clock seconds.
    sa, sb = (json.loads(artifact(c, p, "summary.json", tmp_path / n))
              for c, p, n in ((client_a, parent_a, "sa"), (client_b, parent_b, "sb")))
    assert [{k: v for k, v in r.items() if k != "wall_s"} for r in sa] == \
        [{k: v for k, v in r.items() if k != "wall_s"} for r in sb]
    table = lambda out: [line.rsplit("|", 2)[0] for line in out.splitlines() if line.startswith("|")]  # noqa: E731
    assert table(runs["whole"]["proc"].stdout) == table(resumed.stdout) and len(table(resumed.stdout)) == 4
    # A finished invocation keeps no checkpoints (nothing can resume it; they hold every client state).
    for client, kids in ((client_a, kids_a), (client_b, kids_b)):
        for c in kids.values():
            assert checkpoint.RunCheckpoints(client, c.info.run_id).load() is None
    assert parent_b.data.tags["resumed_by"].startswith("python -m bench.run --resume ")


def test_resume_refuses_in_one_line_with_exit_2(runs):
    uri_a = runs["whole"]["uri"]
    _, parent_a, kids_a = parent_and_children(uri_a)
    cases = [
        (["--resume", "0123456789abcdef", "--tracking-uri", uri_a], "no run '0123456789abcdef'"),
        (["--resume", parent_a.info.run_id, "--tracking-uri", uri_a], "nothing to resume"),
        (["--resume", kids_a["fedavg"].info.run_id, "--tracking-uri", uri_a], "is a child run"),
        (["--resume", parent_a.info.run_id, "--tracking-uri", uri_a, "--rounds", "8"], "--rounds would change"),
        (["--resume", parent_a.info.run_id, "--tracking-uri", uri_a, "--set", "fedrep.head_epochs=3"],
         "--set would change"),
    ]
    from bench import run as bench_run_module

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
    from bench import run as bench_run_module

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert bench_run_module.main(["--checkpoint-every", "-1", "--backend", "serial", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: checkpoint_every must be >= 0 (0: no checkpoints), got -1"]
    assert not (tmp_path / "mlflow.db").exists()  # rejected before anything was recorded


def test_checkpoints_go_through_an_mlflow_server_when_its_artifacts_are_not_local(mlflow_server):
    from mlflow.tracking import MlflowClient

    from tests.unit.test_checkpoint import loop_state

    client = MlflowClient(tracking_uri=mlflow_server[0])
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


def test_resume_refuses_a_run_whose_process_still_runs(tmp_path, capsys):
    import subprocess
    import sys
    import time

    from bench import run as bench_run_module
    from tests.integration.test_cli import ROOT

    uri = store(tmp_path)
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.Popen([sys.executable, "-m", "bench.run", "--methods", "fedrep", "--rounds", "500",
                             "--backend", "serial", "--tracking-uri", uri, "--quiet", "--no-report"], cwd=tmp_path,
                            env={**base, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline, parent = time.time() + 120, None
        while parent is None and time.time() < deadline:  # until its parent run is in the store
            time.sleep(1)
            try:
                _, runs = runs_of(uri)
                parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
            except Exception:  # no database, no experiment, no run yet
                pass
        assert parent is not None and parent.data.tags["bench.pid"] == str(proc.pid)
        capsys.readouterr()  # what this test's own MLflow client logged while polling
        assert bench_run_module.main(["--resume", parent.info.run_id, "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is still RUNNING in process {proc.pid} on this host" in err[0], err
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        finally:
            proc.kill()
