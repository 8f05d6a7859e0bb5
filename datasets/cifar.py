"""`cifar10` and `cifar100`: CIFAR (Krizhevsky, 2009) from the official "python version" batches.

Layout of the release (https://www.cs.toronto.edu/~kriz/cifar.html):

    cifar-10-python.tar.gz  -> cifar-10-batches-py/data_batch_1..5, test_batch   (10000 rows each)
    cifar-100-python.tar.gz -> cifar-100-python/train (50000 rows), test (10000 rows)

Each batch is a pickle (protocol 2, written by Python 2) of a dict with bytes keys: b"data", a
uint8 array (N, 3072) holding each image as 1024 red, 1024 green, 1024 blue values in row-major
32 x 32 order, and the labels, b"labels" (CIFAR-10) or b"fine_labels" (CIFAR-100, 100 classes),
as a list of ints. Images become float32 in [0, 1] with shape (3, 32, 32).

Pickles can run code when loaded, so batches are read with `BatchUnpickler`, which resolves only
the globals a batch holds (numpy's array reconstruction: `_reconstruct`, `ndarray`, `dtype`, the
last refusing object dtypes); any other global (os.system, builtins.eval, ...) is a BenchError
before anything is called. `encoding="bytes"` reads Python 2 str as bytes, as the release needs.

Looked for, in order, in --data-dir, $BENCH_DATA_DIR and <cache dir>/data: the extracted folder
(`cifar-10-batches-py/`), the batches directly in the directory, or the release tarball (read in
place, never extracted); else the tarball is downloaded (`cifar10.download`, `cifar10.url`) into the
first of --data-dir, $BENCH_DATA_DIR, <cache dir>/data, and kept only if its md5 matches the
release's (TARBALL_MD5, published on the page above). A batch with the release's row count must
match the release's md5 (BATCH_MD5, as torchvision lists them); other sizes are custom sets in the
same format (as the tests write), checked for structure only.

Defaults follow FeDEQ's CIFAR setup (reference code github.com/longtanle/FeDEQ: `--num_clients 100`
in runners/cifar10/main.sh and runners/cifar100/main.sh, `--labels_per_client 5` by default in
utils/options.py, partitioned by FedRep's shard sampler): 100 clients, `shards:5`; models ResNet-34
for the baselines and DEQ-ResNet-M for FeDEQ (the reference README's table).
"""
from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.files import decode_error, one_line, open_input, read_bytes, require_dir, require_file
from fedeq_bench.datasets import cache
from fedeq_bench.datasets.base import DataArgs, FederatedDataset, register_dataset
from fedeq_bench.datasets.partition import centralised_spec, federate

DEFAULT_CLIENTS = 100
DEFAULT_PARTITION = "shards:5"
MODELS = {"explicit": "resnet34", "deq": "deq_resnet_m"}


@dataclass(frozen=True)
class Release:
    title: str
    num_classes: int
    folder: str
    tarball: str
    url: str
    tarball_md5: str
    label_key: bytes
    train: tuple[str, ...]
    test: tuple[str, ...]
    rows: dict[str, int]
    """Rows per batch in the release; a batch of this size must match its md5."""
    md5: dict[str, str]


