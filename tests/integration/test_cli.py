"""`python -m bench.run` as a user runs it (subprocess), read back from MLflow with MlflowClient."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from bench.loop.engine import EVAL_COMPUTE_METRICS, EVAL_METRICS, ROUND_METRICS
from bench.tracking import open_client
from fedeq_bench.methods import METHODS
from tests.helpers import write_tiny_npz

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_run(args, cwd, timeout=300, env=None, module="bench.run", **kw):
    """`python -m bench.run ARGS` in `cwd`; `env` adds variables. MLflow's own variables of whoever
    runs the tests are left out, so each test says where its runs go."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd,
                          env={**base, "PYTHONPATH": ROOT, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, **kw)


def runs_of(uri, experiment="fedeq-bench"):
    client = open_client(uri)  # under the store's schema lock: this test polls a store bench.run is creating
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.ray
def test_every_method_runs_two_rounds_on_ray_and_mlflow_has_every_metric(tmp_path, ray_head):
    """On the session's running Ray (tests/conftest.py: ray_head), which bench.run finds through
    RAY_TMPDIR and attaches to: starting a Ray is other tests' subject (test_signals,
    test_network_exposure)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = bench_run(["--methods", "all", "--rounds", "2", "--workers", "2", "--clients", "10", "--fraction", "0.2",
                      "--frac-unseen", "0.1", "--tracking-uri", uri, "--quiet"], tmp_path,
                     env={"RAY_TMPDIR": ray_head.tmpdir})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    client, runs = runs_of(uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.params["method"] for r in children) == METHODS.names()
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["backend"] == "ray" and child.data.params["workers"] == "2"
        for name in (*ROUND_METRICS, *EVAL_METRICS, *EVAL_COMPUTE_METRICS, "acc/unseen"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, name)]
            assert steps == [1, 2], (child.data.params["method"], name, steps)
        arts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert "ledger.csv" in arts
    # The terminal table names every method, and the parent has the summary artifacts.
    for m in METHODS.names():
        assert f"| {m} " in proc.stdout
    assert {"summary.md", "summary.json"} <= {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert parents[0].data.params["run.rounds"] == "2"
    assert "git_commit" in parents[0].data.params
    # bench.run ends with its own invocation's report, on disk and as artifacts of the parent run.
    pid = parents[0].info.run_id
    out = tmp_path / "reports" / f"fedeq-bench-{pid[:8]}"
    assert f"report: {os.path.join('reports', out.name, 'index.html')} " in proc.stdout
    md = (out / "report.md").read_text()
    for m in METHODS.names():
        assert f"| {m} " in md
    assert {"report/index.html", "report/report.md", "report/figures"} <= {
        a.path for a in client.list_artifacts(pid, "report")}


@pytest.mark.parametrize("args, fragment", [
    (["--methods", "fedq"], "unknown method 'fedq'; choose from " + ", ".join(METHODS.names())),
    (["--set", "fedrep.head_epoch=3"], "unknown key 'fedrep.head_epoch'; fedrep keys:"),
    (["--set", "rounds=many"], "rounds expects int, got 'many'"),
    (["--rounds", "1.5"], "rounds expects int, got '1.5'"),
    (["--dataset", "cifar11"], "unknown dataset 'cifar11'; choose from"),
    (["--model", "resnet9000"], "unknown model 'resnet9000'; choose from"),
    (["--model", "cnn"], "model 'cnn' needs image input"),
    (["--dataset", "npz:/nonexistent/x.npz"], "/nonexistent/x.npz"),
    (["--config", "/nonexistent.toml"], "not found"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["--fraction", "0"], "fraction must be in (0, 1]"),
    (["--devices", "phones"], "--devices 'phones': give a built-in profile set (uniform, mobile-mix) or a .toml file"),
    (["--devices", "/nonexistent/fleet.toml"], "device profile set '/nonexistent/fleet.toml' not found"),
    (["--round-deadline", "-1"], "round_deadline must be > 0, got -1"),
    # Passed the build-only model check, then died in round 1 with an IndexError.
    (["--methods", "fedavg", "--model", "transformer8"],
     "model 'transformer8' cannot take this dataset's samples (shape (60,), dtype torch.float32): IndexError"),
    # Argparse takes the last --tracking-uri: MLflow's client retried this port for minutes, silently.
    (["--tracking-uri", "http://127.0.0.1:9"], "cannot reach the MLflow tracking server at http://127.0.0.1:9 ("),
])
def test_bad_input_is_one_line_exit_2_and_records_nothing(tmp_path, monkeypatch, capfd, guarded, args, fragment):
    """In this process, through bench.run's `main(argv)` and its entry guard (a process's own wiring,
    the handlers and the exit code a shell sees, is tests/integration/test_entry_guard.py's)."""
    from bench import run

    monkeypatch.chdir(tmp_path)
    for k in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(k)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    try:
        code = run.main(["--backend", "serial", "--tracking-uri", uri, "--quiet", *args])
    except SystemExit as e:  # argparse's own refusal (Parser.error): the process's exit code
        code = e.code
    err = capfd.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists()  # rejected before anything was recorded


