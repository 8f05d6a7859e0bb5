"""The one place the harness reaches into Ray's private internals: binding a local Ray to 127.0.0.1.

A Ray that `bench.run` starts itself (no --address) must open no port to the network: a security
property, kept whatever it costs (tests/integration/test_network_exposure.py reads the listening
sockets of every process of such a run). Ray has no public switch for it: `ray.init(
_node_ip_address="127.0.0.1")` alone is replaced by the machine's routable address, and the servers
listen on every interface. Ray's single-machine mode does it, and is read from the environment
variable below when `ray` is imported, into the private constant `ray._private.ray_constants.
ENABLE_RAY_CLUSTER`. Setting the variable alone is not enough in a process that imported Ray before
(a notebook, a test, a sweep that already joined a cluster), so both are set for the start and put
back after. tests/unit/test_cluster.py fails loudly when Ray moves or renames the constant; the
pyproject pins the Ray versions this was checked on.
"""
from __future__ import annotations

import contextlib
import os

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch for a single-machine Ray (its default on macOS and Windows): with it off, Ray takes
127.0.0.1 as the node's address and its GCS, raylet, agents, workers and driver listen there only."""


@contextlib.contextmanager
def loopback_only():
    """Within: a Ray started by ray.init binds every port of its processes to 127.0.0.1.

    ray.init(_node_ip_address="127.0.0.1") alone does not: Ray replaces a loopback node address by
    the machine's routable one (services.resolve_ip_for_localhost) unless single-machine mode is on,
    and its servers listen on all interfaces unless the node address is 127.0.0.1 (GcsServer,
    NodeManager, ObjectManager, CoreWorker: `listen_to_localhost_only`; the dashboard agent likewise).
    The constant is read at ray's import, so it is set on the imported module too; the environment
    variable carries the same setting to the processes this start spawns. Both are put back after:
    a later ray.init in this process (a cluster) must announce the routable address again.
    """
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = saved_env
