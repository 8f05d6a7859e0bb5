"""Provenance on every run: the commit of the checkout the harness runs from and the versions of the
packages that produce its numbers, so a report can say what made them."""
from __future__ import annotations

import os
import subprocess


def git_commit() -> str:
    """HEAD of the checkout the harness runs from, with `-dirty` if it has uncommitted changes."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


VERSIONED = ("fedeq-bench", "torch", "numpy", "mlflow", "ray", "optuna")


def package_versions() -> dict[str, str]:
    """`version.<name>` params: Python's and each VERSIONED distribution's version ("absent" if not
    installed), so a report can say what produced its numbers."""
    import platform
    from importlib import metadata

    out = {"version.python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[f"version.{name}"] = "absent"
    return out