def in_process(argv, monkeypatch, capfd, cwd, env=None):
    """`bench.run`'s `main(argv)` in this process, in `cwd`, MLflow's variables of whoever runs the tests
    replaced by `env`: (exit code, stdout, stderr). Uses the `guarded` fixture's cleanup."""
    from bench import run

    monkeypatch.chdir(cwd)
    for k in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(k)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    code = run.main(argv)
    out, err = capfd.readouterr()
    return code, out, err


def test_failure_mid_run_marks_runs_failed_and_keeps_rounds(tmp_path, monkeypatch, capfd, guarded):
    """A method that fails in round 2 (a BenchError from its aggregation) ends FAILED; round 1 stays."""
    from fedeq_bench.core.errors import BenchError
    from fedeq_bench.methods.fedavg import FedAvg

    class Flaky(FedAvg):
        def aggregate(self, server, replies, rnd):
            if rnd == 2:
                raise BenchError("flaky: solver diverged (residual nan)")
            return super().aggregate(server, replies, rnd)

    monkeypatch.setitem(METHODS._items, "flaky", Flaky)  # registered for this test only
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    npz = write_tiny_npz(tmp_path / "t.npz")
    code, _, err = in_process(["--methods", "fedavg,flaky", "--rounds", "3", "--dataset", f"npz:{npz}",
                               "--backend", "serial", "--tracking-uri", uri, "--quiet"], monkeypatch, capfd, tmp_path)
    assert code == 2, err
    # One line naming the method and the round, ending with the method's own message (the engine
    # words the place, e.g. `flaky: round 2, server: flaky: solver diverged (residual nan)`).
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: flaky"), lines
    assert re.search(r"\bround 2\b", lines[0]) and lines[0].endswith(": flaky: solver diverged (residual nan)"), lines
    client, runs = runs_of(uri)
    by_name = {r.info.run_name: r for r in runs}
    assert by_name["fedavg seed=0"].info.status == "FINISHED"
    assert by_name["flaky seed=0"].info.status == "FAILED"
    assert by_name["fedavg+flaky on npz:" + npz].info.status == "FAILED"
    steps = [m.step for m in client.get_metric_history(by_name["flaky seed=0"].info.run_id, "bytes/up")]
    assert steps == [1]  # round 1 was logged before the failure and is kept


