"""A real Ray cluster of two nodes on the machine running the tests, started the way a user starts
one (`ray start --head` with its dashboard and Ray Client server, and `ray start --address` for a
worker node), then driven from outside it the two ways the README shows:

- Ray Client: `python -m bench.run --address ray://127.0.0.1:PORT` from a process that is not part of
  the cluster;
- the job API: `ray job submit --address http://127.0.0.1:DASHBOARD -- python -m bench.run --address
  auto ...` (and `bench.sweep --n-jobs 2`), whose driver runs on the head; `ray job logs` shows it.

Each node has one CPU, so a pool of 1-CPU actors has one actor on each node and `--cpus-per-client
0.5` two on each: the test reads from Ray's state API on which node every actor of a run lived. The
numbers recorded in MLflow equal a `--backend serial` run's bit for bit.

Token authentication is on, as `ray start` turns it on by default: every process (nodes, bench.run,
the `ray job` commands) gets RAY_AUTH_MODE=token and the cluster's token (here $RAY_AUTH_TOKEN, a
private one, so ~/.ray/auth_token is neither needed nor written). The cluster has its own RAY_TMPDIR
and ports, and teardown ends exactly its processes (never `ray stop`, which stops every Ray instance
of this user on the machine).
"""
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from bench.perf.workloads import pids_naming
from tests.conftest import RAY_NICENESS
from tests.integration.ray_extras import need_ray_extras

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
RAY = os.path.join(BIN, "ray")
# Wall-clock and process-size metrics are measurements of the machine, not of the computation.
NONDETERMINISTIC = {"time/round_s", "mem/peak_rss_bytes"}
RUN = ["--methods", "fedavg,fedrep", "--dataset", "synthetic", "--clients", "6", "--rounds", "2", "--no-report"]
SUMMARY_HEADER = "| method | model | acc/mean |"
# Ray Client's proxy's own failures to start a server for a connection (bench/loop/cluster.py, which
# retries once itself): the command is run once more if it still ends with one of them.
from bench.loop.cluster import CLIENT_SERVER_RACE  # noqa: E402


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalCluster:
    """`ray start --head --block` and one `ray start --address --block` worker node, each in its own
    process group, sharing a private RAY_TMPDIR; 1 CPU each. `start()` them, `stop()` them (also after
    a failed start)."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Unix socket paths <= 107 bytes
        self.cwd = os.path.join(self.tmp, "head")  # the head's working directory, and so its jobs'
        os.makedirs(self.cwd)
        self.client_port, self.dashboard_port, *self.agent_ports = free_ports(4)  # agents: head, worker
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        self.env = {**base, **RAY_NICENESS, "RAY_TMPDIR": self.tmp, "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    # As ray_cluster.yaml starts Ray: this venv first on PATH, so a job's `python` is its.
                    "PATH": f"{BIN}:{base.get('PATH', '')}"}
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        # Every port a second Ray instance on the same machine would otherwise share with this one is
        # chosen here: the dashboard agent's HTTP port is fixed (52365) by default, and the job API
        # answers "No available agent to submit job" when another instance holds it.
        self._start([RAY, "start", "--head", "--block", "--port=0", "--num-cpus=1", "--disable-usage-stats",
                     "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}", f"--dashboard-agent-listen-port={self.agent_ports[0]}",
                     f"--ray-client-server-port={self.client_port}"])
        address_file = os.path.join(self.tmp, "ray", "ray_current_cluster")
        self._wait(lambda: os.path.exists(address_file), "`ray start --head` wrote no address")
        with open(address_file) as f:
            self.gcs = f.read().strip()
        self._start([RAY, "start", f"--address={self.gcs}", "--block", "--num-cpus=1", "--disable-usage-stats",
                     f"--dashboard-agent-listen-port={self.agent_ports[1]}"])
        self._wait(lambda: len(self.nodes(starting=True)) == 2, "the worker node did not join")

    def _start(self, cmd):
        with open(os.path.join(self.tmp, f"node{len(self.procs)}.log"), "w") as log:
            self.procs.append(subprocess.Popen(cmd, env=self.env, cwd=self.cwd, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True))

    def _wait(self, ready, what: str, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while not ready():
            if time.time() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"{what}; logs in {self.tmp}")
            time.sleep(0.5)

    def cli(self, *args, timeout: float = 300) -> subprocess.CompletedProcess:
        """`ray ARGS` against this cluster's dashboard (job and state API), as its user types it."""
        return subprocess.run([RAY, *args], env=self.env, cwd=self.tmp, capture_output=True, text=True,
                              timeout=timeout)

    def state(self, what: str, *filters: str, starting: bool = False) -> list[dict]:
        """`ray list WHAT` from Ray's state API; `starting`: [] while the dashboard does not answer yet."""
        proc = self.cli("list", what, "--address", self.dashboard, "--detail", "--format", "json", "--limit",
                        "10000", "--timeout", "120", *[x for f in filters for x in ("--filter", f)], timeout=180)
        if starting and proc.returncode != 0:
            return []
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        # None yet is not JSON: "No resource in the cluster".
        return json.loads(proc.stdout) if proc.stdout.startswith("[") else []

    def nodes(self, starting: bool = False) -> list[str]:
        return [n["node_id"] for n in self.state("nodes", "state=ALIVE", starting=starting)]

    def worker_actors(self) -> dict[str, str]:
        """Every edge-node actor this cluster ever ran (dead ones too): actor id -> node id. Nothing but
        these tests uses this cluster, so that is every actor but Ray's own job supervisors (whatever
        name bench/loop/backends.py gives its actor class)."""
        return {a["actor_id"]: a["node_id"] for a in self.state("actors", "class_name!=JobSupervisor")}

    def submit(self, sid: str, *entrypoint: str) -> subprocess.CompletedProcess:
        """`ray job submit` of `entrypoint`, waiting for the job to end (the CLI tails its logs)."""
        return self.cli("job", "submit", "--address", self.dashboard, "--submission-id", sid, "--", *entrypoint)

    def stop(self) -> None:
        """SIGTERM to each node's process group (`--block` tears its node down), SIGKILL to what is
        left of it after 5 s (a `--block` process here often outlived its node's teardown), then to any
        process whose command line names this cluster's temp dir (Ray starts some of a node's
        processes in sessions of their own)."""
        for p in self.procs:
            _signal_group(p, signal.SIGTERM)
        deadline = time.time() + 5
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(p, signal.SIGKILL)
        for pid in pids_naming(os.path.join(self.tmp, "ray")):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        subprocess.run(["rm", "-rf", self.tmp], check=False)


