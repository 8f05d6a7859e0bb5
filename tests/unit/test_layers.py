"""The import layers of docs/architecture.md, checked on grimp's import graph of the installed layout.

    bench                 the harness: imports everything below
    methods | datasets    may import core (and each other: a method may need a dataset type)
    core                  imports nothing of the project

and inside the harness, each level importing only the levels below it:

    run | sweep | data | __main__    the command lines
    tuning | perf                    Optuna studies; the harness's own benchmarks (independent)
    experiment                       validate, load, run and compare, summaries, resume
    report | loop                    reports from MLflow (no torch); the round loop (independent)
    tracking                         MLflow runs, stores, provenance
    config | cli | commands | quick_exit  the harness's vocabulary: config dataclasses; command-line plumbing

grimp reads a package from its directory, and in a checkout the library's folders are mapped under
`fedeq_bench` by pyproject's package-dir, not laid out beneath it. So the test lays the folders out as
the wheel installs them (fedeq_bench/core, ..., bench) in a temporary directory and builds the graph
there. Every import counts, including those inside functions (the harness imports lazily).
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
LIBRARY = ("core", "methods", "datasets")

# Runs in a subprocess so the temporary copy's packages never meet this process's.
CHECK = textwrap.dedent("""
    import sys
    import grimp
    g = grimp.build_graph("fedeq_bench", "bench")
    # Not vacuous: the graph holds every layer's modules and the imports between them.
    assert {"bench.loop.engine", "fedeq_bench.methods.fedeq", "fedeq_bench.core.seeding",
            "bench.tuning.study", "bench.report.tables"} <= g.modules
    assert g.direct_import_exists(importer="bench.loop.engine", imported="fedeq_bench.core.seeding")
    library = [
        grimp.Layer("bench"),
        grimp.Layer("fedeq_bench.methods", "fedeq_bench.datasets", independent=False),
        grimp.Layer("fedeq_bench.core"),
    ]
    harness = [
        grimp.Layer("run", "sweep", "data", "__main__", independent=False),
        grimp.Layer("tuning", "perf"),
        grimp.Layer("experiment"),
        grimp.Layer("report", "loop"),
        grimp.Layer("tracking"),
        grimp.Layer("config", "cli", "commands", "quick_exit", independent=False),
    ]
    bad = (g.find_illegal_dependencies_for_layers(layers=library)
           | g.find_illegal_dependencies_for_layers(layers=harness, containers={"bench"}))
    for dep in sorted(bad, key=lambda d: (d.importer, d.imported)):
        for route in dep.routes:
            print(f"{dep.importer} -> {dep.imported}: via {route.heads} ... {route.tails}")
    sys.exit(1 if bad else 0)
""")


def installed_layout(dest) -> str:
    """`dest/fedeq_bench/{core,methods,datasets}` and `dest/bench` as the wheel installs them."""
    pkg = os.path.join(dest, "fedeq_bench")
    os.makedirs(pkg)
    shutil.copy(os.path.join(ROOT, "fedeq_bench", "__init__.py"), pkg)
    ignore = shutil.ignore_patterns("__pycache__")
    for name in LIBRARY:
        shutil.copytree(os.path.join(ROOT, name), os.path.join(pkg, name), ignore=ignore)
    shutil.copytree(os.path.join(ROOT, "bench"), os.path.join(dest, "bench"), ignore=ignore)
    return str(dest)


def check(path: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=path)
    return subprocess.run([sys.executable, "-c", CHECK], cwd=path, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return installed_layout(tmp_path_factory.mktemp("layout"))


def test_the_tree_respects_the_layers(layout):
    proc = check(layout)
    assert proc.returncode == 0, "imports against the layers:\n" + proc.stdout + proc.stderr


@pytest.mark.parametrize("where, line", [
    ("fedeq_bench/methods", "from bench.loop import engine"),  # a method reaching up into the harness
    ("fedeq_bench/datasets", "from bench.config import Config"),
    ("fedeq_bench/core", "from fedeq_bench.methods.base import Method"),  # the vocabulary importing a user of it
    ("bench/report", "from bench.loop import engine"),  # a report importing the round loop (torch)
    ("bench/loop", "from bench.experiment import compare"),  # the loop reaching up into the library
    ("bench/tracking", "from bench.loop import wire"),
])
def test_a_reverse_import_is_caught(tmp_path, where, line):
    """The same check fails once one module imports against the layers (even inside a function)."""
    path = installed_layout(tmp_path)
    with open(os.path.join(path, where, "_reverse.py"), "w") as f:
        f.write(f"def f():\n    {line}\n")
    proc = check(path)
    assert proc.returncode == 1
    assert where.replace("/", ".") + "._reverse" in proc.stdout


def test_methods_and_datasets_may_import_each_other_and_core(tmp_path):
    """Allowed directions stay allowed: a method using a dataset type, anything using core."""
    path = installed_layout(tmp_path)
    with open(os.path.join(path, "fedeq_bench", "methods", "_sideways.py"), "w") as f:
        f.write("from fedeq_bench.datasets.base import ClientData\nfrom fedeq_bench.core import seeding\n")
    proc = check(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
