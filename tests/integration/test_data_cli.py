"""`python -m bench.data describe` as a user runs it (subprocess): on the real Fashion-MNIST from
Debian's `dataset-fashion-mnist` when installed, on a generated IDX set everywhere, and bad input
ending in one line and exit code 2 with nothing written to the partition cache."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_fmnist import write_idx_set

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
ROW = re.compile(r"^\s*(\d+)[ *]\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(.*?)\s+\|\s+(.*)$")


def describe(args, tmp_path, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "BENCH_DATA_DIR"}
    env.update(PYTHONPATH=ROOT, BENCH_CACHE_DIR=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "bench.data", "describe", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def client_rows(stdout):
    """[(client, train, val, test, n_classes, {class: count} train, {class: count} test)]."""
    out = []
    for line in stdout.splitlines():
        m = ROW.match(line)
        if m:
            hist = lambda s: {int(a): int(b) for a, b in (kv.split(":") for kv in s.split())} if s != "-" else {}  # noqa: E731
            out.append((*map(int, m.groups()[:5]), hist(m.group(6)), hist(m.group(7))))
    return out


def cache_files(tmp_path):
    d = tmp_path / "cache" / "partitions"
    return sorted(os.listdir(d)) if d.is_dir() else []


@pytest.mark.skipif(not all((DEBIAN / f).is_file() for f in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")),
                    reason="Fashion-MNIST not installed at /usr/share/datasets/fashion-mnist "
                           "(apt-get install dataset-fashion-mnist)")
def test_describe_real_fashion_mnist_shards_2_over_50_clients(tmp_path):
    proc = describe(["--dataset", "fmnist", "--partition", "shards:2", "--clients", "50", "--plot", "labels.png"],
                    tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = client_rows(proc.stdout)
    assert [r[0] for r in rows] == list(range(50))
    for _, train, val, _test, n_cls, hist_tr, hist_te in rows:
        # 60000 / (50 x 2) = 600 per shard, 1200 per client; val = round(0.1 * 1200) = 120.
        assert (train, val) == (1080, 120) and 1 <= n_cls <= 2
        assert sum(hist_tr.values()) == train and set(hist_te) <= set(hist_tr)
    assert "total train 54000  val 6000  test 10000" in proc.stdout  # 60000 = 54000 + 6000
    assert "partition shards:2(clients=50,seed=0,sha256=" in proc.stdout
    png = tmp_path / "labels.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert len(cache_files(tmp_path)) == 1  # the partition was cached ...
    again = describe(["--dataset", "fmnist", "--partition", "shards:2", "--clients", "50"], tmp_path)
    assert again.returncode == 0 and client_rows(again.stdout) == rows  # ... and reads back the same
    assert len(cache_files(tmp_path)) == 1


def test_describe_generated_set_with_dirichlet(tmp_path):
    write_idx_set(tmp_path / "fm", n_train=400, n_test=100)
    proc = describe(["--dataset", "fmnist", "--data-dir", str(tmp_path / "fm"), "--partition", "dirichlet:0.3",
                     "--clients", "4", "--seed", "2", "--frac-unseen", "0.25"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = client_rows(proc.stdout)
    assert len(rows) == 4
    assert sum(r[1] + r[2] for r in rows) == 400 and sum(r[3] for r in rows) == 100
    assert "clients 4 (unseen 1)" in proc.stdout  # round(0.25 * 4) = 1
    assert "partition dirichlet:0.3(clients=4,seed=2,sha256=" in proc.stdout


@pytest.mark.parametrize("args,line", [
    (["--dataset", "fmnist", "--partition", "dirichlet:0"], "error: partition 'dirichlet:0': alpha must be > 0"),
    (["--dataset", "cifar11"], "error: unknown dataset 'cifar11'; choose from"),
    (["--dataset", "fmnist", "--partition", "shards:2", "--clients", "300"],
     "error: shards:2 with 300 clients needs 600 shards but the train set has only 400 samples"),
    (["--dataset", "fmnist", "--partition", "natural"], "error: dataset 'fmnist' has no natural client split"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_cached(tmp_path, args, line):
    write_idx_set(tmp_path / "fm", n_train=400, n_test=100)
    proc = describe([*args, "--data-dir", str(tmp_path / "fm")], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(line) and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == "" and cache_files(tmp_path) == []


def test_truncated_file_is_one_line_exit_2(tmp_path):
    d = write_idx_set(tmp_path / "fm", gz=False)
    f = d / "train-labels-idx1-ubyte"
    f.write_bytes(f.read_bytes()[:-10])  # 300 labels declared, 290 present
    proc = describe(["--dataset", "fmnist", "--data-dir", str(d)], tmp_path)
    assert proc.returncode == 2
    assert re.fullmatch(r"error: \S+train-labels-idx1-ubyte is truncated: dims \(300,\) need 300 bytes of data, "
                        r"the file has 290\n", proc.stderr)
    assert cache_files(tmp_path) == []


def test_plot_in_an_unknown_format_is_one_line_exit_2(tmp_path):
    import matplotlib.figure

    FORMATS = matplotlib.figure.Figure().canvas.get_supported_filetypes()  # the formats savefig takes
    write_idx_set(tmp_path / "fm")
    proc = describe(["--dataset", "fmnist", "--data-dir", str(tmp_path / "fm"), "--clients", "3",
                     "--plot", "labels.xyz"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == ("error: cannot save the plot to 'labels.xyz': matplotlib has no format 'xyz'; end the "
                           "name with one of " + ", ".join(sorted(FORMATS)) + "\n")
    assert sorted(os.listdir(tmp_path)) == ["fm"]  # refused before the data was read (no cache), no plot, no temp file


@pytest.mark.parametrize("plot, line", [
    ("nope/labels.png", "error: cannot save the plot to 'nope/labels.png': the folder 'nope' does not exist"),
    ("fm", "error: cannot save the plot to 'fm': it is a folder; give a file name such as labels.png"),
])
def test_plot_into_a_missing_folder_or_onto_a_folder_is_one_line_and_creates_nothing(tmp_path, plot, line):
    write_idx_set(tmp_path / "fm")
    proc = describe(["--dataset", "fmnist", "--data-dir", str(tmp_path / "fm"), "--clients", "3", "--plot", plot],
                    tmp_path)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [line]
    assert not (tmp_path / "nope").exists()


def test_help_has_the_dataset_flags_only(tmp_path):
    """describe's flags are generated from RunConfig too, but only the fields that shape a dataset."""
    from bench.config import RunConfig, field_docs

    proc = subprocess.run([sys.executable, "-m", "bench.data", "describe", "--help"], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=ROOT, COLUMNS="1000"), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "--partition PARTITION " + field_docs(RunConfig)["partition"] in text
    for flag in ("--dataset", "--clients", "--val-frac", "--frac-unseen", "--data-dir", "--seed", "--plot"):
        assert flag in text, flag
    for flag in ("--rounds", "--methods", "--tracking-uri", "--backend"):
        assert flag not in text, flag


def test_a_dataset_too_big_for_memory_is_refused_before_it_is_generated(tmp_path):
    """10,000,000 synthetic clients (~1.1 TB): bench/experiment/sizing.py refuses from the sample counts alone,
    in seconds, where generating would be killed by the kernel with no message."""
    proc = describe(["--dataset", "synthetic", "--clients", "10000000"], tmp_path, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert re.fullmatch(r"error: this run needs about \d+\.\d GB memory \(data \d+\.\d GB \([\d,]+ samples\)\) but only "
                        r"\S+ [GM]B is available \(MemAvailable\); to fit, lower --clients \(now 10,000,000\)\n",
                        proc.stderr), proc.stderr
    assert proc.stdout == "" and cache_files(tmp_path) == []


def test_the_plot_path_is_checked_before_the_data_is_read(tmp_path):
    """A bad --plot is reported even when the data is bad too: it is checked first, in no time."""
    proc = describe(["--dataset", f"npz:{tmp_path}/missing.npz", "--plot", "nope/labels.png"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: cannot save the plot to 'nope/labels.png': the folder 'nope' does not exist"]