CIFAR10 = Release(
    "CIFAR-10", 10, "cifar-10-batches-py", "cifar-10-python.tar.gz",
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", b"labels",
    tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
    {**{f"data_batch_{i}": 10000 for i in range(1, 6)}, "test_batch": 10000},
    {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
)
CIFAR100 = Release(
    "CIFAR-100", 100, "cifar-100-python", "cifar-100-python.tar.gz",
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", b"fine_labels",
    ("train",), ("test",), {"train": 50000, "test": 10000},
    {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
)


@dataclass(frozen=True)
class Cifar10Config:
    """Options of the `cifar10` dataset (`--set cifar10.download=false`)."""

    download: bool = True
    """Download the release tarball when the batches are found nowhere; false: fail with how to get them."""
    url: str = CIFAR10.url
    """Where the tarball is downloaded from (a mirror, or file:///PATH for a local copy); md5-checked."""


@dataclass(frozen=True)
class Cifar100Config:
    """Options of the `cifar100` dataset (`--set cifar100.download=false`)."""

    download: bool = True
    """Download the release tarball when the batches are found nowhere; false: fail with how to get them."""
    url: str = CIFAR100.url
    """Where the tarball is downloaded from (a mirror, or file:///PATH for a local copy); md5-checked."""


# -- restricted unpickling ------------------------------------------------------------------------

def _safe_dtype(*args):
    d = np.dtype(*args)
    if d.hasobject:  # an object array could hold anything the pickle builds; batches are uint8
        raise pickle.UnpicklingError(f"object dtype {d} (a CIFAR batch holds only uint8 data)")
    return d


def _allowed() -> dict[tuple[str, str], object]:
    reconstruct = np.zeros(0).__reduce__()[0]  # numpy's own _reconstruct, whatever module holds it
    return {
        # Python 2 numpy wrote numpy.core.multiarray; numpy >= 2 writes numpy._core.multiarray.
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _safe_dtype,
    }


class RefusedGlobal(BenchError):
    """A pickle asked for a global a CIFAR batch never holds."""


class BatchUnpickler(pickle.Unpickler):
    """Unpickler whose `find_class` resolves only numpy's array reconstruction (see module docstring)."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self.source = source
        self.allowed = _allowed()

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise RefusedGlobal(
                f"{self.source} asks to load {module}.{name}, which a CIFAR batch never holds; refusing it "
                "(a tampered or foreign pickle): replace the file with the official release"
            ) from None


def load_batch(data: bytes, source: str) -> dict:
    try:
        obj = BatchUnpickler(io.BytesIO(data), source).load()
    except RefusedGlobal:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of a (restricted) unpickler on bad bytes
        raise BenchError(f"{source} is not a readable CIFAR batch, corrupt or truncated "
                         f"({type(e).__name__}: {one_line(e)})") from None
    if not isinstance(obj, dict):
        raise BenchError(f"{source} holds a {type(obj).__name__}, not a CIFAR batch dict")
    return obj


def parse_batch(data: bytes, source: str, rel: Release, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) of one batch file's bytes, checked."""
    batch = load_batch(data, source)
    x, y = batch.get(b"data"), batch.get(rel.label_key)
    if x is None or y is None:
        keys = ", ".join(sorted(repr(k) for k in batch))
        raise BenchError(f"{source} lacks b'data' or {rel.label_key!r} (has {keys}); is it a {rel.title} batch?")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise BenchError(f"{source}: b'data' is {desc}, expected uint8 (N, 3072)")
    try:
        y = np.asarray(y)
    except Exception:  # noqa: BLE001
        y = np.asarray([], dtype=object)
    if y.dtype.kind not in "iu" or y.shape != (len(x),):
        raise BenchError(f"{source}: {rel.label_key!r} must be {len(x)} integers, got {y.dtype} {y.shape}")
    if len(y) == 0:
        raise BenchError(f"{source} holds no samples")
    if y.min() < 0 or y.max() >= rel.num_classes:
        raise BenchError(f"{source}: labels must be in 0..{rel.num_classes - 1}, found {int(y.min())}..{int(y.max())}")
    if len(x) == rel.rows[name]:
        digest = hashlib.md5(data).hexdigest()
        if digest != rel.md5[name]:
            raise BenchError(f"{source} has the release's {len(x)} rows but not its checksum (md5 {digest}, "
                             f"expected {rel.md5[name]}); the file is corrupt: replace it")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


# -- finding or fetching --------------------------------------------------------------------------

def _names(rel: Release) -> tuple[str, ...]:
    return rel.train + rel.test


def find(rel: Release, data_dir: str | None) -> tuple[str, Path] | None:
    """("dir", folder) holding every batch, or ("tar", tarball), from the search dirs; None if neither."""
    for d in cache.data_dirs(data_dir) + [cache.cache_dir() / "data"]:
        own = d / rel.folder
        if own.exists():
            # The release's own folder: a part missing or of the wrong kind is an error naming it, not a
            # reason to fall through to another copy (or a download).
            require_dir(own, f"{rel.title} folder", f"the release's {rel.folder}/ of batch files")
            present = [n for n in _names(rel) if (own / n).exists() or (own / n).is_symlink()]
            for n in present:
                require_file(own / n, f"{rel.title} batch", f"a {rel.title} python batch file")
            if present and len(present) < len(_names(rel)):
                missing = ", ".join(n for n in _names(rel) if n not in present)
                raise BenchError(f"{own} lacks {missing}; {how_to_get(rel)}")
            if present:
                return "dir", own
        # Batches directly in d: only when all are there (`train`, `test` are common names).
        if all((d / n).is_file() for n in _names(rel)):
            return "dir", d
        tar = d / rel.tarball
        if tar.exists() or tar.is_symlink():
            return "tar", Path(require_file(tar, f"{rel.title} tarball", f"the release's {rel.tarball}"))
    return None


def read_files(rel: Release, kind: str, path: Path) -> dict[str, tuple[bytes, str]]:
    """{batch name: (bytes, where it came from)} from a folder or the release tarball."""
    out = {}
    if kind == "dir":
        for n in _names(rel):
            out[n] = (read_bytes(path / n, f"{rel.title} batch", f"a {rel.title} python batch file"), str(path / n))
        return out
    member = ""
    try:
        with open_input(path, f"{rel.title} tarball", f"the release's {rel.tarball}") as raw, \
                tarfile.open(fileobj=raw, mode="r:gz") as tf:
            for n in _names(rel):
                member = f"{rel.folder}/{n}"
                f = tf.extractfile(member)  # read in place: nothing is written, so no path tricks
                if f is None:
                    raise KeyError(member)
                out[n] = (f.read(), f"{path}:{member}")
    except KeyError:  # tarfile's own says "filename '...' not found": name the member once
        raise BenchError(f"{path} lacks {member}; is it the {rel.title} python tarball?") from None
    except OSError as e:
        if e.errno is None:  # gzip's BadGzipFile: the bytes, not the system
            raise BenchError(f"{path} is corrupt or truncated ({type(e).__name__}: {one_line(e)})") from None
        raise decode_error(e, path, f"{rel.title} tarball", f"the release's {rel.tarball}") from None
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise BenchError(f"{path} is corrupt or truncated ({type(e).__name__}: {one_line(e)})") from None
    return out


def how_to_get(rel: Release) -> str:
    return (f"download {rel.url} (md5 {rel.tarball_md5}) into a directory DIR (as is, or extracted) "
            f"and pass --data-dir DIR")


def locate(rel: Release, cfg, data_dir: str | None) -> tuple[str, Path]:
    hit = find(rel, data_dir)
    if hit:
        return hit
    looked = ", ".join(str(d) for d in cache.data_dirs(data_dir) + [cache.cache_dir() / "data"])
    name = rel.title.lower().replace("-", "")
    if not cfg.download:
        raise BenchError(f"{rel.title} not found (looked in {looked}; {name}.download=false): {how_to_get(rel)}")
    dest = cache.download_dir(data_dir) / rel.tarball

    def verify(tmp: Path) -> None:
        digest = cache.file_digest(tmp, "md5")
        if digest != rel.tarball_md5:
            raise BenchError(f"downloaded {rel.tarball} has md5 {digest}, expected {rel.tarball_md5}; discarded "
                             f"(a broken mirror or transfer): retry, or {how_to_get(rel)}")

    try:
        cache.fetch(cfg.url, dest, verify)
    except cache.DownloadError as e:
        raise BenchError(f"{rel.title} not found (looked in {looked}) and the download failed ({e}): {how_to_get(rel)}") from None
    except OSError as e:
        raise BenchError(f"cannot save {rel.tarball} to {dest.parent} ({e}): {how_to_get(rel)}") from None
    return "tar", dest


def read_release(rel: Release, cfg, data_dir: str | None):
    """((train_x, train_y), (test_x, test_y)) as uint8 (N, 3, 32, 32) and int64 (N,)."""
    kind, path = locate(rel, cfg, data_dir)
    files = read_files(rel, kind, path)

    def stack(names):
        xs, ys = zip(*(parse_batch(*files[n], rel, n) for n in names), strict=True)
        return np.concatenate(xs), np.concatenate(ys)

    return stack(rel.train), stack(rel.test)


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 (n, 3, 32, 32) -> float32 in [0, 1]."""
    return images.astype(np.float32) / np.float32(255.0)


def _load(rel: Release, name: str, cfg, args: DataArgs) -> FederatedDataset:
    centralised_spec(name, args.partition, DEFAULT_PARTITION)  # a bad spec fails before 160 MB are read
    train, test = read_release(rel, cfg, args.data_dir)
    return federate(name, train, test, rel.num_classes, args, DEFAULT_PARTITION, DEFAULT_CLIENTS, to_float, MODELS)


@register_dataset("cifar10", Cifar10Config)
def load_cifar10(cfg: Cifar10Config, args: DataArgs) -> FederatedDataset:
    """CIFAR-10 over `args.clients` clients (100 if None) by `args.partition` (shards:5 if None)."""
    return _load(CIFAR10, "cifar10", cfg, args)


@register_dataset("cifar100", Cifar100Config)
def load_cifar100(cfg: Cifar100Config, args: DataArgs) -> FederatedDataset:
    """CIFAR-100 (fine labels) over `args.clients` clients (100 if None) by `args.partition` (shards:5 if None)."""
    return _load(CIFAR100, "cifar100", cfg, args)
