"""Every path a user gives is read defensively: missing, unreadable, of the wrong kind (a folder
where a file is expected and the reverse), or undecodable (truncated, corrupt, garbage, not UTF-8)
ends as one BenchError line naming the path and what was expected, never a traceback. In-process for
the many members (through the same functions bench.run calls: config.from_cli, experiment.validate,
experiment.load_checked), and a few real `python -m bench.run` processes: exit code 2, one `error: `
line, no Traceback, no MLflow database made."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from bench import config as C
from bench.experiment import load_checked, validate
from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.files import read_text, require_dir, require_file, require_output_dir
from tests.helpers import write_tiny_npz
from tests.unit.test_cifar import write_cifar10
from tests.unit.test_fmnist import write_idx_set

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0
"""Root reads a chmod 000 file anyway (CI runs tests as root): those members are skipped there, and
the folder-where-a-file-is-expected members cover the same failure to read."""
LEAF_EMPTY = '{"users": [], "num_samples": [], "user_data": {}}'
FMNIST = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)


def load(dataset=None, data_dir=None, config=None, sets=()):
    flags = {"methods": "fedavg", "rounds": "1", "backend": "serial", "dataset": dataset, "data_dir": data_dir}
    return load_checked(validate(C.from_cli(config, flags, list(sets))))


def leaf_dir(d: Path, train_text: str | bytes, test_text: str | bytes = LEAF_EMPTY) -> Path:
    for side, text in (("train", train_text), ("test", test_text)):
        (d / side).mkdir(parents=True, exist_ok=True)
        f = d / side / "a.json"
        f.write_bytes(text if isinstance(text, bytes) else text.encode())
    return d


def truncated_npz(t: Path) -> str:
    good = Path(write_tiny_npz(t / "good.npz"))
    data = good.read_bytes()
    (t / "cut.npz").write_bytes(data[: len(data) // 2])
    return str(t / "cut.npz")


def npz_with_garbage_member(t: Path) -> str:
    with zipfile.ZipFile(t / "g.npz", "w") as z:
        z.writestr("train_x_0.npy", b"\x93NUMPY\x01\x00garbage, not an array header")
    return str(t / "g.npz")


def unreadable(p: Path) -> Path:
    p.chmod(0)
    return p


def tarball_of(path: Path, name: str) -> Path:
    """A valid .tar.gz holding one small file `name` (not the release's batches)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(name)
        info.size = 5
        tf.addfile(info, io.BytesIO(b"hello"))
    return path


def cut(p: Path, keep: int) -> Path:
    p.write_bytes(p.read_bytes()[:keep])
    return p


def as_folder(p: Path) -> Path:
    """A folder where the dataset expects the file `p`."""
    p.unlink()
    p.mkdir()
    return p


CIFAR = "cifar-10-batches-py"
NO_DOWNLOAD = ["cifar10.download=false"]


def after(*_made, run):
    """`run`, once the arguments before it (the files a case makes) are made: cases stay one expression."""
    return run


spaces = __import__("bench.tuning.spaces", fromlist=["load_space"])
no_root = pytest.mark.skipif(ROOT_USER, reason="root reads a chmod 000 file or folder")

# (id, make(tmp_path) -> thunk raising BenchError, regex its message must match). The regexes name the path.
CASES = [
    # --dataset npz:PATH
    ("npz missing", lambda t: lambda: load(f"npz:{t}/nope.npz"), r"npz dataset file not found: '.*nope\.npz'"),
    ("npz is a folder", lambda t: after((t / "d.npz").mkdir(), run=lambda: load(f"npz:{t}/d.npz")),
     r"npz dataset '.*d\.npz' is a folder; expected a \.npz archive"),
    ("npz truncated", lambda t: after(p := truncated_npz(t), run=lambda: load(f"npz:{p}")),
     r"npz dataset '.*cut\.npz' is not a valid \.npz archive \(BadZipFile"),
    ("npz is a zip, not an npz", lambda t: after(zipfile.ZipFile(t / "z.npz", "w").close(),
                                                 run=lambda: load(f"npz:{t}/z.npz")),
     r"npz dataset '.*z\.npz' has no client arrays"),
    ("npz garbage bytes", lambda t: after((t / "g.npz").write_bytes(os.urandom(512)), run=lambda: load(f"npz:{t}/g.npz")),
     r"npz dataset '.*g\.npz' is not a valid \.npz archive"),
    ("npz is a device", lambda t: lambda: load("npz:/dev/null"),
     r"npz dataset '/dev/null' is not a regular file \(a character device\)"),
    ("npz member not an array", lambda t: after(p := npz_with_garbage_member(t), run=lambda: load(f"npz:{p}")),
     r"npz dataset '.*g\.npz': cannot read array 'train_x_0'"),
    pytest.param("npz unreadable", lambda t: after(p := unreadable(Path(write_tiny_npz(t / "u.npz"))),
                                                   run=lambda: load(f"npz:{p}")),
                 r"npz dataset '.*u\.npz' cannot be read \(permission denied\)", marks=no_root),
    # --dataset shakespeare:FILE (or a LEAF folder)
    ("shakespeare missing", lambda t: lambda: load(f"shakespeare:{t}/play.txt"),
     r"shakespeare data not found: '.*play\.txt'"),
    ("shakespeare not UTF-8", lambda t: after((t / "p.txt").write_bytes(b"ROMEO:\nO \xff\xfe Juliet\n"),
                                              run=lambda: load(f"shakespeare:{t}/p.txt")),
     r"shakespeare: play text '.*p\.txt' is not UTF-8 text \(byte 9: b'\\xff'\); expected UTF-8 play text"),
    ("shakespeare folder without LEAF JSON", lambda t: after((t / "s").mkdir(), run=lambda: load(f"shakespeare:{t}/s")),
     r"shakespeare: no LEAF JSON under '.*s': expected train/\*\.json and test/\*\.json"),
    ("shakespeare LEAF invalid JSON", lambda t: after(leaf_dir(t / "s", "{oops"), run=lambda: load(f"shakespeare:{t}/s")),
     r"shakespeare: .*train/a\.json is not valid JSON \(Expecting property name"),
    pytest.param("shakespeare unreadable", lambda t: after((t / "p.txt").write_text("ROMEO:\nhi\n"), unreadable(t / "p.txt"),
                                                           run=lambda: load(f"shakespeare:{t}/p.txt")),
                 r"shakespeare: play text '.*p\.txt' cannot be read \(permission denied\)", marks=no_root),
    # --dataset femnist:DIR
    ("femnist missing", lambda t: lambda: load(f"femnist:{t}/fem"), r"femnist data not found: '.*fem'"),
    ("femnist is a file", lambda t: after((t / "fem").write_text("x"), run=lambda: load(f"femnist:{t}/fem")),
     r"femnist: '.*fem' is not a directory; expected LEAF's femnist data directory"),
    ("femnist LEAF invalid JSON", lambda t: after(leaf_dir(t / "fem", '{"users": [1,'), run=lambda: load(f"femnist:{t}/fem")),
     r"femnist: .*fem/train/a\.json is not valid JSON"),
    ("femnist LEAF JSON not UTF-8", lambda t: after(leaf_dir(t / "fem", b'{"users": ["\xe9"]}'),
                                                    run=lambda: load(f"femnist:{t}/fem")),
     r"femnist: LEAF file '.*train/a\.json' is not UTF-8 text \(byte 12: b'\\xe9'\)"),
    ("femnist LEAF file is a folder", lambda t: after(leaf_dir(t / "fem", LEAF_EMPTY), (t / "fem/train/b.json").mkdir(),
                                                      run=lambda: load(f"femnist:{t}/fem")),
     r"femnist: LEAF file '.*train/b\.json' is a folder; expected UTF-8 LEAF JSON"),
    pytest.param("femnist unreadable folder", lambda t: after(leaf_dir(t / "fem", LEAF_EMPTY), unreadable(t / "fem/train"),
                                                              run=lambda: load(f"femnist:{t}/fem")),
                 r"femnist: LEAF folder '.*fem/train' cannot be read \(permission denied\)", marks=no_root),
    # --data-dir, and the files a dataset finds in it
    ("data-dir is a file", lambda t: after((t / "dd").write_text("x"), run=lambda: load("fmnist", f"{t}/dd")),
     r"--data-dir '.*dd' is a file, not a folder"),
    ("fmnist garbage .gz", lambda t: after(write_idx_set(t / "fm"), (t / "fm" / f"{FMNIST[1]}.gz").write_bytes(os.urandom(64)),
                                           run=lambda: load("fmnist", f"{t}/fm")),
     r".*fm/train-labels-idx1-ubyte\.gz is corrupt or truncated \(BadGzipFile"),
    ("fmnist truncated .gz", lambda t: after(write_idx_set(t / "fm"), cut(t / "fm" / f"{FMNIST[0]}.gz", 200),
                                             run=lambda: load("fmnist", f"{t}/fm")),
     r".*fm/train-images-idx3-ubyte\.gz is corrupt or truncated \(EOFError"),
    ("fmnist garbage IDX", lambda t: after(write_idx_set(t / "fm", gz=False), (t / "fm" / FMNIST[2]).write_bytes(b"\xff" * 99),
                                           run=lambda: load("fmnist", f"{t}/fm")),
     r".*fm/t10k-images-idx3-ubyte is not an IDX file \(bad magic number ffffffff\)"),
    ("fmnist folder where a file is expected", lambda t: after(write_idx_set(t / "fm"), as_folder(t / "fm" / f"{FMNIST[3]}.gz"),
                                                               run=lambda: load("fmnist", f"{t}/fm")),
     r"Fashion-MNIST file '.*fm/t10k-labels-idx1-ubyte\.gz' is a folder; expected an IDX file"),
    ("fmnist some files missing", lambda t: after(write_idx_set(t / "fm"), (t / "fm" / f"{FMNIST[0]}.gz").unlink(),
                                                  run=lambda: load("fmnist", f"{t}/fm")),
     r".*fm holds 3 of the 4 Fashion-MNIST files but not train-images-idx3-ubyte"),
    ("cifar garbage batch", lambda t: after(write_cifar10(t / "c"), (t / "c" / CIFAR / "data_batch_2").write_bytes(b"\x80\x02??"),
                                            run=lambda: load("cifar10", f"{t}/c", sets=NO_DOWNLOAD)),
     r".*data_batch_2 is not a readable CIFAR batch, corrupt or truncated"),
    ("cifar garbage tarball", lambda t: after((t / "c").mkdir(), (t / "c/cifar-10-python.tar.gz").write_bytes(os.urandom(300)),
                                              run=lambda: load("cifar10", f"{t}/c", sets=NO_DOWNLOAD)),
     r".*c/cifar-10-python\.tar\.gz is corrupt or truncated"),
    ("cifar tarball without the batches", lambda t: after(tarball_of(t / "c/cifar-10-python.tar.gz", "notes.txt"),
                                                          run=lambda: load("cifar10", f"{t}/c", sets=NO_DOWNLOAD)),
     r".*cifar-10-python\.tar\.gz lacks cifar-10-batches-py/data_batch_1; is it the CIFAR-10 python tarball\?"),
    ("cifar batch is a folder", lambda t: after(write_cifar10(t / "c"), as_folder(t / "c" / CIFAR / "test_batch"),
                                                run=lambda: load("cifar10", f"{t}/c", sets=NO_DOWNLOAD)),
     r"CIFAR-10 batch '.*test_batch' is a folder; expected a CIFAR-10 python batch file"),
    ("cifar batch missing", lambda t: after(write_cifar10(t / "c"), (t / "c" / CIFAR / "data_batch_4").unlink(),
                                            run=lambda: load("cifar10", f"{t}/c", sets=NO_DOWNLOAD)),
     r".*cifar-10-batches-py lacks data_batch_4; download"),
    # --config FILE and --space FILE (bench/config.py read_toml)
    ("config not UTF-8", lambda t: after((t / "c.toml").write_bytes(b"[run]\nrounds = 2 # \xff\n"),
                                         run=lambda: load(config=f"{t}/c.toml")),
     r"config file '.*c\.toml' is not UTF-8 text \(byte 19"),  # "[run]\n" + "rounds = 2 # " = 6 + 13 bytes
    ("config under a file", lambda t: after((t / "f").write_text("x"), run=lambda: load(config=f"{t}/f/c.toml")),
     r"config file '.*f/c\.toml': a part of the path is a file, not a folder"),
    ("space is a folder", lambda t: after((t / "sp.toml").mkdir(), run=lambda: spaces.load_space("fedavg", f"{t}/sp.toml")),
     r"search space '.*sp\.toml' is a folder"),
    ("space missing", lambda t: lambda: spaces.load_space("fedavg", f"{t}/no.toml"), r"search space '.*no\.toml' not found"),
    # --report-dir (bench.run checks it before running; bench.report --out when writing)
    ("report-dir is a file", lambda t: after((t / "r").write_text("x"), run=lambda: require_output_dir(t / "r", "--report-dir")),
     r"--report-dir '.*r' is a file; expected a folder"),
    ("report-dir under a file", lambda t: after((t / "r").write_text("x"),
                                                run=lambda: require_output_dir(t / "r/a/b", "--report-dir")),
     r"--report-dir '.*r/a/b' lies under the file '.*r'; expected a folder"),
]


@pytest.mark.parametrize("name,make,pattern", CASES, ids=[getattr(c, "values", c)[0] for c in CASES])
def test_a_bad_path_is_one_line_naming_it(tmp_path, name, make, pattern):
    thunk = make(tmp_path)
    with pytest.raises(BenchError) as e:
        thunk()
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert re.search(pattern, msg), msg


def test_the_helpers_name_the_case(tmp_path):
    (tmp_path / "f.txt").write_bytes(b"caf\xc3\xa9 \xff")
    (tmp_path / "d").mkdir()
    cases = [
        (lambda: require_file(tmp_path / "d", "x"), "is a folder; expected a file"),
        (lambda: require_file(tmp_path / "nope", "x"), "not found; expected a file"),
        (lambda: require_dir(tmp_path / "f.txt", "x"), "is a file, not a folder"),
        (lambda: require_dir(tmp_path / "nope", "x"), "not found; expected a folder"),
        (lambda: read_text(tmp_path / "f.txt", "x"), "is not UTF-8 text (byte 6: b'\\xff')"),  # é is 2 bytes: 0..5
    ]
    os.symlink(tmp_path / "gone", tmp_path / "link")
    cases.append((lambda: require_file(tmp_path / "link", "x"), "is a broken symbolic link"))
    for thunk, fragment in cases:
        with pytest.raises(BenchError) as e:
            thunk()
        assert fragment in str(e.value) and str(tmp_path) in str(e.value)
    # What root never meets (it reads a chmod 000 file): the system's EACCES, as open() raises it.
    import errno

    from fedeq_bench.core.files import decode_error
    denied = decode_error(PermissionError(errno.EACCES, "Permission denied"), tmp_path / "f.txt", "x", "a file")
    assert str(denied) == f"x '{tmp_path / 'f.txt'}' cannot be read (permission denied); expected a file"
    assert require_output_dir(tmp_path / "new" / "deeper", "--out") == str(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # checked, not made


# -- as a user runs it ---------------------------------------------------------------------------------

def bench_run(args, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "BENCH_DATA_DIR"}
    env.update(PYTHONPATH=ROOT, BENCH_CACHE_DIR=str(cwd / "cache"))
    return subprocess.run([sys.executable, "-m", "bench.run", "--backend", "serial", "--rounds", "1", "--quiet",
                           "--tracking-uri", f"sqlite:///{cwd}/mlflow.db", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("setup,args,line", [
    (lambda t: truncated_npz(t), lambda p: ["--dataset", f"npz:{p}"],
     r"error: npz dataset '.*cut\.npz' is not a valid \.npz archive \(BadZipFile: File is not a zip file\)"),
    (lambda t: (t / "p.txt").write_bytes(b"ROMEO:\n\xff\n") and t / "p.txt", lambda p: ["--dataset", f"shakespeare:{p}"],
     r"error: shakespeare: play text '.*p\.txt' is not UTF-8 text \(byte 7: b'\\xff'\); expected UTF-8 play text .*"),
    (lambda t: (t / "reports").write_text("a file") and t / "reports", lambda p: ["--report-dir", str(p)],
     r"error: --report-dir '.*reports' is a file; expected a folder \(it is made if missing\)"),
    # Family 3 beside it: 10,000,000 synthetic clients (~1.1 TB) are refused from their sample counts.
    (lambda t: None, lambda p: ["--clients", "10000000"],
     r"error: this run needs about \d+\.\d GB memory \(data .*\) but only .* is available \(MemAvailable\); "
     r"to fit, lower --clients \(now 10,000,000\).*"),
])
def test_bench_run_one_line_exit_2_no_traceback_nothing_recorded(tmp_path, setup, args, line):
    proc = bench_run(args(setup(tmp_path)), tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(line, lines[0]), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # rejected before anything was recorded
