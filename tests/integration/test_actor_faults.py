"""Actor faults on a real Ray: an actor killed mid-round (`ray.kill`, kill -9 of its process) is
replaced and its clients' work redone, and the run's metrics and ledger equal the Serial run's bit
for bit; a client whose update kills its actor every time fails the run with one line after
faults.MAX_ACTOR_RETRIES redos; a worker that runs another fedeq-bench than the driver is refused."""
import itertools
import os
import signal
import subprocess
import sys

import pytest
import torch

from bench.experiment import load_dataset
from bench.loop import engine, faults
from bench.loop.backends import WORK_OF, Kind, SerialBackend, Worker
from bench.loop.ray_backend import RayBackend
from fedeq_bench.core.errors import BenchError
from fedeq_bench.methods.fedavg import FedAvg
from tests.helpers import tiny_config, write_tiny_npz

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Wall-clock and process-size metrics are measurements of the machine, not of the computation.
NONDETERMINISTIC = {"time/round_s", "mem/peak_rss_bytes"}

# FedRep keeps a personal head per client (state the engine owns): a redo in round 2 must start from
# the head round 1 left, not from scratch, to give the same bits.
METHOD = "fedrep"

pytestmark = pytest.mark.ray

# Other work may commit to this checkout while these tests run, which changes its git commit between
# the driver's start and a (replacement) worker's. So every process here reports this version from
# $FEDEQ_BENCH_VERSION; test_every_worker_reports_the_git_commit checks the git path on its own.
VERSION = "0.1.0+actor-fault-tests"


class OomFedAvg(FedAvg):
    """FedAvg whose local update kills its own process for client 1 in round 2, as the kernel's
    out-of-memory killer would. bench.run gets it as `oom` from OOM_PLUGIN."""

    def init_client(self, cid, server, rng):
        return {"cid": torch.tensor(cid)}

    def broadcast(self, server, cid, rnd):
        return {**server, "round": torch.tensor(rnd)}

    def local_update(self, down, state, data, rng):
        if int(down["round"]) == 2 and int(state["cid"]) == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().local_update({k: v for k, v in down.items() if k != "round"}, state, data, rng)

    def evaluate(self, down, state, data, rng):
        return super().evaluate({k: v for k, v in down.items() if k != "round"}, state, data, rng)


class OomEvalFedAvg(OomFedAvg):
    """The same kill in its evaluation instead (client 1, round 2); bench.run gets it as `oom_eval`."""

    def local_update(self, down, state, data, rng):
        return FedAvg.local_update(self, {k: v for k, v in down.items() if k != "round"}, state, data, rng)

    def evaluate(self, down, state, data, rng):
        if int(down["round"]) == 2 and int(state["cid"]) == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().evaluate(down, state, data, rng)


# bench.run's driver and its Ray workers import it via sitecustomize; Ray's own agents (also Python,
# and started with the same environment) skip it, which keeps torch out of them and the test short.
OOM_PLUGIN = """
import sys
if {'oom', 'oom_eval'} & set(sys.argv) or sys.argv[0].endswith('default_worker.py'):
    from fedeq_bench.methods.base import register_method
    from tests.integration.test_actor_faults import OomEvalFedAvg, OomFedAvg
    Oom = register_method('oom')(type('Oom', (OomFedAvg,), {}))
    OomEval = register_method('oom_eval')(type('OomEval', (OomEvalFedAvg,), {}))
"""


