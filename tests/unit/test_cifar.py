"""datasets/cifar.py: CIFAR-10/100 from generated batches in the release's exact layout (Python 2
protocol-2 pickles of dicts with bytes keys and a uint8 numpy array), the restricted unpickler
against pickles that try to run code, the release tarball, and verified downloads (file:// URLs)."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import pickletools
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fedeq_bench.core.errors import BenchError
from fedeq_bench.datasets import DataArgs, get_dataset
from fedeq_bench.datasets import cifar as CI


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the release: protocol 2, bytes as SHORT_BINSTRING /
    BINSTRING (Python 3's protocol 2 would call _codecs.encode instead), numpy's reconstructor
    under its Python 2 module name numpy.core.multiarray."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", "") == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def images(ids: np.ndarray) -> np.ndarray:
    """(n, 3072) rows: red plane = id % 256, green = id // 256, blue = 200; one pixel varies per image."""
    x = np.zeros((len(ids), 3072), np.uint8)
    x[:, :1024], x[:, 1024:2048], x[:, 2048:] = (ids % 256)[:, None], (ids // 256)[:, None], 200
    x[:, 1023] = np.arange(len(ids)) % 251  # the last red pixel, (row 31, col 31)
    return x


def write_cifar10(d: Path, per_batch=40, n_test=50) -> Path:
    """cifar-10-batches-py/ with 5 x `per_batch` train rows (ids 0..) and `n_test` test rows (ids 1000..)."""
    folder = d / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        ids = np.arange((i - 1) * per_batch, i * per_batch)
        (folder / f"data_batch_{i}").write_bytes(py2_pickle({
            b"batch_label": f"training batch {i} of 5".encode(), b"labels": [int(v) % 10 for v in ids],
            b"data": images(ids), b"filenames": [f"img_{v}.png".encode() for v in ids]}))
    ids = 1000 + np.arange(n_test)
    (folder / "test_batch").write_bytes(py2_pickle({
        b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) % 10 for v in ids],
        b"data": images(ids), b"filenames": [f"t_{v}.png".encode() for v in ids]}))
    return folder


def write_cifar100(d: Path, n_train=400, n_test=200) -> Path:
    folder = d / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, ids in (("train", np.arange(n_train)), ("test", 1000 + np.arange(n_test))):
        (folder / name).write_bytes(py2_pickle({
            b"filenames": [f"{v}.png".encode() for v in ids], b"batch_label": name.encode(),
            b"fine_labels": [int(v) % 100 for v in ids], b"coarse_labels": [int(v) % 20 for v in ids],
            b"data": images(ids)}))
    return folder


