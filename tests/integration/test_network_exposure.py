"""A single-machine run opens no port to the network: while `python -m bench.run --backend ray` runs
(Ray started by the run itself), every process of its Ray session (the driver, GCS, raylet, the
dashboard and runtime-env agents, every actor) listens on a loopback address only.

Read from the kernel (psutil's per-process sockets) many times during the run, from the start of Ray
to the end of the last round, so a port opened for a moment is seen too.
"""
import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from tests.helpers import write_tiny_npz

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.ray


def loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, and IPv4 loopback seen through an IPv6 socket (::ffff:127.0.0.1)."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_loopback_rule():
    assert all(loopback(ip) for ip in ("127.0.0.1", "127.0.1.1", "::1", "::ffff:127.0.0.1"))
    assert not any(loopback(ip) for ip in ("0.0.0.0", "::", "192.0.2.2", "::ffff:10.0.0.1", "fe80::1"))


def listening(root_pid: int) -> dict[tuple[str, str, int], str]:
    """{(process, ip, port): process} of every TCP socket in LISTEN of `root_pid` and its descendants
    (Ray's GCS, raylet and agents are the driver's children, its workers the raylet's)."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    found = {}
    for p in procs:
        try:
            # Ray titles its worker processes ray::CLASS (ray::CLASS.METHOD while in a call).
            name = "driver" if p.pid == root_pid else (p.cmdline()[:1] or [p.name()])[0].rsplit("/", 1)[-1]
            name = name.split(".")[0].strip()
            for c in p.net_connections("inet"):
                if c.status == psutil.CONN_LISTEN:
                    found[(name, c.laddr.ip, c.laddr.port)] = name
        except psutil.Error:  # exited between the listing and the read
            continue
    return found


def test_a_single_machine_run_listens_on_loopback_only(tmp_path):
    npz = write_tiny_npz(tmp_path / "t.npz", clients=6)
    # A temp dir of its own (short: Ray's socket paths must fit 107 bytes) and no $RAY_ADDRESS, so the
    # run starts its own Ray rather than attach to another test's `ray start --head`.
    ray_tmp = tempfile.mkdtemp(prefix="rx", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env.update(PYTHONPATH=ROOT, RAY_TMPDIR=ray_tmp)
    proc = subprocess.Popen([sys.executable, "-m", "bench.run", "--methods", "fedavg", "--rounds", "40",
                             "--dataset", f"npz:{npz}", "--backend", "ray", "--workers", "2", "--quiet",
                             "--no-report", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict = {}
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            seen.update(listening(proc.pid))
            time.sleep(0.1)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, err[-3000:]
    names = {name for name, _, _ in seen}
    # The check saw the whole session: the driver, Ray's own servers, its agents and the actors.
    agents = {"ray::DashboardAgent", "ray::RuntimeEnvAgent"}
    assert {"driver", "gcs_server", "raylet"} | agents <= names, names
    assert any(n.startswith("ray::") and n not in agents | {"ray::IDLE"} for n in names), names  # an actor
    exposed = sorted((name, ip, port) for name, ip, port in seen if not loopback(ip))
    assert exposed == [], exposed
