"""ray_cluster.yaml (cloud) and ray_cluster.local.yaml (on-prem over SSH) are valid Ray cluster-launcher
files (Ray's own preparation and schema, checked offline) that install this project and its pins."""
import os
import re
import tomllib

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(name):
    with open(os.path.join(ROOT, name)) as f:
        return yaml.safe_load(f)


def torch_pin() -> str:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return next(d for d in deps if d.startswith("torch=="))


@pytest.mark.parametrize("name", ["ray_cluster.yaml", "ray_cluster.local.yaml"])
def test_cluster_files_pass_rays_schema_and_install_the_project(name):
    cfg = load(name)
    prepared = prepare_config(cfg)  # the local provider's rules too (head_ip, worker_ips, no node types)
    validate_config(prepared)       # raises on an unknown key or a wrong type
    assert prepared["head_node_type"] in prepared["available_node_types"]
    setup = " ".join(cfg["setup_commands"])
    assert torch_pin() in setup and "-e ." in setup                            # pyproject's pin, this checkout
    # Ray on the nodes is the Ray of the machine that launches (and drives) the cluster.
    import ray

    assert re.search(rf'"ray\[default\]=={re.escape(ray.__version__)}"', setup), setup
    # The checkout, and Ray's auth token (token authentication is on: a node without it cannot join,
    # as a `ray up ray_cluster.local.yaml` run showed).
    assert cfg["file_mounts"] == {"~/fedeq-bench": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert all("RAY_AUTH_MODE=token" in c for c in cfg[key] if "ray start" in c)
    assert any("mlflow server" in c and "--backend-store-uri sqlite:///" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --head --port=6379" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])


def test_the_local_file_names_its_machines():
    cfg = load("ray_cluster.local.yaml")
    provider, auth = cfg["provider"], cfg["auth"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]
    assert auth["ssh_user"] and auth["ssh_private_key"]
    # Ray's local provider keeps every listed worker: min = max = the number of worker IPs.
    node_type = prepare_config(cfg)["available_node_types"]["local.cluster.node"]
    assert node_type["min_workers"] == node_type["max_workers"] == len(provider["worker_ips"])


@pytest.mark.parametrize("name", ["ray_cluster.yaml", "ray_cluster.local.yaml"])
def test_the_flow_in_the_comments_submits_jobs_with_token_auth(name):
    """`ray job submit` (and `ray job logs`) against a cluster with Ray's token authentication fail with
    an AuthenticationError unless RAY_AUTH_MODE=token is set where they run (seen against a real
    `ray start --head`: tests/integration/test_ray_client_and_jobs.py runs the flow)."""
    with open(os.path.join(ROOT, name)) as f:
        flow = [line for line in f if line.startswith("#")]
    text = "".join(flow)
    assert "ray get-auth-token --generate" in text
    auth = next(i for i, line in enumerate(flow) if "export RAY_AUTH_MODE=token" in line)
    jobs = [i for i, line in enumerate(flow) if "ray job " in line and "--address http://127.0.0.1:8265" in line]
    assert jobs and min(jobs) > auth