def tarball(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return out


def load(name="cifar10", data_dir=None, cfg=None, **kw):
    cfg = cfg or (CI.Cifar10Config(download=False) if name == "cifar10" else CI.Cifar100Config(download=False))
    return get_dataset(name, cfg, DataArgs(**{"seed": 0, "data_dir": None if data_dir is None else str(data_dir), **kw}))


def ids_of(x: np.ndarray) -> np.ndarray:
    px = np.rint(x * 255).astype(np.int64)
    assert np.all(px[:, 2] == 200)  # the blue plane is channel 2: the (3, 32, 32) layout is right
    return px[:, 0, 0, 0] + 256 * px[:, 1, 0, 0]


# -- the generated files really are in the release's format ---------------------------------------

def test_generated_batch_is_a_python2_protocol2_pickle():
    data = py2_pickle({b"data": images(np.arange(3)), b"labels": [0, 1, 2]})
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    assert ops[0] == ("PROTO", 2)
    assert ("GLOBAL", "numpy.core.multiarray _reconstruct") in ops
    assert ("GLOBAL", "numpy ndarray") in ops and ("GLOBAL", "numpy dtype") in ops
    assert not any(name == "GLOBAL" and "codecs" in arg for name, arg in ops)
    assert {name for name, _ in ops} & {"SHORT_BINSTRING", "BINSTRING"}  # py2 str, read back as bytes
    with pytest.raises(UnicodeDecodeError):  # why encoding="bytes" is needed: pixel bytes (200) are not ASCII
        pickle.loads(data)


# -- loading --------------------------------------------------------------------------------------

def test_cifar10_loads_images_in_0_1_with_every_sample_once(tmp_path):
    write_cifar10(tmp_path)
    ds = load(data_dir=tmp_path, clients=10, partition="shards:2")
    assert ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    assert ds.default_models == {"explicit": "resnet34", "deq": "deq_resnet_m"}
    train_ids, test_ids = [], []
    for c in ds.clients:
        for x, y, bucket in ((c.train_x, c.train_y, train_ids), (c.val_x, c.val_y, train_ids),
                             (c.test_x, c.test_y, test_ids)):
            assert x.dtype == np.float32 and x.shape[1:] == (3, 32, 32) and x.min() >= 0 and x.max() <= 1
            ids = ids_of(x)
            np.testing.assert_array_equal(y, ids % 10)
            bucket += ids.tolist()
        classes = set(c.train_y.tolist()) | set(c.val_y.tolist())
        assert len(classes) <= 2 and set(c.test_y.tolist()) <= classes
    assert sorted(train_ids) == list(range(200))  # 5 batches x 40
    assert sorted(test_ids) == list(range(1000, 1050))
    assert ds.partition.startswith("shards:2(clients=10,seed=0,sha256=")


def test_pixel_layout_is_rgb_planes_row_major():
    # Row = 1024 red, 1024 green, 1024 blue in row-major order: flat index 1023 is red at (31, 31).
    x, y = CI.parse_batch(py2_pickle({b"data": images(np.arange(3)), b"labels": [0, 1, 2]}), "b", CI.CIFAR10, "test_batch")
    assert x.shape == (3, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    assert x[2, 0, 31, 31] == 2 and x[2, 0, 31, 30] == 2 % 256 and x[2, 1, 0, 0] == 0 and x[2, 2, 5, 5] == 200


def test_cifar10_defaults_are_the_papers_100_clients_shards_5(tmp_path):
    write_cifar10(tmp_path, per_batch=200, n_test=500)  # 1000 train: 100 x 5 = 500 shards of 2
    ds = load(data_dir=tmp_path)
    assert len(ds.clients) == 100 and ds.partition.startswith("shards:5(clients=100,seed=0,")


def test_cifar100_uses_fine_labels(tmp_path):
    write_cifar100(tmp_path)
    ds = load("cifar100", data_dir=tmp_path, clients=20, partition="shards:5")
    assert ds.num_classes == 100 and ds.input_shape == (3, 32, 32)
    labels = np.concatenate([np.concatenate([c.train_y, c.val_y]) for c in ds.clients])
    assert len(labels) == 400 and labels.max() == 99  # fine labels (coarse ones stop at 19)
    for c in ds.clients:
        assert len(set(c.train_y.tolist()) | set(c.val_y.tolist())) <= 5
        np.testing.assert_array_equal(c.test_y, ids_of(c.test_x) % 100)


def test_tarball_is_read_in_place_and_matches_the_folder(tmp_path):
    folder = write_cifar10(tmp_path / "a")
    tarball(folder, (tmp_path / "b").mkdir() or tmp_path / "b" / "cifar-10-python.tar.gz")
    from_dir = load(data_dir=tmp_path / "a", clients=5)
    from_tar = load(data_dir=tmp_path / "b", clients=5)
    assert from_tar.fingerprint == from_dir.fingerprint
    assert os.listdir(tmp_path / "b") == ["cifar-10-python.tar.gz"]  # nothing extracted


def test_batches_directly_in_data_dir_are_found(tmp_path):
    folder = write_cifar10(tmp_path)
    assert len(load(data_dir=folder, clients=5).clients) == 5


# -- the restricted unpickler ---------------------------------------------------------------------

class Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


class EvalEvil:
    def __reduce__(self):
        return eval, ("__import__('os').system('echo pwned')",)


@pytest.mark.parametrize("make,refused", [
    (lambda p: Evil(p), r"(posix|os)\.system"),
    (lambda p: EvalEvil(), r"(__builtin__|builtins)\.eval"),  # protocol 2 writes the Python 2 name
])
def test_pickle_that_tries_to_run_code_is_refused_and_nothing_runs(tmp_path, make, refused):
    target = tmp_path / "pwned"
    folder = write_cifar10(tmp_path / "data")
    payload = py2_pickle({b"data": make(target), b"labels": [0]})
    (folder / "data_batch_3").write_bytes(payload)
    with pytest.raises(BenchError, match=rf"data_batch_3 asks to load {refused}, which a CIFAR batch never holds; "
                                         r"refusing it") as e:
        load(data_dir=tmp_path / "data", clients=5)
    assert "\n" not in str(e.value)
    assert not target.exists()
    # The same bytes would run the command under plain pickle: the test would catch a permissive loader.
    if isinstance(make(target), Evil):
        pickle.loads(payload)
        assert target.exists()


def test_object_dtype_arrays_are_refused():
    data = py2_pickle({b"data": np.array([1, "x"], dtype=object), b"labels": [0, 1]})
    with pytest.raises(BenchError, match=r"b is not a readable CIFAR batch.*object dtype"):
        CI.load_batch(data, "b")


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d[: len(d) // 2], r"is not a readable CIFAR batch, corrupt or truncated"),
    (lambda d: b"", r"is not a readable CIFAR batch, corrupt or truncated \(EOFError"),
    (lambda d: py2_pickle([1, 2]), r"holds a list, not a CIFAR batch dict"),
    (lambda d: py2_pickle({b"data": images(np.arange(2))}), r"lacks b'data' or b'labels'"),
    (lambda d: py2_pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), r"expected uint8 \(N, 3072\)"),
    (lambda d: py2_pickle({b"data": images(np.arange(2)), b"labels": [0]}), r"b'labels' must be 2 integers"),
    (lambda d: py2_pickle({b"data": images(np.arange(2)), b"labels": [0, 10]}), r"labels must be in 0..9, found 0..10"),
])
def test_bad_batches_are_one_clear_line(tmp_path, mutate, msg):
    folder = write_cifar10(tmp_path)
    f = folder / "test_batch"
    f.write_bytes(mutate(f.read_bytes()))
    with pytest.raises(BenchError, match=msg) as e:
        load(data_dir=tmp_path, clients=5)
    assert "\n" not in str(e.value)


