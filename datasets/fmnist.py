"""`fmnist`: Fashion-MNIST (Xiao, Rasul & Vollgraf, arXiv 1708.07747), partitioned over clients.

Four IDX files, each optionally gzipped (`NAME` or `NAME.gz`):

    train-images-idx3-ubyte   magic 0x00000803, dims (60000, 28, 28), uint8 pixels
    train-labels-idx1-ubyte   magic 0x00000801, dims (60000,), uint8 labels 0..9
    t10k-images-idx3-ubyte    (10000, 28, 28)
    t10k-labels-idx1-ubyte    (10000,)

Looked for, in order, in: --data-dir (and its `fashion-mnist/` subfolder), $BENCH_DATA_DIR (same),
/usr/share/datasets/fashion-mnist (Debian/Ubuntu: `apt-get install dataset-fashion-mnist`), and
<cache dir>/data/fashion-mnist (earlier downloads); else downloaded from the release's own mirror
(`fmnist.download`, `fmnist.url`) into the first of --data-dir, $BENCH_DATA_DIR, <cache dir>/data.

Integrity: every file is parsed strictly (magic number, dims, exact payload length, gzip CRC), so a
truncated or corrupt file is a one-line BenchError. A file with the release's dims must also match
the release's sha256 (RAW_SHA256, over the decompressed bytes; Debian recompressed the .gz files, so
their .gz md5s differ from upstream's but the payload is identical). A file with other dims is taken
as a custom set in the same format (as the tests write). A download must match either upstream's .gz
md5 (GZ_MD5, from the release README) or, decompressed, RAW_SHA256; otherwise it is discarded.

Images become float32 in [0, 1] with shape (1, 28, 28); 10 classes.

Defaults: FeDEQ (Le et al., CIKM 2024) does not run Fashion-MNIST (its reference code,
github.com/longtanle/FeDEQ, reads FEMNIST, CIFAR-10/100 and Shakespeare only), so there is no paper
setup to mirror. The default partition is `dirichlet:0.5` (a moderate label skew widely used in
personalized-FL work, e.g. NIID-Bench) over 50 clients (1200 train samples per client on average);
`--partition shards:2` gives the pathological 2-classes-per-client split (50 x 2 = 100 shards of
600 samples). Models: `cnn` for the baselines, `deq_mlp` for FeDEQ (the DEQ-MLP the paper pairs with
small inputs; `--model deq_resnet_s` for a convolutional DEQ).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.files import one_line, read_bytes, require_file
from fedeq_bench.core.ranges import ranged
from fedeq_bench.datasets import cache
from fedeq_bench.datasets.base import DataArgs, FederatedDataset, register_dataset
from fedeq_bench.datasets.partition import centralised_spec, federate

NUM_CLASSES = 10
DEFAULT_CLIENTS = 50
DEFAULT_PARTITION = "dirichlet:0.5"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's `dataset-fashion-mnist` package installs the four .gz files."""
SUBDIR = "fashion-mnist"
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
"""The release's download location (its README's links; the S3 website endpoint is http only;
integrity comes from the checksums below, not the transport)."""

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
RELEASE_DIMS = {
    "train-images-idx3-ubyte": (60000, 28, 28),
    "train-labels-idx1-ubyte": (60000,),
    "t10k-images-idx3-ubyte": (10000, 28, 28),
    "t10k-labels-idx1-ubyte": (10000,),
}
GZ_MD5 = {
    # github.com/zalandoresearch/fashion-mnist README, "Get the Data" (also torchvision's).
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
RAW_SHA256 = {
    # sha256 of the decompressed files; computed from Debian's dataset-fashion-mnist
    # (0.0~git20200523.55506a9-1), whose decompressed md5s (f4a8712d..., 9018921c..., 8181f547...,
    # 15d48437...) equal the raw md5s published for the release (e.g. torchvision's `raw` list).
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

EXPECTED = "an IDX file of Fashion-MNIST's format, optionally gzipped (NAME or NAME.gz)"

HOW_TO_GET = (
    "install Debian/Ubuntu's package (sudo apt-get install dataset-fashion-mnist), or download "
    f"{', '.join(f + '.gz' for f in FILES)} from {URL} into a directory DIR and pass --data-dir DIR"
)


@dataclass(frozen=True)
class FmnistConfig:
    """Options of the `fmnist` dataset (`--set fmnist.download=false`)."""

    download: bool = True
    """Download the four files when they are found nowhere; false: fail with how to get them."""
    url: str = URL
    """Base URL the four `NAME.gz` files are downloaded from (a mirror, or file:///DIR/ for a local copy)."""
    subset: float = ranged(1.0, gt=0, le=1)
    """Fraction of each split used, its first images in the files' order (the release's files are
    in random order), before partitioning: 0.25 keeps 15000 train and 2500 test images, 300 + 50 per
    client over 50 clients (about a FEMNIST writer's count); lowering it makes rounds faster."""


# -- IDX ------------------------------------------------------------------------------------------

_IDX_TYPES = {0x08: np.uint8}  # Fashion-MNIST uses only unsigned bytes (IDX type code 0x08)


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """An IDX file's array: 2 zero bytes, type code, ndims, ndims big-endian uint32 dims, payload."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise BenchError(f"{name} is not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    code, ndim = data[2], data[3]
    if code not in _IDX_TYPES:
        raise BenchError(f"{name}: IDX type code 0x{code:02x} is not unsigned byte (0x08)")
    head = 4 + 4 * ndim
    if ndim == 0 or len(data) < head:
        raise BenchError(f"{name} is truncated: its IDX header declares {ndim} dims but the file has {len(data)} bytes")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    want = int(np.prod(dims, dtype=np.int64))
    got = len(data) - head
    if got < want:
        raise BenchError(f"{name} is truncated: dims {dims} need {want} bytes of data, the file has {got}")
    if got > want:
        raise BenchError(f"{name} has {got - want} bytes after the {want} its dims {dims} declare (corrupt?)")
    return np.frombuffer(data, dtype=_IDX_TYPES[code], offset=head).reshape(dims)


def read_member(path: Path) -> bytes:
    """A file's bytes, decompressed when it ends in .gz (gzip checks its CRC32 and length)."""
    data = read_bytes(path, "Fashion-MNIST file", EXPECTED)  # missing, a folder, unreadable: one line each
    if path.suffix != ".gz":
        return data
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            return f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise BenchError(f"{path} is corrupt or truncated ({type(e).__name__}: {one_line(e)})") from None


def _check_release(name: str, path: Path, arr: np.ndarray, data: bytes) -> None:
    if arr.shape == RELEASE_DIMS[name]:
        digest = hashlib.sha256(data).hexdigest()
        if digest != RAW_SHA256[name]:
            raise BenchError(
                f"{path} has Fashion-MNIST's dims {arr.shape} but not its checksum "
                f"(sha256 {digest[:16]}..., expected {RAW_SHA256[name][:16]}...); the file is corrupt: replace it"
            )


def read_arrays(files: dict[str, Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_images, train_labels, test_images, test_labels) from the four files, checked."""
    out = {}
    for name in FILES:
        path = files[name]
        data = read_member(path)
        arr = parse_idx(data, str(path))
        want_ndim = 3 if "images" in name else 1
        if arr.ndim != want_ndim or (want_ndim == 3 and arr.shape[1:] != (28, 28)):
            raise BenchError(f"{path}: shape {arr.shape}, expected {'(N, 28, 28)' if want_ndim == 3 else '(N,)'}")
        _check_release(name, path, arr, data)
        out[name] = arr
    for split in ("train", "t10k"):
        x, y = out[f"{split}-images-idx3-ubyte"], out[f"{split}-labels-idx1-ubyte"]
        if len(x) != len(y):
            raise BenchError(f"{files[split + '-images-idx3-ubyte']} has {len(x)} images but "
                             f"{files[split + '-labels-idx1-ubyte']} has {len(y)} labels")
        if len(y) == 0:
            raise BenchError(f"{files[split + '-labels-idx1-ubyte']} holds no samples")
        if y.max() >= NUM_CLASSES:
            raise BenchError(f"{files[split + '-labels-idx1-ubyte']} has label {int(y.max())}; "
                             f"Fashion-MNIST labels are 0..{NUM_CLASSES - 1}")
    return tuple(out[n] for n in FILES)  # type: ignore[return-value]


# -- finding or fetching the files ----------------------------------------------------------------

def _in_dir(d: Path) -> dict[str, Path] | None:
    """The four files in `d` (each as NAME or NAME.gz), or None when none of them is there. Some but
    not all, or one that is not a file (a folder of that name), is an error naming them: taking
    another copy of the data instead would hide the mistake."""
    found = {}
    for name in FILES:
        for cand in (d / name, d / f"{name}.gz"):
            if cand.exists() or cand.is_symlink():
                found[name] = Path(require_file(cand, "Fashion-MNIST file", EXPECTED))
                break
    if found and len(found) < len(FILES):
        missing = [n for n in FILES if n not in found]
        raise BenchError(f"{d} holds {len(found)} of the 4 Fashion-MNIST files but not {', '.join(missing)} "
                         f"(as NAME or NAME.gz): add them, or {HOW_TO_GET}")
    return found or None


def search_dirs(data_dir: str | None) -> list[Path]:
    dirs = []
    for d in cache.data_dirs(data_dir):
        dirs += [d, d / SUBDIR]
    return dirs + [Path(DEBIAN_DIR), cache.cache_dir() / "data" / SUBDIR]


def _verify_download(name: str):
    def verify(tmp: Path) -> None:
        if cache.file_digest(tmp, "md5") == GZ_MD5[name]:
            return
        try:
            with gzip.open(tmp, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        except (OSError, EOFError, zlib.error):
            digest = None
        if digest != RAW_SHA256[name]:
            raise BenchError(
                f"downloaded {name}.gz matches neither the release's md5 {GZ_MD5[name]} nor its payload sha256; "
                "discarded (a broken mirror or transfer): retry, or " + HOW_TO_GET
            )
    return verify


def locate(data_dir: str | None, cfg: FmnistConfig) -> dict[str, Path]:
    """The four files: found in the search dirs, or downloaded; else a one-line how-to-get-it error."""
    dirs = search_dirs(data_dir)
    for d in dirs:
        found = _in_dir(d)
        if found:
            return found
    looked = ", ".join(str(d) for d in dirs)
    if not cfg.download:
        raise BenchError(f"Fashion-MNIST not found (looked in {looked}; fmnist.download=false): {HOW_TO_GET}")
    dest = cache.download_dir(data_dir) / SUBDIR
    base = cfg.url if cfg.url.endswith("/") else cfg.url + "/"
    try:
        for name in FILES:
            target = dest / f"{name}.gz"
            if not target.is_file():
                cache.fetch(base + f"{name}.gz", target, _verify_download(name))
    except cache.DownloadError as e:
        raise BenchError(f"Fashion-MNIST not found (looked in {looked}) and the download failed ({e}): {HOW_TO_GET}") from None
    except OSError as e:
        raise BenchError(f"cannot save Fashion-MNIST to {dest} ({e}): {HOW_TO_GET}") from None
    return {name: dest / f"{name}.gz" for name in FILES}


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 (n, 28, 28) -> float32 (n, 1, 28, 28) in [0, 1]."""
    return (images.astype(np.float32) / np.float32(255.0))[:, None, :, :]


@register_dataset("fmnist", FmnistConfig)
def load_fmnist(cfg: FmnistConfig, args: DataArgs) -> FederatedDataset:
    """Fashion-MNIST over `args.clients` clients (50 if None) by `args.partition` (dirichlet:0.5 if None)."""
    centralised_spec("fmnist", args.partition, DEFAULT_PARTITION)  # a bad spec fails before 30 MB are read
    x_tr, y_tr, x_te, y_te = read_arrays(locate(args.data_dir, cfg))
    n_tr, n_te = kept(len(y_tr), cfg.subset), kept(len(y_te), cfg.subset)
    return federate(
        "fmnist", (x_tr[:n_tr], y_tr[:n_tr].astype(np.int64)), (x_te[:n_te], y_te[:n_te].astype(np.int64)),
        NUM_CLASSES, args, DEFAULT_PARTITION, DEFAULT_CLIENTS, to_float, {"explicit": "cnn", "deq": "deq_mlp"},
        note="" if cfg.subset == 1 else f"subset={cfg.subset!r}",
    )


def kept(n: int, subset: float) -> int:
    """How many of a split's `n` images `subset` keeps: round(subset * n), at least 1."""
    return max(1, round(subset * n))