@pytest.mark.parametrize("method, kind", [("oom", Kind.TRAIN), ("oom_eval", Kind.EVALUATE)])
def test_a_client_that_keeps_killing_its_actor_fails_the_run_with_one_line(tmp_path, method, kind):
    """Client 1 shares round 2's first chunk with client 0 (6 clients in 4 chunks: [0, 1] [2] [3] [4, 5]);
    that chunk is redone one client per call, client 0 alone succeeds, client 1 alone kills its actor
    MAX_ACTOR_RETRIES more times: 1 + 3 = 4 deaths, then one line naming method, round and client,
    whether the kill is in its local update or its evaluation."""
    # bench.run starts (and stops) a Ray of its own: its workers must import OOM_PLUGIN.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    npz = write_tiny_npz(tmp_path / "t.npz", clients=6)
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "sitecustomize.py").write_text(OOM_PLUGIN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = f"{tmp_path / 'plug'}:{ROOT}"
    env[faults.VERSION_ENV] = VERSION
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--methods", method, "--rounds", "3",
                           "--dataset", f"npz:{npz}", "--backend", "ray", "--workers", "2",
                           "--tracking-uri", uri, "--quiet", "--no-report"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    deaths = 1 + faults.MAX_ACTOR_RETRIES
    assert proc.stderr.strip().splitlines() == [
        f"error: {method}: round 2, {engine.client_label(1, kind)}: its {WORK_OF[kind]} killed its Ray actor {deaths} "
        "times (out of memory?)"]  # client 1 or `client 1 (evaluation)`; its local update or its evaluation
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("fedeq-bench").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}  # parent + the method's child
    child = [r for r in runs if "mlflow.parentRunId" in r.data.tags][0]
    assert [m.step for m in client.get_metric_history(child.info.run_id, "bytes/up")] == [1]


def actor_titles(root_pid: int) -> dict[int, str]:
    """{pid: title} of the actor processes under `root_pid`: Ray titles them ray::CLASS, and
    ray::CLASS.METHOD while they run a call."""
    import psutil

    try:
        procs = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    titles = {}
    for p in procs:
        try:
            title = (p.cmdline()[:1] or [""])[0].split()
        except psutil.Error:
            continue
        if title and title[0].startswith("ray::") and title[0].split(".")[0] not in (
                "ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent"):
            titles[p.pid] = title[0]
    return titles


