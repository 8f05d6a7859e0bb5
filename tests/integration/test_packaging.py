"""The install overwrites nobody: the wheel's only top-level import names are `fedeq_bench` and
`bench`, and Hugging Face's `datasets` installed in the same directory survives the project's install.

The wheel is built from a copy of the tracked files (so the checkout gets no build/ or egg-info)
with this venv's setuptools and no network (`--no-build-isolation`), then installed with
`pip install --no-deps --no-index --target DIR`, the way a user's environment receives it.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import importlib.metadata
import io
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(src, f)), exist_ok=True)
            shutil.copy(os.path.join(ROOT, f), os.path.join(src, f))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(out), str(src)], check=True, capture_output=True, text=True, timeout=300)
    (path,) = glob.glob(str(out / "*.whl"))
    return path


def record_top_level(wheel_path: str) -> set[str]:
    """Top-level import names in the wheel's RECORD: first path parts, less the dist-info folder."""
    with zipfile.ZipFile(wheel_path) as z:
        (record,) = [n for n in z.namelist() if n.endswith(".dist-info/RECORD")]
        rows = list(csv.reader(io.StringIO(z.read(record).decode())))
    tops = {row[0].split("/")[0] for row in rows if row}
    return {t.removesuffix(".py") for t in tops if not t.endswith((".dist-info", ".data"))}


def test_wheel_installs_only_its_namespace_and_bench(wheel):
    assert record_top_level(wheel) == {"fedeq_bench", "bench"}


def test_wheel_holds_every_module_of_the_checkout_once(wheel):
    """Every .py of core/, methods/, datasets/ (under fedeq_bench/) and bench/ (as bench/) is in the
    wheel, and nothing else is: a sub-package missing from pyproject's list would be left out."""
    with zipfile.ZipFile(wheel) as z:
        names = {n for n in z.namelist() if n.endswith(".py")}
    want = {"fedeq_bench/__init__.py"}
    for folder, installed in (("core", "fedeq_bench/core"), ("methods", "fedeq_bench/methods"),
                              ("datasets", "fedeq_bench/datasets"), ("bench", "bench")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
            for f in files:
                if f.endswith(".py"):
                    want.add(os.path.normpath(os.path.join(installed, rel, f)))
    assert "bench/loop/engine.py" in want and "fedeq_bench/methods/deq/solvers.py" in want  # not vacuous
    assert names == want


def _hf_datasets_dir() -> str | None:
    """The installed Hugging Face `datasets` package folder in this environment, if any."""
    try:
        dist = importlib.metadata.distribution("datasets")
    except importlib.metadata.PackageNotFoundError:
        return None
    init = [f for f in dist.files or [] if str(f) == "datasets/__init__.py"]
    return os.path.dirname(str(init[0].locate())) if init else None


def _digest(folder: str) -> str:
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.endswith(".pyc"):
                continue
            with open(os.path.join(dirpath, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def test_hugging_face_datasets_survives_the_install_and_runs_beside_it(wheel, tmp_path):
    """Hugging Face's `datasets` laid in DIR (as `pip install --target DIR datasets` does), then this
    project's wheel installed into the same DIR: HF's files are untouched, `datasets` still resolves
    to HF's, and `python -m bench.run --rounds 1` works from outside any checkout.

    CI installs `datasets` with `pip install --no-deps datasets` before the tests; elsewhere this
    test skips when it is not installed (outside CI).
    """
    hf = _hf_datasets_dir()
    if hf is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Hugging Face datasets (pip install --no-deps datasets) for this test")
        pytest.skip("Hugging Face `datasets` is not installed (CI installs it: pip install --no-deps datasets)")
    target = tmp_path / "site"
    shutil.copytree(hf, target / "datasets")
    before = _digest(str(target / "datasets"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--upgrade",
                    "--target", str(target), wheel], check=True, capture_output=True, text=True, timeout=300)
    assert _digest(str(target / "datasets")) == before

    work = tmp_path / "elsewhere"  # not the checkout: its folders must not be what gets imported
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target))
    where = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u, bench.loop.engine as e; "
                               "print(u.find_spec('datasets').origin); print(e.__file__)"],
        cwd=work, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert where[0] == str(target / "datasets" / "__init__.py")  # HF's, not ours
    assert where[1].startswith(str(target / "bench"))  # the installed harness, not the checkout

    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--methods", "fedavg", "--rounds", "1", "--clients", "4",
         "--backend", "serial", "--quiet", "--tracking-uri", f"sqlite:///{work}/mlflow.db"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| fedavg" in proc.stdout


def test_console_script_dispatches_to_each_command(wheel, tmp_path):
    """`fedeq-bench data describe ...` from the installed wheel is `python -m bench.data describe ...`;
    an unknown command is one line and exit 2."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                    str(target), wheel], check=True, capture_output=True, text=True, timeout=300)
    script = target / "bin" / "fedeq-bench"
    assert script.exists()
    env = dict(os.environ, PYTHONPATH=str(target))
    run = lambda *a: subprocess.run([sys.executable, str(script), *a], cwd=tmp_path, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    proc = run("data", "describe", "--dataset", "synthetic", "--clients", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "synthetic" in proc.stdout and proc.stdout.count("\n") >= 3  # a header and a row per client
    proc = run("sweeep")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: unknown command 'sweeep'; choose from data, perf, report, run, sweep"]


# -- one import name per module ------------------------------------------------------------------


def _in_checkout(code: str) -> subprocess.CompletedProcess:
    """`python -c code` from the checkout's root, as a new user would try it."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("folder", ["core", "methods", "datasets"])
def test_a_library_folder_imported_by_its_folder_name_fails_with_one_line(folder):
    """From the checkout's root `methods` would be the folder itself, a second copy of
    fedeq_bench.methods with a second registry (`methods.nets.build_model('deq_resnet_s', ...)` once
    said "unknown model; choose from cnn, mlp"). It refuses, naming the import that works."""
    proc = _in_checkout(f"import {folder}")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"ImportError: this is fedeq-bench's {folder}/ folder; import it as fedeq_bench.{folder}")


def test_from_methods_nets_fails_and_the_namespace_builds_every_model():
    proc = _in_checkout("from methods.nets import build_model")
    assert "import it as fedeq_bench.methods" in proc.stderr.strip().splitlines()[-1]
    proc = _in_checkout("from fedeq_bench.methods.nets import build_model, MODELS\n"
                        "print(type(build_model('deq_resnet_s', (1, 28, 28), 10)).__name__, len(MODELS.names()))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    name, count = proc.stdout.split()
    assert int(count) > 2  # the DEQ and paper models registered, not only cnn and mlp


def test_every_harness_module_is_one_module_object():
    """`bench` from the checkout's root is the harness itself (no alias package), so `bench.cli` is
    the module every other module imports; the namespace has no second route to the harness or tests."""
    code = ("import sys, importlib, bench.cli, bench.loop.engine\n"
            "assert sys.modules['bench.cli'] is bench.cli and bench.loop.engine.__name__ == 'bench.loop.engine'\n"
            "for bad in ('fedeq_bench.bench', 'fedeq_bench.tests', 'fedeq_bench.fedeq_bench'):\n"
            "    try:\n        importlib.import_module(bad)\n    except ImportError:\n        pass\n"
            "    else:\n        raise SystemExit(bad + ' imports')\n"
            "dup = [m for m in sys.modules if m.startswith(('fedeq_bench.bench', 'methods', 'core', 'datasets'))]\n"
            "assert not dup, dup\nprint('ok')")
    proc = _in_checkout(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
