"""datasets/fmnist.py: IDX parsing, where the files are looked for, verified downloads (file:// URLs,
never the internet), and the loaded federation, on a small generated IDX set and on the real
Fashion-MNIST from Debian's `dataset-fashion-mnist` when it is installed."""
from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from fedeq_bench.core.errors import BenchError
from fedeq_bench.datasets import DataArgs, get_dataset
from fedeq_bench.datasets import fmnist as F

DEBIAN = Path(F.DEBIAN_DIR)
HAVE_DEBIAN = all((DEBIAN / f"{n}.gz").is_file() for n in F.FILES)
needs_debian = pytest.mark.skipif(not HAVE_DEBIAN, reason=f"Fashion-MNIST not installed at {DEBIAN} "
                                  "(apt-get install dataset-fashion-mnist)")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Cache in tmp, no $BENCH_DATA_DIR; tests that must not see the Debian copy patch DEBIAN_DIR."""
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX: 0, 0, type 0x08 (ubyte), ndim, then each dim as big-endian uint32, then the bytes."""
    return bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes() + arr.astype(np.uint8).tobytes()


def make_images(n: int, pool: int) -> np.ndarray:
    """Images that carry their own id: pixel (0,0) = id % 256, (0,1) = id // 256, (0,2) = pool (0 train, 255 test)."""
    ids = np.arange(n)
    x = np.random.default_rng(pool).integers(0, 256, (n, 28, 28)).astype(np.uint8)
    x[:, 0, 0], x[:, 0, 1], x[:, 0, 2] = ids % 256, ids // 256, pool
    return x


def write_idx_set(d, n_train=300, n_test=100, gz=True) -> Path:
    """The four files in `d`; label = id % 10, so 300 train = 30 per class, 100 test = 10 per class."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": make_images(n_train, 0), "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": make_images(n_test, 255), "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for name, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            with gzip.open(d / f"{name}.gz", "wb") as f:
                f.write(data)
        else:
            (d / name).write_bytes(data)
    return d


def decode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, pool flags) back from float images in [0, 1]."""
    px = np.rint(x[:, 0, 0, :3] * 255).astype(np.int64)
    return px[:, 0] + 256 * px[:, 1], px[:, 2]


def load(data_dir=None, cfg=None, **kw):
    return get_dataset("fmnist", cfg or F.FmnistConfig(download=False),
                       DataArgs(**{"seed": 0, "data_dir": None if data_dir is None else str(data_dir), **kw}))


# -- IDX ------------------------------------------------------------------------------------------

def test_parse_idx_round_trip_and_header_arithmetic():
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    data = idx_bytes(arr)
    assert len(data) == 4 + 3 * 4 + 24  # magic + 3 dims x 4 bytes + 2*3*4 payload bytes
    assert data[:4] == b"\x00\x00\x08\x03"  # 0x00000803: ubyte, 3 dims (the images' magic)
    np.testing.assert_array_equal(F.parse_idx(data, "t"), arr)


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d[:-1], r"t is truncated: dims \(2, 3, 4\) need 24 bytes of data, the file has 23"),
    (lambda d: d + b"\x00", r"t has 1 bytes after the 24 its dims \(2, 3, 4\) declare"),
    (lambda d: b"\x1f\x8b" + d[2:], r"t is not an IDX file \(bad magic number 1f8b0803\)"),
    (lambda d: d[:2] + b"\x0d" + d[3:], r"t: IDX type code 0x0d is not unsigned byte"),
    (lambda d: d[:9], r"t is truncated: its IDX header declares 3 dims but the file has 9 bytes"),
    (lambda d: b"", r"t is not an IDX file \(bad magic number empty\)"),
])
def test_parse_idx_rejects_bad_files(mutate, msg):
    with pytest.raises(BenchError, match=msg):
        F.parse_idx(mutate(idx_bytes(np.zeros((2, 3, 4), np.uint8))), "t")


# -- a small generated set ------------------------------------------------------------------------

@pytest.mark.parametrize("gz,sub", [(True, ""), (False, "fashion-mnist")])
def test_generated_set_loads_as_images_in_0_1_and_every_sample_once(tmp_path, gz, sub):
    write_idx_set(tmp_path / sub, gz=gz)  # raw files in the fashion-mnist/ subfolder are found too
    ds = load(tmp_path, clients=5, partition="shards:2")
    assert ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.default_models == {"explicit": "cnn", "deq": "deq_mlp"}
    assert ds.partition.startswith("shards:2(clients=5,seed=0,sha256=")
    train_ids, test_ids = [], []
    for c in ds.clients:
        for x, y, pool, bucket in ((c.train_x, c.train_y, 0, train_ids), (c.val_x, c.val_y, 0, train_ids),
                                   (c.test_x, c.test_y, 255, test_ids)):
            assert x.dtype == np.float32 and x.shape[1:] == (1, 28, 28) and 0 <= x.min() and x.max() <= 1
            ids, flags = decode(x)
            assert np.all(flags == pool)  # train/val from the train file only, test from the test file only
            np.testing.assert_array_equal(y, ids % 10)  # every image kept its own label
            bucket += ids.tolist()
        assert len(set(c.train_y.tolist()) | set(c.val_y.tolist())) <= 2
        assert set(c.test_y.tolist()) <= set(c.train_y.tolist()) | set(c.val_y.tolist())
    assert sorted(train_ids) == list(range(300)) and sorted(test_ids) == list(range(100))