def test_release_sized_batch_must_match_the_release_md5(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    # Pretend 40-row batches are the release's size: these files then fail the release md5s.
    monkeypatch.setattr(CI, "CIFAR10", dataclasses.replace(CI.CIFAR10, rows={k: 40 for k in CI.CIFAR10.rows}))
    with pytest.raises(BenchError, match=r"data_batch_1 has the release's 40 rows but not its checksum .*"
                                         r"expected c99cafc152244af753f735de768cd75f"):
        load(data_dir=tmp_path, clients=5)


# -- not found, and downloads ---------------------------------------------------------------------

def test_not_found_says_how_to_get_it(tmp_path):
    with pytest.raises(BenchError) as e:
        load(data_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("CIFAR-10 not found (looked in ")
    for part in ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                 "--data-dir DIR", "cifar10.download=false"):
        assert part in msg
    with pytest.raises(BenchError, match=r"CIFAR-100 not found .*cifar-100-python.tar.gz \(md5 eb9058c3a382ffc7106e4002c42a8d85\)"):
        load("cifar100", data_dir=tmp_path)


def test_download_is_md5_checked_saved_atomically_and_read(tmp_path, monkeypatch):
    tgz = tarball(write_cifar100(tmp_path / "src"), tmp_path / "mirror.tar.gz")
    cfg = CI.Cifar100Config(url=tgz.as_uri())
    # These bytes are not the release: a download of them is refused and nothing stays behind ...
    with pytest.raises(BenchError, match=r"downloaded cifar-100-python.tar.gz has md5 [0-9a-f]{32}, expected "
                                         r"eb9058c3a382ffc7106e4002c42a8d85; discarded"):
        load("cifar100", data_dir=tmp_path / "dl", cfg=cfg, clients=5)
    assert os.listdir(tmp_path / "dl") == []
    # ... and accepted once their md5 is the known one.
    md5 = hashlib.md5(tgz.read_bytes()).hexdigest()
    monkeypatch.setattr(CI, "CIFAR100", dataclasses.replace(CI.CIFAR100, tarball_md5=md5))
    ds = load("cifar100", data_dir=tmp_path / "dl", cfg=cfg, clients=20)  # 20 x 5 = 100 shards, one per class
    assert os.listdir(tmp_path / "dl") == ["cifar-100-python.tar.gz"]
    assert sum(len(c.test_y) for c in ds.clients) == 200


def test_unreachable_url_gives_the_how_to_line(tmp_path):
    cfg = CI.Cifar10Config(url=(tmp_path / "missing.tar.gz").as_uri())
    with pytest.raises(BenchError, match=r"CIFAR-10 not found \(looked in .*\) and the download failed .*: download "
                                         r"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"):
        load(data_dir=tmp_path / "dl", cfg=cfg)
    assert not (tmp_path / "dl" / "cifar-10-python.tar.gz").exists()


def test_corrupt_tarball_is_one_clear_line(tmp_path):
    tgz = tarball(write_cifar10(tmp_path / "src"), tmp_path / "cifar-10-python.tar.gz")
    tgz.write_bytes(tgz.read_bytes()[:-200])
    with pytest.raises(BenchError, match=r"cifar-10-python.tar.gz is corrupt or truncated"):
        load(data_dir=tmp_path, clients=5)
