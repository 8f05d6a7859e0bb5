"""What the cluster tests need beyond minimal Ray: Ray Client (`ray://`, grpcio: `ray[client]`) and the
job API with its dashboard (`ray job submit`: `ray[default]`). pyproject's `dev` extra pulls both (its
`cluster` extra), so `pip install -e '.[dev]'` has them. Without them a test skips, except under CI
(the CI variable set), where .ci/run installs `.[dev]` and a missing extra is a failure, not a skip."""
import os

import pytest


def missing_ray_extras(client: bool = True, jobs: bool = False) -> str | None:
    """Why the wanted extras are unusable here, or None when they are installed."""
    from ray._private.utils import get_dashboard_dependency_error, get_ray_client_dependency_error

    why = []
    if client and get_ray_client_dependency_error() is not None:
        why.append("Ray Client needs grpcio")
    if jobs and get_dashboard_dependency_error() is not None:
        why.append("`ray job submit` needs Ray's dashboard")
    return "; ".join(why) + " (pip install -e '.[dev]', or '.[cluster]')" if why else None


def need_ray_extras(client: bool = True, jobs: bool = False) -> None:
    """Skip without the extras; fail under CI, whose `pip install -e '.[dev]'` installs them."""
    reason = missing_ray_extras(client, jobs)
    if reason and os.environ.get("CI"):
        pytest.fail(f"{reason}; .ci/run installs them, so under CI this is a failure")
    if reason:
        pytest.skip(reason)