def test_subset_keeps_the_first_images_of_each_split_and_says_so(tmp_path):
    write_idx_set(tmp_path)  # 300 train, 100 test
    ds = load(tmp_path, cfg=F.FmnistConfig(download=False, subset=0.25), clients=5, partition="shards:2")
    train_ids = sorted(i for c in ds.clients for x in (c.train_x, c.val_x) for i in decode(x)[0].tolist())
    test_ids = sorted(i for c in ds.clients for i in decode(c.test_x)[0].tolist())
    assert train_ids == list(range(75)) and test_ids == list(range(25))  # round(0.25 * 300), round(0.25 * 100)
    assert ds.partition.startswith("shards:2(clients=5,seed=0,subset=0.25,sha256=")
    assert F.kept(3, 0.1) == 1  # round(0.3) = 0 -> at least one image


def test_data_dir_comes_before_bench_data_dir(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "env", n_train=200)
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "env"))
    assert sum(len(c.train_y) + len(c.val_y) for c in load(clients=4).clients) == 200
    write_idx_set(tmp_path / "flag", n_train=250)
    assert sum(len(c.train_y) + len(c.val_y) for c in load(tmp_path / "flag", clients=4).clients) == 250


def test_truncated_gzip_is_one_clear_line(tmp_path):
    d = write_idx_set(tmp_path)
    f = d / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-50])
    with pytest.raises(BenchError, match=r"train-images-idx3-ubyte.gz is corrupt or truncated \(EOFError") as e:
        load(d, clients=5)
    assert "\n" not in str(e.value)


def test_truncated_raw_file_is_caught_by_its_dims(tmp_path):
    d = write_idx_set(tmp_path, gz=False)
    f = d / "t10k-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-28])  # one image row short: 100*28*28 = 78400 needed, 78372 there
    with pytest.raises(BenchError, match=r"is truncated: dims \(100, 28, 28\) need 78400 bytes of data, the file has 78372"):
        load(d, clients=5)


def test_image_and_label_counts_must_agree_and_labels_be_0_to_9(tmp_path):
    d = write_idx_set(tmp_path, gz=False)
    (d / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(99) % 10))
    with pytest.raises(BenchError, match=r"has 100 images but .*t10k-labels-idx1-ubyte has 99 labels"):
        load(d, clients=5)
    (d / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(100) % 11))
    with pytest.raises(BenchError, match=r"has label 10; Fashion-MNIST labels are 0..9"):
        load(d, clients=5)


@pytest.mark.parametrize("spec,msg", [
    ("dirichlet:0", r"partition 'dirichlet:0': alpha must be > 0"),
    ("natural", r"dataset 'fmnist' has no natural client split .*use --partition dirichlet:ALPHA or shards:K"),
])
def test_bad_partition_fails_before_reading_anything(tmp_path, monkeypatch, spec, msg):
    # No files anywhere (and no download): the spec error still comes first, since it needs no data.
    monkeypatch.setattr(F, "DEBIAN_DIR", str(tmp_path / "no-debian"))
    with pytest.raises(BenchError, match=msg):
        load(tmp_path, partition=spec)


# -- not found, and downloads ---------------------------------------------------------------------

def test_not_found_says_exactly_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "DEBIAN_DIR", str(tmp_path / "no-debian"))
    with pytest.raises(BenchError) as e:
        load(tmp_path / "empty")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("Fashion-MNIST not found (looked in ")
    for part in (str(tmp_path / "empty"), "sudo apt-get install dataset-fashion-mnist", F.URL, "--data-dir DIR",
                 "fmnist.download=false"):
        assert part in msg


def serve(tmp_path, src: Path) -> str:
    """A file:// base URL for the files in `src` (urllib reads it like an HTTP mirror)."""
    return src.resolve().as_uri() + "/"


def test_download_saves_verified_files_atomically_and_loads_them(tmp_path, monkeypatch):
    mirror = write_idx_set(tmp_path / "mirror")
    monkeypatch.setattr(F, "DEBIAN_DIR", str(tmp_path / "no-debian"))
    # The generated .gz files stand in for the release: their md5s become the known ones.
    monkeypatch.setattr(F, "GZ_MD5", {n: hashlib.md5((mirror / f"{n}.gz").read_bytes()).hexdigest() for n in F.FILES})
    ds = load(cfg=F.FmnistConfig(url=serve(tmp_path, mirror)), clients=5)
    dest = tmp_path / "cache" / "data" / "fashion-mnist"  # no --data-dir, no $BENCH_DATA_DIR
    assert sorted(os.listdir(dest)) == sorted(f"{n}.gz" for n in F.FILES)  # no temp files left
    assert sum(len(c.test_y) for c in ds.clients) == 100
    # A second load finds the downloaded copy (the mirror is gone now).
    for f in mirror.iterdir():
        f.unlink()
    assert load(cfg=F.FmnistConfig(url=serve(tmp_path, mirror)), clients=5).fingerprint == ds.fingerprint


