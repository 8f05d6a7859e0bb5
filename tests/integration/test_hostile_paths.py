"""Hostile paths given to the commands: every command that writes a file x every hostile target, and
every reader of a user-given path x every hostile source (FIFO, character device, oversize, folder,
missing). Each ends with exit 2, exactly one `error:` line, no traceback, promptly (a SIGALRM fails a
read that blocks), nothing recorded in MLflow, and the target as it was. In-process through each
command's `main(argv)` for the table; a few real subprocesses prove the wiring.

Expected values come from the rules in core/outputs.py and core/files.py (docs/reliability.md, Writes
and reads): a refusal before any work, so no MLflow run exists afterwards.
"""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.files import DATA_LIMIT, SMALL_LIMIT
from tests.integration.test_bad_files import FMNIST, LEAF_EMPTY, leaf_dir, load
from tests.unit.test_cifar import write_cifar10
from tests.unit.test_fmnist import write_idx_set
from tests.unit.test_output_writer import HOSTILE, snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--rounds", "1", "--clients", "4", "--backend", "serial", "--dataset", "synthetic"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
    for k in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def prompt():
    """Fails the test instead of hanging when a read blocks (a FIFO opened without O_NONBLOCK)."""
    def late(signum, frame):
        raise TimeoutError("blocked for 20 s")
    previous = signal.signal(signal.SIGALRM, late)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def one_error_line(capsys, code) -> str:
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def no_runs(db: Path) -> None:
    """Nothing was recorded: no store made, or one with no run in it."""
    if not db.exists():
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs == [], [(r.info.run_id, r.info.status) for r in runs]


# -- every command that writes a file x every hostile target ----------------------------------------------

def _describe(target, out):
    from bench import data
    return data.main(["describe", "--dataset", "synthetic", "--clients", "4", "--plot", str(target)])


def _sweep(target, out):
    from bench import sweep
    return sweep.main(["--method", "fedavg", "--trials", "1", "--tracking-uri", f"sqlite:///{out.parent}/mlflow.db",
                       "--storage", f"sqlite:///{out.parent}/optuna.db", "--tuned-out", str(target), *TINY])


def _report(target, out):
    from bench.report.__main__ import main
    return main(["--experiment", "none", "--tracking-uri", f"sqlite:///{out.parent}/mlflow.db", "--out", str(out)])


COMMANDS = {  # command: (the file it writes, relative to its output folder; how it is run)
    "bench.data describe --plot": ("labels.png", _describe),
    "bench.sweep --tuned-out": ("fedavg.toml", _sweep),
    "bench.report --out: report.md": ("report.md", _report),
    "bench.report --out: index.html": ("index.html", _report),
    "bench.report --out: figures/": ("figures/x.svg", _report),
}


def command_members():
    for cname, (rel, _) in COMMANDS.items():
        for hname in HOSTILE:
            if (hname == "link planted inside the output folder") != ("/" in rel):
                continue  # a planted folder link where the file goes into a folder below --out; else the others
            yield pytest.param(cname, hname, id=f"{cname}-{hname}")


@pytest.mark.parametrize("command,hostile", list(command_members()))
def test_every_writing_command_refuses_every_hostile_target(tmp_path, capsys, prompt, command, hostile):
    rel, run = COMMANDS[command]
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    (outside / "theirs.txt").write_bytes(b"not yours\n")
    target = out / rel
    target.parent.mkdir(parents=True)
    HOSTILE[hostile](target, outside)
    before = snapshot(tmp_path)
    err = one_error_line(capsys, run(target, out))
    assert str(target.parent if "planted" in hostile else target) in err, err
    if hostile == "foreign file":
        assert "--force" in err
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k != "mlflow.db"} == before  # nothing changed but the (empty) store
    no_runs(tmp_path / "mlflow.db")


def test_force_replaces_a_foreign_plot_and_nothing_else(tmp_path, capsys):
    from bench import data

    (tmp_path / "labels.png").write_bytes(b"my holiday photo")
    assert data.main(["describe", "--dataset", "synthetic", "--clients", "4", "--plot", "labels.png", "--force"]) == 0
    assert (tmp_path / "labels.png").read_bytes().startswith(b"\x89PNG")
    capsys.readouterr()
    assert data.main(["describe", "--dataset", "synthetic", "--clients", "4", "--plot", "labels.png"]) == 0  # its own