@pytest.mark.parametrize("when", ["starting", "mid-call"])
def test_kill_9_of_an_actor_process_is_survived(tmp_path, when):
    """What a user does (or the kernel's OOM killer): SIGKILL to one of bench.run's two actor processes,
    as soon as both exist (`starting`: before they answer their first call, while they import torch)
    or once one runs a chunk of clients (`mid-call`). A replacement starts and the run ends FINISHED
    with every round; both ended with a 99-line ActorDiedError before. That the redo gives the
    undisturbed numbers is the in-process tests' part."""
    import time

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    npz = write_tiny_npz(tmp_path / "t.npz", clients=6)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=ROOT, **{faults.VERSION_ENV: VERSION})
    rounds = 40
    proc = subprocess.Popen([sys.executable, "-m", "bench.run", "--methods", "fedavg", "--rounds", str(rounds),
                             "--dataset", f"npz:{npz}", "--backend", "ray", "--workers", "2",
                             "--tracking-uri", uri, "--quiet", "--no-report"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, title, later = None, None, set()
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            titles = actor_titles(proc.pid)
            if killed is None:
                ready = [p for p, t in titles.items() if t.endswith(".run_chunk")] if when == "mid-call" else (
                    sorted(titles) if len(titles) == 2 else [])
                if ready:
                    killed, title = ready[0], titles[ready[0]]
                    os.kill(killed, signal.SIGKILL)
            else:
                later |= set(titles) - {killed}
            time.sleep(0.05)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "no actor process seen"
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "ActorDiedError" not in err, err[-3000:]
    assert len(later) >= 2, (title, later)  # the survivor and the replacement
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("fedeq-bench").experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 2
    child = [r for r in runs if "mlflow.parentRunId" in r.data.tags][0]
    assert [m.step for m in client.get_metric_history(child.info.run_id, "acc/mean")] == list(range(1, rounds + 1))


@pytest.fixture(scope="module")
def ray_session(ray_head):
    """This process attached to the session's running Ray (tests/conftest.py: ray_head, 2 CPUs) for
    the in-process tests, its workers and this driver reporting VERSION; each test makes (and closes)
    its own 2-actor pool, so the actors killed here are this module's own."""
    import ray

    mp = pytest.MonkeyPatch()
    mp.setenv(faults.VERSION_ENV, VERSION)
    ray_head.attach(mp)
    try:
        ray.init(address="auto", include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore", faults.VERSION_ENV: VERSION}})
        yield ray
        ray.shutdown()
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """6 clients, 2 rounds, and the Serial run every disturbed Ray run must equal."""
    npz = write_tiny_npz(tmp_path_factory.mktemp("d") / "tiny.npz", clients=6)
    cfg = tiny_config(npz, methods=METHOD, rounds=2)
    ds = load_dataset(cfg, 0)
    return npz, cfg, ds, engine.run_method(cfg, METHOD, 0, ds, SerialBackend())


def arm(backend, at: int, kill) -> list:
    """Call `kill(actor)` right after the `at`-th chunk (counted over the whole run) goes to `actor`.
    Returns the list that then holds the Kind of the call that chunk belonged to."""
    count, killed_in = itertools.count(1), []

    def on_submit(actor, kind):  # RayBackend's fault-injection callable
        if next(count) == at:
            killed_in.append(kind)
            kill(actor)

    backend.on_submit = on_submit
    return killed_in


def assert_same_run(a, b):
    assert len(a.history) == len(b.history) == 2
    for x, y in zip(a.history, b.history, strict=True):
        assert {k: v for k, v in x.items() if k not in NONDETERMINISTIC} == \
               {k: v for k, v in y.items() if k not in NONDETERMINISTIC}  # exact float equality
    assert a.ledger.entries == b.ledger.entries


# 6 clients on 2 actors: 4 chunks per call. Chunks 1-4 are round 1's updates, 5-8 its evaluation,
# 9-12 round 2's updates: the 10th goes to an actor mid-round 2, with round 1's state in the jobs;
# the 6th to one evaluating round 1 (evaluation's jobs carry the clients' states too).
@pytest.mark.parametrize("how, at", [("ray.kill", 10), ("kill -9", 10), ("kill -9", 6)],
                         ids=["ray.kill-update", "kill-9-update", "kill-9-evaluation"])
def test_an_actor_killed_mid_round_is_replaced_and_the_run_is_bit_identical(how, at, ray_session, setup):
    ray = ray_session
    _, cfg, ds, serial = setup
    backend = RayBackend(workers=2)
    try:
        pid_of = {a: ray.get(a.hello.remote())["pid"] for a in backend.actors}
        killed = []

        def kill(actor):
            killed.append(actor)
            if how == "ray.kill":
                ray.kill(actor)
            else:
                os.kill(pid_of[actor], signal.SIGKILL)

        killed_in = arm(backend, at, kill)
        started = len(backend._spawned)
        result = engine.run_method(cfg, METHOD, 0, ds, backend)
        assert killed_in == [Kind.EVALUATE if at == 6 else Kind.TRAIN]
        assert len(killed) == 1 and killed[0] not in backend.actors
        assert len(backend._spawned) == started + 1 and len(backend.actors) == 2  # one replacement
        new = [a for a in backend.actors if a not in pid_of][0]
        assert ray.get(new.hello.remote())["pid"] not in pid_of.values()
        assert_same_run(serial, result)
    finally:
        backend.close()


def test_every_worker_reports_the_git_commit(ray_session, monkeypatch):
    """The normal path: a worker of this checkout (not told a version) reports its git commit, which
    is what the driver reports; RayBackend's construction in the other tests is the equal-version path."""
    from bench.tracking import git_commit

    monkeypatch.delenv(faults.VERSION_ENV)
    unset = {"env_vars": {faults.VERSION_ENV: ""}}  # empty: not set, for project_version
    actor = ray_session.remote(Worker).options(num_cpus=1, runtime_env=unset).remote(1, None)
    try:
        report = ray_session.get(actor.hello.remote())
    finally:
        ray_session.kill(actor)
    assert report["version"] == faults.project_version() == git_commit() != "unknown"
    assert report["node"] == ray_session.util.get_node_ip_address() and report["pid"] != os.getpid()


def test_a_driver_of_another_version_is_refused_with_one_line(ray_session, monkeypatch):
    """The workers report VERSION; a driver that says it runs 0.0.1 is refused, and its actors go."""
    monkeypatch.setenv(faults.VERSION_ENV, "0.0.1")  # this process only: Ray's workers have VERSION
    with pytest.raises(BenchError) as e:
        RayBackend(workers=2)
    node = ray_session.util.get_node_ip_address()
    assert str(e.value) == (f"Ray worker on node {node} runs fedeq-bench {VERSION}, the driver 0.0.1; "
                            "install the same commit on every node")


def test_a_commit_between_the_drivers_report_and_a_workers_is_no_mismatch(ray_session, monkeypatch):
    """The driver read its version before a commit, the workers after: both are asked again, agree,
    and the pool starts."""
    answers = iter(["0.1.0+before-a-commit"])
    monkeypatch.setattr(faults, "project_version", lambda: next(answers, VERSION))  # the driver's only
    backend = RayBackend(workers=2)
    backend.close()
    assert backend._version == VERSION and next(answers, None) is None


def test_a_replacement_actor_of_another_version_fails_the_run(ray_session, setup):
    """A replacement that lands on a stale node (here: an actor created with $FEDEQ_BENCH_VERSION set)
    stops the run with the version line rather than training with other code."""
    ray = ray_session
    _, cfg, ds, _ = setup
    backend = RayBackend(workers=2)
    try:
        backend._pool.actor_cls = ray.remote(Worker).options(  # what a replacement is started from
            num_cpus=1, runtime_env={"env_vars": {faults.VERSION_ENV: "0.0.1-stale"}})
        arm(backend, 2, ray.kill)
        with pytest.raises(BenchError) as e:
            engine.run_method(cfg, METHOD, 0, ds, backend)
    finally:
        backend.close()
    assert str(e.value) == (f"Ray worker on node {ray.util.get_node_ip_address()} runs fedeq-bench 0.0.1-stale, "
                            f"the driver {VERSION}; install the same commit on every node")


class DiesAtStart:
    """An actor whose process dies in its first call while `marker` does not exist yet (it creates
    it), or in every first call when `always`: an actor killed while it starts."""

    def __init__(self, marker: str, always: bool):
        self.marker, self.always = marker, always

    def hello(self) -> dict:
        if self.always or not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return {"pid": os.getpid()}


@pytest.mark.parametrize("always", [False, True])
def test_an_actor_killed_while_the_pool_starts_is_replaced_or_named(ray_session, tmp_path, always):
    """faults.greet, what bench/loop/actor.py's start_pool waits with: one death at a place is replaced;
    1 + MAX_ACTOR_RETRIES deaths at the same place end the start with one line."""
    ray = ray_session
    cls = ray.remote(DiesAtStart).options(num_cpus=1)
    spawned = []

    def spawn():
        spawned.append(cls.remote(str(tmp_path / "started"), always))
        return spawned[-1]

    first = spawn()
    if not always:
        actors, reports = faults.greet([first], spawn)
        assert len(spawned) == 2 and actors == [spawned[1]]                     # one replacement, in place
        assert reports[0]["pid"] == ray.get(actors[0].hello.remote())["pid"]
        ray.kill(actors[0])
        return
    with pytest.raises(BenchError) as e:
        faults.greet([first], spawn)
    deaths = 1 + faults.MAX_ACTOR_RETRIES
    assert str(e.value) == (f"a Ray actor died {deaths} times before it could start (killed, or out of memory "
                            "while importing torch?); see the worker logs (`ray logs`)")
    assert len(spawned) == deaths