def test_download_that_fails_its_checksum_is_discarded(tmp_path, monkeypatch):
    mirror = write_idx_set(tmp_path / "mirror")
    monkeypatch.setattr(F, "DEBIAN_DIR", str(tmp_path / "no-debian"))
    # Known checksums are the release's, which these generated files do not match.
    with pytest.raises(BenchError, match=r"downloaded train-images-idx3-ubyte.gz matches neither the release's md5 "
                                         r"8d4fb7e6c68d591d4c3dfef9ec88bf0d nor its payload sha256; discarded"):
        load(tmp_path / "target", cfg=F.FmnistConfig(url=serve(tmp_path, mirror)))
    assert os.listdir(tmp_path / "target" / "fashion-mnist") == []  # nothing half-written, no temp file


def test_unreachable_mirror_falls_back_to_the_how_to_line(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "DEBIAN_DIR", str(tmp_path / "no-debian"))
    with pytest.raises(BenchError, match=r"Fashion-MNIST not found \(looked in .*\) and the download failed "
                                         r"\(file://.*train-images-idx3-ubyte.gz: .*\): install Debian") as e:
        load(cfg=F.FmnistConfig(url=(tmp_path / "nowhere").as_uri()))
    assert "\n" not in str(e.value)


# -- the real Fashion-MNIST (Debian package) ------------------------------------------------------

@needs_debian
def test_debian_files_parse_to_the_release():
    x_tr, y_tr, x_te, y_te = F.read_arrays({n: DEBIAN / f"{n}.gz" for n in F.FILES})
    assert x_tr.shape == (60000, 28, 28) and x_te.shape == (10000, 28, 28) and x_tr.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(y_tr), [6000] * 10)  # balanced: 60000 / 10
    np.testing.assert_array_equal(np.bincount(y_te), [1000] * 10)
    assert y_tr[0] == 9 and y_te[0] == 9  # the first image of each file is an ankle boot (class 9)


@needs_debian
def test_debian_fmnist_shards_2_over_50_clients(tmp_path):
    ds = load(clients=50, partition="shards:2")  # no data dir: found at /usr/share/datasets/fashion-mnist
    assert len(ds.clients) == 50 and ds.input_shape == (1, 28, 28)
    # 50 x 2 = 100 shards of 60000 / 100 = 600, each from one class; val = round(0.1 * 1200) = 120.
    assert all(c.num_train == 1080 and len(c.val_y) == 120 for c in ds.clients)
    assert sum(len(c.test_y) for c in ds.clients) == 10000
    for c in ds.clients:
        classes = set(np.unique(np.concatenate([c.train_y, c.val_y])).tolist())
        assert len(classes) <= 2 and set(c.test_y.tolist()) <= classes
        assert c.train_x.dtype == np.float32 and c.train_x.min() >= 0 and c.train_x.max() <= 1


@needs_debian
def test_debian_default_partition_and_clients():
    ds = load()
    assert ds.partition.startswith(f"{F.DEFAULT_PARTITION}(clients={F.DEFAULT_CLIENTS},seed=0,sha256=")
    assert len(ds.clients) == 50 == F.DEFAULT_CLIENTS


@needs_debian
def test_release_sized_file_with_one_changed_byte_fails_its_checksum(tmp_path):
    d = tmp_path / "copy"
    d.mkdir()
    for n in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (d / f"{n}.gz").symlink_to(DEBIAN / f"{n}.gz")
    with gzip.open(DEBIAN / "train-labels-idx1-ubyte.gz") as f:
        data = bytearray(f.read())
    data[8] = 8  # the first label, 9 -> 8: still a valid IDX file with valid labels
    (d / "train-labels-idx1-ubyte").write_bytes(bytes(data))
    with pytest.raises(BenchError, match=r"train-labels-idx1-ubyte has Fashion-MNIST's dims \(60000,\) but not its "
                                         r"checksum .*the file is corrupt: replace it"):
        load(d)


@needs_debian
def test_download_from_a_recompressed_mirror_is_accepted_by_payload_checksum(tmp_path, monkeypatch):
    # Debian's .gz files differ from upstream's (recompressed), so their md5s do not match GZ_MD5; the
    # decompressed bytes match RAW_SHA256, which is what makes them acceptable.
    assert hashlib.md5((DEBIAN / "train-labels-idx1-ubyte.gz").read_bytes()).hexdigest() != F.GZ_MD5["train-labels-idx1-ubyte"]
    monkeypatch.setattr(F, "DEBIAN_DIR", str(tmp_path / "no-debian"))
    ds = load(tmp_path / "target", cfg=F.FmnistConfig(url=DEBIAN.as_uri()), clients=10, partition="shards:1")
    assert sorted(os.listdir(tmp_path / "target" / "fashion-mnist")) == sorted(f"{n}.gz" for n in F.FILES)
    assert sum(len(c.test_y) for c in ds.clients) == 10000