def test_interrupt_marks_runs_killed_and_keeps_rounds(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "bench.run", "--methods", "fedrep", "--rounds", "500",
                             "--backend", "serial", "--tracking-uri", uri, "--quiet"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until at least one round is in the store
            time.sleep(1)
            if (tmp_path / "mlflow.db").exists():
                try:
                    client, runs = runs_of(uri)
                    child = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
                    if child and client.get_metric_history(child[0].info.run_id, "bytes/up"):
                        break
                except Exception:
                    pass
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    client, runs = runs_of(uri)
    assert {r.info.status for r in runs} == {"KILLED"}
    child = [r for r in runs if "mlflow.parentRunId" in r.data.tags][0]
    assert len(client.get_metric_history(child.info.run_id, "bytes/up")) >= 1


def test_fedeq_divergence_fails_the_run_with_method_round_and_client(tmp_path, monkeypatch, capfd, guarded):
    """lr 1e6 blows the DEQ weights up in round 1: the solver sees NaN/inf and the run ends FAILED."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code, _, err = in_process(["--methods", "fedeq", "--rounds", "2", "--lr", "1e6", "--fraction", "0.1",
                               "--backend", "serial", "--tracking-uri", uri, "--quiet"], monkeypatch, capfd, tmp_path)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: fedeq: round 1, client "), lines
    assert "Traceback" not in err
    _, runs = runs_of(uri)
    assert {r.info.status for r in runs} == {"FAILED"} and len(runs) == 2  # parent + the fedeq child
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags).info.run_id
    assert re.search(rf"; to record it as diverged and run the rest: .*bench\.run --resume {parent} .*--keep-going$",
                     lines[0]), lines[0]


def test_keep_going_records_a_diverged_run_and_finishes_the_others(tmp_path, monkeypatch, capfd, guarded):
    """--keep-going: FeDEQ at lr 1e6 diverges in round 1 of each seed (as above); its runs end FAILED
    with a `diverged` tag, FedAvg's finish, the command exits 0, and the summary and the report name
    the diverged runs outside the means."""
    from bench.report import collect, tables

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code, out, err = in_process(["--methods", "fedeq,fedavg", "--rounds", "2", "--set", "fedeq.lr=1e6", "--seeds", "0,1",
                                 "--fraction", "0.1", "--backend", "serial", "--tracking-uri", uri, "--quiet",
                                 "--keep-going", "--no-report"], monkeypatch, capfd, tmp_path)
    assert code == 0, err
    assert "Traceback" not in err
    assert re.search(r"^fedeq seed 1 diverged \(its run ends FAILED; going on, --keep-going\): fedeq: round 1, client ",
                     err, re.M), err
    client, runs = runs_of(uri)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {(r.data.params["method"], r.data.params["seed"]): r for r in runs if r is not parent}
    assert parent.info.status == "FINISHED" and parent.data.tags["diverged"] == "fedeq seed 0; fedeq seed 1"
    for seed in ("0", "1"):
        assert children[("fedavg", seed)].info.status == "FINISHED"
        bad = children[("fedeq", seed)]
        assert bad.info.status == "FAILED" and bad.data.tags["diverged"].startswith("fedeq: round 1, client ")
    # The table has FedAvg's row over 2 seeds and no FeDEQ row; the diverged runs are listed under it.
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    assert rows == ["method", "fedavg"], out
    assert "diverged (runs FAILED, in no mean):\n- fedeq seed 0: fedeq: round 1, client " in out
    (group,) = collect.collect(uri, "fedeq-bench").groups
    notes = tables.seed_notes(group)
    assert len(notes) == 2 and notes[0].startswith("fedeq: no FINISHED run for seed 0 (FAILED, diverged: fedeq: round 1, client ")


def test_unreachable_ray_address_is_one_line_and_records_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = bench_run(["--methods", "fedavg", "--rounds", "1", "--address", "127.0.0.1:1", "--tracking-uri", uri,
                      "--quiet"], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach a Ray cluster at '127.0.0.1:1'"), lines
    assert not (tmp_path / "mlflow.db").exists()


def test_mlflow_env_vars_say_where_runs_go_and_a_flag_beats_them(tmp_path, monkeypatch, capfd, guarded):
    """MLFLOW_TRACKING_URI is honoured without --tracking-uri; --experiment beats MLFLOW_EXPERIMENT_NAME."""
    npz = write_tiny_npz(tmp_path / "t.npz")
    env_uri = f"sqlite:///{tmp_path}/from-env.db"
    code, out, err = in_process(["--methods", "fedavg", "--rounds", "1", "--dataset", f"npz:{npz}", "--backend",
                                 "serial", "--experiment", "from-flag", "--quiet"], monkeypatch, capfd, tmp_path,
                                env={"MLFLOW_TRACKING_URI": env_uri, "MLFLOW_EXPERIMENT_NAME": "from-env"})
    assert code == 0, err[-3000:]
    assert f"recorded in {env_uri} (experiment 'from-flag'" in out
    assert not (tmp_path / "mlflow.db").exists()  # not the default store
    client = MlflowClient(tracking_uri=env_uri)
    assert client.get_experiment_by_name("from-env") is None
    _, runs = runs_of(env_uri, "from-flag")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}  # parent + the fedavg child
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags][0]
    assert parent.data.params["run.tracking_uri"] == env_uri


def test_help_shows_each_run_field_docstring(tmp_path):
    from bench.config import RunConfig, field_docs

    # A wide terminal, so argparse does not wrap a docstring (it may break at a hyphen).
    proc = bench_run(["--help"], tmp_path, timeout=60, env={"COLUMNS": "1000"})
    assert proc.returncode == 0 and proc.stderr == ""
    text = " ".join(proc.stdout.split())
    for name, doc in field_docs(RunConfig).items():
        assert "--" + name.replace("_", "-") in text and doc in text, name