def _signal_group(p: subprocess.Popen, sig) -> None:
    try:
        os.killpg(p.pid, sig)
    except OSError:
        pass


@pytest.fixture(scope="module")
def cluster():
    need_ray_extras(client=True, jobs=True)
    c = LocalCluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


def finals(uri: str, runs: int = 2) -> tuple[dict, set]:
    """{method: final metrics} of the child runs in `uri` (every run FINISHED), and their `workers`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.search_runs([client.get_experiment_by_name("fedeq-bench").experiment_id])
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    assert {r.info.status for r in found} == {"FINISHED"} and len(children) == runs
    return ({r.data.params["method"]: {k: v for k, v in r.data.metrics.items() if k not in NONDETERMINISTIC}
             for r in children}, {r.data.params["workers"] for r in children})


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """What `--backend serial` records for RUN on the machine running the tests: the numbers every
    cluster run must equal."""
    d = tmp_path_factory.mktemp("serial")
    uri = f"sqlite:///{d}/serial.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    proc = subprocess.run([sys.executable, "-m", "bench.run", *RUN, "--quiet", "--backend", "serial",
                           "--tracking-uri", uri], cwd=d, env={**env, "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    numbers, workers = finals(uri)
    assert workers == {"1"} and numbers["fedrep"]["acc/mean"] > 0
    return numbers


def test_bench_run_through_ray_client_equals_the_serial_run(cluster, serial, tmp_path):
    """`bench.run --address ray://...` from outside the cluster: --cpus-per-client 0.5 sizes the pool
    over both nodes (1 CPU / 0.5 = 2 actors on each), and MLflow holds the serial run's numbers."""
    uri = f"sqlite:///{tmp_path}/client.db"
    before = cluster.worker_actors()
    cmd = [sys.executable, "-m", "bench.run", *RUN, "--quiet", "--address", f"ray://127.0.0.1:{cluster.client_port}",
           "--cpus-per-client", "0.5", "--tracking-uri", uri]
    env = {**cluster.env, "PYTHONPATH": ROOT}
    env.pop("RAY_TMPDIR")  # a machine outside the cluster: nothing of it but the address and the token
    for _ in range(2):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0 or not any(m in proc.stderr for m in CLIENT_SERVER_RACE):
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert SUMMARY_HEADER in proc.stdout  # the summary table reaches the client's terminal
    numbers, workers = finals(uri)
    assert workers == {"4"}
    assert numbers == serial  # exact, not approx
    # Both methods ran on the same 4 actors, two on each node.
    nodes = [node for actor, node in cluster.worker_actors().items() if actor not in before]
    assert sorted(nodes.count(n) for n in set(nodes)) == [2, 2]


