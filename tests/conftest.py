"""Shared test setup: the repo root on sys.path (also works without `pip install -e .`), and the
fixtures that tests in several folders use."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import pytest  # noqa: E402

RAY_NICENESS = {"RAY_worker_niceness": "0"}
"""Ray starts its worker processes (the actors) at nice 15; on the 2 cores the suite runs on, the
other xdist worker's tests (at nice 0) then leave a Ray test's actors a few percent of a core, and
the Ray tests ran 3-6x slower in the suite than alone (a kill -9 test: 91 s against 15 s). Every Ray
a test starts, directly or through a command, runs its workers at the tests' own priority: set here
for this process and its children, and passed on by the tests that build an environment of their
own. The product keeps Ray's default."""
os.environ.update(RAY_NICENESS)

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""torch's intra-op pool has one thread per core by default: the suite's two xdist workers on 2 cores,
each with the commands and actors it starts, then run several 2-thread pools on 2 cores, and OpenMP's
threads wait on each other for their time slices. Two copies of the real-images adjoint test at once
took 70 s each with the default pool and 21 s with one thread (alone: 18 s). Every process a test
starts gets one thread through these variables (set here, before torch is imported, for this process
and its children; a test building an environment of its own starts from os.environ). Clients already
run single-threaded in the product (SerialBackend and the actors pin `threads`, default 1), so the
numbers under test are the same; the product keeps torch's default for the rest."""
os.environ.update(ONE_THREAD)
if "torch" in sys.modules:  # imported before this file (a plugin): its pool is sized already
    sys.modules["torch"].set_num_threads(1)


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


@pytest.fixture
def guarded(monkeypatch):
    """For tests that call bench/cli.py's `run_guarded` in this process: it installs process-wide
    signal handlers (and swaps sys.stdout while it runs); put pytest's back after, and forget the
    interrupts seen. SIGHUP starts at its default, as in a terminal's session: the suite may itself
    run under `nohup`, whose ignored SIGHUP the guard keeps (and a SIGHUP test would then see nothing)."""
    from bench import cli

    saved = {s: signal.getsignal(s) for s in cli.STOP_SIGNALS}
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    monkeypatch.setattr(cli, "_INTERRUPTS", [])
    yield
    for s, h in saved.items():
        signal.signal(s, h)


class RayHead:
    """`ray start --head --block` in a private RAY_TMPDIR (short: Unix socket paths <= 107 bytes), 2 CPUs,
    every port it would otherwise take by default (dashboard, its agent, Ray Client) chosen free, in
    its own process group; token authentication as `ray start` sets it (~/.ray/auth_token, as the
    harness's own local Ray uses). `address` is its GCS address, `tmpdir` its RAY_TMPDIR.

    A run attaches to it the way it finds a `ray start --head` on its machine: RAY_TMPDIR set, no
    $RAY_ADDRESS (bench/loop/addresses.py: running_instance). Not through $RAY_ADDRESS: Ray turns its
    token authentication on only for an instance it finds itself, so a driver given the address is
    refused (InvalidAuthToken)."""

    def __init__(self):
        self.tmpdir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
        socks = [socket.socket() for _ in range(3)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        dashboard, agent, client = (sock.getsockname()[1] for sock in socks)
        for sock in socks:
            sock.close()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
        env["RAY_TMPDIR"] = self.tmpdir
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        self._log = open(os.path.join(self.tmpdir, "head.log"), "w")
        self._proc = subprocess.Popen(
            [ray, "start", "--head", "--block", "--port=0", "--num-cpus=2", "--include-dashboard=false",
             "--disable-usage-stats", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
             f"--ray-client-server-port={client}"],
            env=env, cwd=self.tmpdir, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        address_file = os.path.join(self.tmpdir, "ray", "ray_current_cluster")
        deadline = time.time() + 120
        while not os.path.exists(address_file):
            if self._proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"`ray start --head` wrote no address; see {self.tmpdir}/head.log")
            time.sleep(0.2)
        with open(address_file) as f:
            self.address = f.read().strip()

    def attach(self, monkeypatch) -> None:
        """This process's runs attach to this Ray (until `monkeypatch` is undone)."""
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        monkeypatch.setenv("RAY_TMPDIR", self.tmpdir)

    def stop(self) -> None:
        """SIGTERM to its process group (`--block` tears the node down), SIGKILL to what is left after
        2 s, then to any process naming its temp dir (Ray starts some in sessions of their own)."""
        from bench.perf.workloads import pids_naming

        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self._proc.pid, sig)
            except OSError:
                pass
            if sig == signal.SIGTERM:
                try:
                    self._proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
        for pid in pids_naming(os.path.join(self.tmpdir, "ray")):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self._log.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head():
    """One running Ray for the session, for the tests that need *a* Ray but do not test starting or
    stopping one, nor the processes of a run's own Ray: they attach to it (`RayHead.attach`, or
    RAY_TMPDIR in a command's environment) instead of starting a Ray each (several seconds of CPU for its GCS, raylet and agents). Only the `ray` group
    asks for it, so it runs on one worker, and never beside another Ray test."""
    head = RayHead()
    try:
        yield head
    finally:
        head.stop()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Groups for `pytest -n 2 --dist loadgroup --no-loadscope-reorder` (`make test`), one worker each,
    in this order: the Ray tests (marked `ray`), one at a time, since two local Rays on two cores
    starve each other's actors; then every other test file, a group of its own (its module fixtures are
    built once, on one worker), in collection order. The long Ray group goes first, so the short ones
    balance the two workers at the end (`--no-loadscope-reorder` keeps this order).

    First among the hooks: xdist's own hook on each worker reads the `xdist_group` marks to put the group
    in the node ids the scheduler groups by, so a mark added after it is ignored (and every test is
    scheduled alone); tests/unit/test_test_groups.py checks this hook, not only the mark."""
    after_ray = {}
    for item in items:
        group = "ray" if item.get_closest_marker("ray") else item.nodeid.split("::")[0]
        after_ray[item] = group != "ray"
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=after_ray.__getitem__)  # stable: the Ray group first, then the files in their order
