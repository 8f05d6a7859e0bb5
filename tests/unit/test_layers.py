"""The layers of DESIGN.md, checked on grimp's import graph of the installed layout.

    bench                 the harness: imports everything below
    methods | datasets    may import core (and each other: a method may need a dataset type)
    core                  imports nothing of the project

grimp reads a package from its directory, and in a checkout `fedeq_bench`'s subpackages are the
directory's siblings (fedeq_bench/__init__.py says why). So the test lays the folders out as the
wheel installs them (fedeq_bench/core, ...) in a temporary directory and builds the graph there.
Every import counts, including those inside functions (the harness imports lazily).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("grimp")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("core", "methods", "datasets", "bench")

# Runs in a subprocess so the temporary copy's `fedeq_bench` never meets this process's.
CHECK = textwrap.dedent("""
    import sys
    import grimp
    g = grimp.build_graph("fedeq_bench")
    # Not vacuous: the graph holds every layer's modules and the imports between them.
    assert {"fedeq_bench.bench.engine", "fedeq_bench.methods.fedeq", "fedeq_bench.core.seeding"} <= g.modules
    assert g.direct_import_exists(importer="fedeq_bench.bench.engine", imported="fedeq_bench.core.seeding")
    layers = [
        grimp.Layer("bench"),
        grimp.Layer("methods", "datasets", independent=False),
        grimp.Layer("core"),
    ]
    bad = g.find_illegal_dependencies_for_layers(layers=layers, containers={"fedeq_bench"})
    for dep in sorted(bad, key=lambda d: (d.importer, d.imported)):
        for route in dep.routes:
            print(f"{dep.importer} -> {dep.imported}: via {route.heads} ... {route.tails}")
    sys.exit(1 if bad else 0)
""")


def installed_layout(dest) -> str:
    """`dest/fedeq_bench/{core,methods,datasets,bench}` as the wheel installs them; returns dest."""
    pkg = os.path.join(dest, "fedeq_bench")
    os.makedirs(pkg)
    shutil.copy(os.path.join(ROOT, "fedeq_bench", "__init__.py"), pkg)
    for name in PACKAGES:
        shutil.copytree(os.path.join(ROOT, name), os.path.join(pkg, name),
                        ignore=shutil.ignore_patterns("__pycache__"))
    return str(dest)


def check(path: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=path)
    return subprocess.run([sys.executable, "-c", CHECK], cwd=path, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_tree_respects_the_layers(tmp_path):
    proc = check(installed_layout(tmp_path))
    assert proc.returncode == 0, "imports against the layers:\n" + proc.stdout + proc.stderr


@pytest.mark.parametrize("importer, line", [
    ("methods", "from fedeq_bench.bench import engine"),   # a method reaching up into the harness
    ("datasets", "from fedeq_bench.bench.config import Config"),
    ("core", "from fedeq_bench.methods.base import Method"),  # the vocabulary importing a user of it
])
def test_a_reverse_import_is_caught(tmp_path, importer, line):
    """The same check fails once one module imports against the layers (even inside a function)."""
    path = installed_layout(tmp_path)
    with open(os.path.join(path, "fedeq_bench", importer, "_reverse.py"), "w") as f:
        f.write(f"def f():\n    {line}\n")
    proc = check(path)
    assert proc.returncode == 1
    assert f"fedeq_bench.{importer}._reverse" in proc.stdout


def test_methods_and_datasets_may_import_each_other_and_core(tmp_path):
    """Allowed directions stay allowed: a method using a dataset type, anything using core."""
    path = installed_layout(tmp_path)
    with open(os.path.join(path, "fedeq_bench", "methods", "_sideways.py"), "w") as f:
        f.write("from fedeq_bench.datasets.base import ClientData\nfrom fedeq_bench.core import seeding\n")
    proc = check(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