def test_ray_job_submit_runs_bench_run_on_the_cluster(cluster, serial, tmp_path):
    """The README's job flow: the job succeeds, its runs are in the --tracking-uri store with the serial
    run's numbers, its actors were on both nodes, and `ray job logs` shows the summary table."""
    uri = f"sqlite:///{tmp_path}/job.db"  # absolute: the job's driver runs in the head's directory
    before = cluster.worker_actors()
    proc = cluster.submit("bench-run", "python", "-m", "bench.run", *RUN, "--address", "auto", "--tracking-uri", uri)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "Job 'bench-run' succeeded" in proc.stdout + proc.stderr
    numbers, workers = finals(uri)
    assert workers == {"2"}  # one 1-CPU actor on each node
    assert numbers == serial
    assert {n for a, n in cluster.worker_actors().items() if a not in before} == set(cluster.nodes())
    logs = cluster.cli("job", "logs", "--address", cluster.dashboard, "bench-run")
    assert logs.returncode == 0, logs.stderr[-3000:]
    # The table's rows, wherever they are: the job's log interleaves stdout with tqdm's stderr.
    assert SUMMARY_HEADER in logs.stdout
    assert all(re.search(rf"\| {m} +\| mlp +\| 0\.\d{{4}} ", logs.stdout) for m in ("fedavg", "fedrep")), logs.stdout
    assert f"recorded in {uri}" in logs.stdout
    # With a SQLite URI MLflow keeps artifacts in ./mlruns of the driver's directory: the head's.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("fedeq-bench").experiment_id])[0]
    assert run.info.artifact_uri.startswith(os.path.join(cluster.cwd, "mlruns"))


def test_ray_job_submit_runs_a_parallel_sweep(cluster, tmp_path):
    """`bench.sweep --n-jobs 2 --address auto` as a job: two trials at once, one actor (node) each; the
    study, the MLflow runs and the tuned preset land where the absolute paths say."""
    import optuna

    uri, storage, tuned = f"sqlite:///{tmp_path}/sweep.db", f"sqlite:///{tmp_path}/optuna.db", tmp_path / "tuned.toml"
    before = cluster.worker_actors()
    proc = cluster.submit("sweep", "python", "-m", "bench.sweep", "--method", "fedavg", "--trials", "2",
                          "--n-jobs", "2", "--dataset", "synthetic", "--clients", "6", "--rounds", "2",
                          "--address", "auto", "--tracking-uri", uri, "--storage", storage, "--tuned-out", str(tuned))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Job 'sweep' succeeded" in out, out[-3000:]
    assert "fedavg: study 'fedavg-synthetic', 2 trials" in out
    study = optuna.load_study(study_name="fedavg-synthetic", storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2 and all(0 <= t.value <= 1 for t in done)
    assert tuned.exists() and "fedavg" in tuned.read_text()
    assert {n for a, n in cluster.worker_actors().items() if a not in before} == set(cluster.nodes())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("fedeq-bench").experiment_id])
    assert runs and {r.info.status for r in runs} == {"FINISHED"}


def test_a_bad_job_fails_with_one_line_and_records_nothing(cluster, tmp_path):
    """Bad input in a job: exit 2 (the job FAILED, `ray job status` says so), one `error:` line in its
    logs, no traceback, no store created."""
    db = tmp_path / "bad.db"
    proc = cluster.submit("bad-input", "python", "-m", "bench.run", "--methods", "fedq", "--address", "auto",
                          "--tracking-uri", f"sqlite:///{db}")
    assert proc.returncode != 0 and "Job 'bad-input' failed" in proc.stdout + proc.stderr
    status = cluster.cli("job", "status", "--address", cluster.dashboard, "bad-input")
    assert "failed with exit code 2" in status.stdout + status.stderr
    logs = cluster.cli("job", "logs", "--address", cluster.dashboard, "bad-input").stdout
    errors = [line for line in logs.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: unknown method 'fedq'; choose from apfl, ditto, fedavg")
    assert "Traceback" not in logs
    assert not db.exists()
