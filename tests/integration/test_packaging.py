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


def test_wheel_holds_every_layer_under_the_namespace(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    for module in ("fedeq_bench/core/seeding.py", "fedeq_bench/methods/fedeq.py", "fedeq_bench/methods/deq/solvers.py",
                   "fedeq_bench/methods/nets/deq_resnet.py", "fedeq_bench/datasets/fmnist.py",
                   "fedeq_bench/bench/run.py", "bench/__init__.py"):
        assert module in names
    # The `bench` alias is one file; the harness itself is installed once, under the namespace.
    assert [n for n in names if n.startswith("bench/")] == ["bench/__init__.py"]


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
        [sys.executable, "-c", "import importlib.util as u, fedeq_bench.bench.engine as e; "
                               "print(u.find_spec('datasets').origin); print(e.__file__)"],
        cwd=work, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert where[0] == str(target / "datasets" / "__init__.py")  # HF's, not ours
    assert where[1].startswith(str(target / "fedeq_bench"))  # the installed harness, not the checkout

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