def test_bench_run_refuses_a_report_dir_that_is_a_pipe_or_a_device_before_running(tmp_path, capsys):
    from bench import run

    for make in (os.mkfifo, lambda p: os.symlink("/dev/null", p)):
        target = tmp_path / "reports"
        make(target)
        err = one_error_line(capsys, run.main([*TINY, "--methods", "fedavg", "--quiet", "--report-dir", str(target),
                                               "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]))
        assert "--report-dir" in err and ("named pipe" in err or "character device" in err), err
        no_runs(tmp_path / "mlflow.db")
        os.unlink(target)


# -- every reader x every hostile source -------------------------------------------------------------------

def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)  # a hole: no disk used, but fstat says `size`


SOURCES = {  # kind: make(path, limit)
    "fifo": lambda p, limit: os.mkfifo(p),
    "char device": lambda p, limit: os.symlink("/dev/zero", p),  # read until the kernel kills it, before
    "oversize": lambda p, limit: _sparse(p, limit + 1),
    "folder": lambda p, limit: p.mkdir(),
    "missing": lambda p, limit: None,
}


def _replace(path: Path, kind: str, limit: int) -> None:
    if path.exists() or path.is_symlink():
        os.unlink(path)
    SOURCES[kind](path, limit)


def _config(t, kind):
    _replace(t / "c.toml", kind, SMALL_LIMIT)
    return lambda: load(config=str(t / "c.toml"))


def _space(t, kind):
    from bench.tuning import spaces
    _replace(t / "s.toml", kind, SMALL_LIMIT)
    return lambda: spaces.load_space("fedavg", str(t / "s.toml"))


def _npz(t, kind):
    _replace(t / "d.npz", kind, DATA_LIMIT)
    return lambda: load(f"npz:{t}/d.npz")


def _shakespeare(t, kind):
    _replace(t / "play.txt", kind, DATA_LIMIT)
    return lambda: load(f"shakespeare:{t}/play.txt")


def _femnist(t, kind):
    leaf_dir(t / "fem", LEAF_EMPTY)
    _replace(t / "fem" / "train" / "a.json", kind, DATA_LIMIT)
    return lambda: load(f"femnist:{t}/fem")


def _fmnist(t, kind):
    write_idx_set(t / "fm")
    _replace(t / "fm" / f"{FMNIST[0]}.gz", kind, DATA_LIMIT)
    return lambda: load("fmnist", f"{t}/fm")


def _cifar_batch(t, kind):
    write_cifar10(t / "c")
    _replace(t / "c" / "cifar-10-batches-py" / "data_batch_1", kind, DATA_LIMIT)
    return lambda: load("cifar10", f"{t}/c", sets=["cifar10.download=false"])


def _cifar_tarball(t, kind):
    (t / "c").mkdir()
    _replace(t / "c" / "cifar-10-python.tar.gz", kind, DATA_LIMIT)
    return lambda: load("cifar10", f"{t}/c", sets=["cifar10.download=false"])


READERS = {"--config": _config, "--space": _space, "npz:FILE": _npz, "shakespeare:FILE": _shakespeare,
           "femnist JSON": _femnist, "fmnist file": _fmnist, "cifar batch": _cifar_batch,
           "cifar tarball": _cifar_tarball}


@pytest.mark.parametrize("kind", list(SOURCES))
@pytest.mark.parametrize("reader", list(READERS))
def test_every_reader_refuses_every_hostile_source_in_one_line_promptly(tmp_path, prompt, reader, kind):
    thunk = READERS[reader](tmp_path, kind)
    with pytest.raises(BenchError) as e:
        thunk()
    msg = str(e.value)
    assert "\n" not in msg, msg
    expected = {"fifo": "named pipe", "char device": "character device", "oversize": "limit for a",
                "folder": "folder", "missing": ""}[kind]
    if (reader, kind) == ("shakespeare:FILE", "folder"):
        expected = "no LEAF JSON under"  # a folder is shakespeare's other form (LEAF): its own line
    assert expected in msg, msg
    if kind == "oversize":
        limit = "1 MiB" if reader in ("--config", "--space") else "16 GiB"
        assert f"over the {limit} limit" in msg, msg  # the line says the cap


def test_a_tuned_preset_to_update_is_read_capped(tmp_path):
    from bench.tuning import presets

    path = tmp_path / "big.toml"
    _sparse(path, SMALL_LIMIT + 1)
    with pytest.raises(BenchError, match=r"^--tuned-out tuned preset '.*big\.toml' is 1,048,577 bytes, over the 1 MiB "
                                         r"limit for a --tuned-out tuned preset; give a smaller file$"):
        presets.check_out(str(path))


# -- a few real processes: the wiring, and no hang --------------------------------------------------------

def cli(args, cwd, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=ROOT, BENCH_CACHE_DIR=str(cwd / "cache"))
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


DB = ["--tracking-uri", "sqlite:///{tmp}/mlflow.db"]


@pytest.mark.parametrize("args,fragment", [
    (["bench.run", "--config", "{tmp}/pipe", *TINY, *DB], "config file '{tmp}/pipe' is not a regular file (a named pipe"),
    (["bench.sweep", "--method", "fedavg", "--trials", "1", "--space", "{tmp}/pipe", *TINY, *DB],
     "search space '{tmp}/pipe' is not a regular file (a named pipe"),
    (["bench.data", "describe", "--dataset", "synthetic", "--clients", "4", "--plot", "{tmp}/pipe"],
     "cannot write the plot '{tmp}/pipe': it is a named pipe"),
    (["bench.report", "--out", "{tmp}/out", *DB], "'{tmp}/out/figures' inside the output folder is a symbolic link"),
], ids=["run --config FIFO", "sweep --space FIFO", "describe --plot FIFO", "report --out with a planted link"])
def test_as_a_user_runs_it(tmp_path, args, fragment):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "out").mkdir()
    os.symlink(tmp_path, tmp_path / "out" / "figures")
    proc = cli([a.format(tmp=tmp_path) for a in args], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert fragment.format(tmp=tmp_path) in proc.stderr, proc.stderr
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode) and os.path.islink(tmp_path / "out" / "figures")
    no_runs(tmp_path / "mlflow.db")
