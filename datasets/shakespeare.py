"""`shakespeare`: next-character prediction, one client per speaking role (LEAF).

Reference: S. Caldas, S. M. K. Duddu, P. Wu, T. Li, J. Konecny, H. B. McMahan, V. Smith,
A. Talwalkar, "LEAF: A Benchmark for Federated Settings", arXiv 1812.01097; code:
github.com/TalwalkarLab/leaf, `data/shakespeare/preprocess/` (role parsing, `shake_utils.py`),
`data/utils/split_data.py` and `models/utils/language_utils.py` (the vocabulary). The task is the
one of McMahan et al. (AISTATS 2017) and the FeDEQ paper (Le et al., CIKM 2024, arXiv 2309.15659).

Two sources, both read offline:

* raw play text in the `ROLE:` form (tiny Shakespeare, `tinyshakespeare.txt` of karpathy/char-rnn):
  a line ending in `:` that opens a block (first non-blank line of the file or after a blank
  line) names a role; the lines after it, up to the next blank line, are that role's. Blocks
  whose first line is not such a header are skipped. Role names are upper-cased, as LEAF does
  ("Some character names are written with multiple casings"). This text has no play titles, so
  a name used in several plays (GLOUCESTER) is one client, where LEAF would make one per play.
* LEAF's JSON output: a directory with `train/*.json` and `test/*.json` (`preprocess.sh ... -t
  sample`), taken as LEAF split it, or only `all_data/*.json`, split here by time as below. Each
  file is `{"users": [...], "num_samples": [...], "user_data": {u: {"x": [80-char strings], "y":
  [1-char strings]}}}`; files are read in name order and a user's entries merged in that order.

From a role's lines to samples, as LEAF's `shake_utils.__txt_to_data` (the version that reads
a role's whole file): the lines are written one per line, then every newline becomes a space and
every run of two or more spaces becomes one space. So a role's text is its lines joined by single
spaces, plus a trailing space:

    text = collapse_spaces(" ".join(lines) + " ")
    window i = (x = text[i : i + 80], y = text[i + 80]),  i = 0 .. len(text) - 81  (stride 1)

giving n = len(text) - 80 windows (a role with a 100-character text has 100 - 80 = 20).

Targets (`targets`): `all` (default) labels every position, y = text[i + 1 : i + 81], shape
(N, 80), the FeDEQ reference's form (its transformers predict every position; loss and accuracy
are over all 80 positions, methods/train.py); `last` labels the next character only,
y = text[i + 80], shape (N,), LEAF's form. The `all` label's last column is the `last` label,
so both forms see the same windows and the same split.

Vocabulary: LEAF's ALL_LETTERS (80 symbols: newline, space, punctuation, digits, letters), with
id = ALL_LETTERS.index(c) + 1 (1..80), so that id 0 stays PADDING, which the transformers mask out
of attention (methods/nets/transformer.py: PAD = 0); a window of real text never contains 0. A
character outside ALL_LETTERS (e.g. `$` in tiny Shakespeare) gets UNK = 81, where LEAF's
`str.find` would give -1. Ids 82..89 are unused; the model's vocabulary is 90, the FeDEQ paper's,
so every id is < num_classes = 90. x holds the 80 ids as float32 (the harness's feature dtype;
the models cast back to long), y the target ids as int64 (see Targets).

Per-role train/test split by time (the FedAvg paper's Shakespeare split, first lines train, last
lines test; LEAF's current `split_data.py` draws train samples at random instead, which leaks:
neighbouring windows share 79 characters). With n windows and LEAF's arithmetic
n_train = int(train_frac * n):

    train windows  i = 0 .. n_train - 1
    dropped        i = n_train .. n_train + 79    (80 windows straddling the boundary)
    test windows   i = n_train + 80 .. n - 1       (n_test = n - n_train - 80)

so no test window contains a character of the training text text[0 : n_train + 80] (the last
train window's target is text[n_train - 1 + 80]). The same rule splits LEAF's `all_data` windows,
which LEAF writes in text order.

A role is kept when n_train + n_test >= `min_samples` and both sides are non-empty (with
train_frac 0.8 that needs n >= 405: 0.2 n must exceed the 80-window gap). Roles are ranked by
n_train + n_test, largest first, ties by name; with `DataArgs.clients = K` the first K are the
clients, in that order (client 0 is the largest role). Then each kept side is capped so a client
has at most `max_samples_per_client` samples: the cap is shared between the sides in proportion to
their sizes (cap_train = int(cap * n_train / (n_train + n_test)), kept in [1, cap - 1]) and each
side keeps k of its m windows evenly spaced in time, window j of k being number floor(j * m / k):
the whole role is still represented, and test windows still all come after train windows.
`build_federated` then carves each client's validation split from its train windows.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.files import read_text, require_file
from fedeq_bench.core.ranges import ranged
from fedeq_bench.datasets.base import DataArgs, FederatedDataset, build_federated, register_dataset
from fedeq_bench.datasets.leaf import find_source, leaf_layout, merge, rank_users, read_leaf_files, read_split
from fedeq_bench.datasets.partition import require_natural

SEQ_LEN = 80
"""Characters in a window (LEAF's seq_length)."""
LEAF_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
"""LEAF's ALL_LETTERS (models/utils/language_utils.py), 80 symbols; character c has id index + 1."""
PAD = 0
"""Padding id, masked by the transformers; never produced for real text."""
UNK = len(LEAF_LETTERS) + 1
"""Id of any character outside LEAF_LETTERS (81)."""
VOCAB_SIZE = 90
"""num_classes of the task: the FeDEQ paper's vocabulary size (ids 82..89 unused)."""
DATA_FILE = "tinyshakespeare.txt"
"""Raw play text looked for in data directories when `path` is empty."""

_LUT = np.full(256, UNK, dtype=np.int64)
for _i, _c in enumerate(LEAF_LETTERS):
    _LUT[ord(_c)] = _i + 1
_SPACES = re.compile(r"  +")  # LEAF: re.sub(r"   *", r' ', raw_text), i.e. 2+ spaces -> 1
_HEADER = re.compile(r"\S[^:]*:")  # `ROLE:` alone on its line, no other colon


@dataclass(frozen=True)
class ShakespeareConfig:
    """Options of the `shakespeare` dataset (`--set shakespeare.max_samples_per_client=500`)."""

    path: str = ""
    """Raw play text (`ROLE:` lines) or a LEAF shakespeare data directory (train/ and test/, or
    all_data/); also `--dataset shakespeare:PATH`. Empty: look for tinyshakespeare.txt or a LEAF
    `shakespeare/` directory in DataArgs.data_dir, then $BENCH_DATA_DIR. A relative path is looked
    up in DataArgs.data_dir first."""
    min_samples: int = ranged(64, ge=2)
    """Drop roles with fewer train + test windows (LEAF's `-k`); raising it keeps fewer, larger
    roles. Must be >= 2."""
    max_samples_per_client: int = ranged(2000, ge=0)  # and 0 or >= min_samples: _validate
    """Cap on a client's train + test windows, evenly spaced in time (0: no cap, LEAF's full
    stride-1 data); lowering it makes rounds faster. Must be 0 or >= min_samples."""
    targets: str = "all"
    """`all`: one label per position, y = the window shifted by one character, (N, 80): position t
    predicts the character after x[t], as the FeDEQ reference trains its transformers (per-token
    loss and accuracy over all 80 positions). `last`: LEAF's next character only, y of shape (N,)."""
    train_frac: float = ranged(0.8, gt=0, lt=1)
    """Fraction of a role's windows in its training split (the first ones in time; the FedAvg
    paper's 0.8); raising it gives more training and fewer test windows. Must be in (0, 1).
    Not used for LEAF train/test directories, which are already split."""


# -- vocabulary -----------------------------------------------------------------------------------

def encode(text: str) -> np.ndarray:
    """Token ids (int64) of `text`: LEAF_LETTERS[k] -> k + 1, anything else -> UNK."""
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)  # a lone surrogate -> UNK
    return np.where(codes < 256, _LUT[np.minimum(codes, 255)], UNK)


def decode(ids) -> str:
    """Inverse of `encode` for ids 1..80; PAD decodes to nothing, any other id to U+FFFD."""
    out = []
    for i in np.asarray(ids, dtype=np.int64).ravel():
        if i == PAD:
            continue
        out.append(LEAF_LETTERS[i - 1] if 1 <= i <= len(LEAF_LETTERS) else "\ufffd")
    return "".join(out)


# -- raw play text --------------------------------------------------------------------------------

def parse_play(text: str) -> dict[str, list[str]]:
    """Role (upper-cased) -> its lines in order, from `ROLE:` blocks separated by blank lines."""
    roles: dict[str, list[str]] = {}
    current: list[str] | None = None
    at_block_start = True
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            current, at_block_start = None, True
            continue
        if at_block_start:
            at_block_start = False
            if _HEADER.fullmatch(line.rstrip()):
                current = roles.setdefault(line.rstrip()[:-1].strip().upper(), [])
                continue
            current = None  # a block without a header: not any role's text
        if current is not None:
            current.append(line)
    return roles


def role_text(lines: list[str]) -> str:
    """LEAF's text of a role: each line then a newline, newlines -> spaces, 2+ spaces -> one."""
    return _SPACES.sub(" ", "".join(line + "\n" for line in lines).replace("\n", " "))


# -- the split and the cap ------------------------------------------------------------------------

def time_split(n: int, train_frac: float) -> tuple[range, range]:
    """(train, test) window indices of n windows in time order: the first int(train_frac * n)
    train, then a gap of SEQ_LEN windows, the rest test (see the module docstring)."""
    n_train = int(train_frac * n)
    return range(0, n_train), range(min(n_train + SEQ_LEN, n), n)


def evenly_spaced(m: int, k: int) -> np.ndarray:
    """k of m indices spread over 0..m-1: floor(j * m / k) for j = 0..k-1 (all of them if k >= m)."""
    if k >= m:
        return np.arange(m)
    return (np.arange(k, dtype=np.int64) * m) // k


def cap_sizes(n_train: int, n_test: int, cap: int) -> tuple[int, int]:
    """(train, test) windows kept under a cap of `cap` (0: none), shared in proportion to sizes."""
    if cap <= 0 or n_train + n_test <= cap:
        return n_train, n_test
    k_train = min(max(int(cap * n_train / (n_train + n_test)), 1), cap - 1)
    return k_train, cap - k_train


# -- the loader -----------------------------------------------------------------------------------

HOW_TO_GET = (
    "pass raw play text (ROLE: lines, e.g. tiny Shakespeare, karpathy/char-rnn data/tinyshakespeare/input.txt) "
    "or a LEAF directory (github.com/TalwalkarLab/leaf: cd data/shakespeare && ./preprocess.sh -s niid --sf 0.2 "
    "-k 0 -t sample -tf 0.8) with --dataset shakespeare:PATH, --set shakespeare.path=PATH or --data-dir DIR"
)


TARGETS = ("all", "last")


def _validate(cfg: ShakespeareConfig) -> None:
    if cfg.targets not in TARGETS:
        raise BenchError(f"shakespeare.targets must be one of {', '.join(TARGETS)}, got {cfg.targets!r}")
    if not 0.0 < cfg.train_frac < 1.0:
        raise BenchError(f"shakespeare.train_frac must be in (0, 1), got {cfg.train_frac}")
    if cfg.min_samples < 2:
        raise BenchError(f"shakespeare.min_samples must be >= 2 (one train and one test window), got {cfg.min_samples}")
    if cfg.max_samples_per_client != 0 and cfg.max_samples_per_client < cfg.min_samples:
        raise BenchError(
            f"shakespeare.max_samples_per_client must be 0 (no cap) or >= min_samples={cfg.min_samples}, "
            f"got {cfg.max_samples_per_client}"
        )


def _windows_of_strings(x: list, y: list, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One LEAF entry -> (window ids (m, 80), target ids (m,)), int64."""
    for i, (s, t) in enumerate(zip(x, y, strict=True)):
        if not isinstance(s, str) or len(s) != SEQ_LEN:
            got = f"length {len(s)}" if isinstance(s, str) else type(s).__name__
            raise BenchError(f"shakespeare: {where}: x[{i}] must be a {SEQ_LEN}-character string, got {got}")
        if not isinstance(t, str) or len(t) != 1:
            raise BenchError(f"shakespeare: {where}: y[{i}] must be a 1-character string, got {t!r}")
    return encode("".join(x)).reshape(len(y), SEQ_LEN), encode("".join(y))


def _rows(chunks: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """A user's LEAF chunks as (m, 81) rows: 80 window ids, then the target id."""
    x, y = merge(chunks)
    return np.concatenate([x, y[:, None]], axis=1)


def _role_ids(path: str) -> dict[str, np.ndarray]:
    """Role -> token ids of its LEAF text, from a raw play text file."""
    if path.endswith(".json"):
        raise BenchError(f"shakespeare: {path} is a JSON file; pass LEAF's data directory (train/ and test/, or all_data/)")
    raw = read_text(path, "shakespeare: play text", "UTF-8 play text of `ROLE:` blocks (e.g. tinyshakespeare.txt)")
    roles = parse_play(raw)
    if not roles:
        raise BenchError(f"shakespeare: no `ROLE:` header lines in {path}; expected blocks of `ROLE:` then its lines")
    return {role: encode(role_text(lines)) for role, lines in roles.items()}


def _time_sides(rows: np.ndarray, train_frac: float) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) of one role's windows in time order, with the SEQ_LEN gap."""
    tr, te = time_split(len(rows), train_frac)
    return rows[tr.start:tr.stop], rows[te.start:te.stop]


def text_windows(ids: np.ndarray) -> np.ndarray:
    """Every stride-1 window of a text as (n, 81) rows, n = len - 80; a view, not a copy."""
    if len(ids) <= SEQ_LEN:
        return np.empty((0, SEQ_LEN + 1), dtype=np.int64)
    return sliding_window_view(ids, SEQ_LEN + 1)  # row i = text[i : i + 81]


def targets_of(rows: np.ndarray, targets: str) -> np.ndarray:
    """Labels of (m, 81) rows: `all` -> rows[:, 1:] (m, 80), the window shifted by one; `last` ->
    rows[:, 80] (m,), the next character. The last column of `all` is the `last` label."""
    return np.ascontiguousarray(rows[:, 1:] if targets == "all" else rows[:, SEQ_LEN])


@register_dataset("shakespeare", ShakespeareConfig)
def load_shakespeare(cfg: ShakespeareConfig, args: DataArgs) -> FederatedDataset:
    """One client per speaking role, from raw play text or LEAF JSON (see the module docstring)."""
    _validate(cfg)
    require_natural("shakespeare", args.partition)  # one client per speaking role: nothing to partition
    path = find_source(cfg.path, args, "shakespeare", (DATA_FILE, "shakespeare"), HOW_TO_GET)

    # Every role's (train rows, test rows), rows being (m, 81): 80 window ids, then the target.
    sides: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if os.path.isfile(path):
        source = "text"
        for role, ids in _role_ids(path).items():
            sides[role] = _time_sides(text_windows(ids), cfg.train_frac)
    else:
        if not os.path.isdir(path):  # a device or a pipe: neither play text nor a LEAF folder
            require_file(path, "shakespeare data", "play text (a file) or a LEAF folder")
        layout, files = leaf_layout(path, "shakespeare")
        if layout == "split":
            for user, (train, test) in read_split(files, "shakespeare", _windows_of_strings).items():
                sides[user] = (_rows(train), _rows(test))
            source = "leaf"
        else:
            every = read_leaf_files(files["all"], "shakespeare", _windows_of_strings)
            for user, chunks in every.items():
                sides[user] = _time_sides(_rows(chunks), cfg.train_frac)
            source = "leaf-all"

    sizes = {
        role: len(tr) + len(te)
        for role, (tr, te) in sides.items()
        if len(tr) >= 1 and len(te) >= 1 and len(tr) + len(te) >= cfg.min_samples
    }
    if not sizes:
        raise BenchError(
            f"shakespeare: no role in {path!r} has >= min_samples={cfg.min_samples} windows with both a train "
            f"and a test window (a role needs about {SEQ_LEN / (1 - cfg.train_frac):.0f}+ windows for the time split)"
        )
    chosen = rank_users(sizes, args.clients, "shakespeare", f"roles with >= {cfg.min_samples} windows")

    raw = []
    for role in chosen:
        tr, te = sides[role]
        k_tr, k_te = cap_sizes(len(tr), len(te), cfg.max_samples_per_client)
        tr, te = tr[evenly_spaced(len(tr), k_tr)], te[evenly_spaced(len(te), k_te)]
        raw.append((tr[:, :SEQ_LEN].astype(np.float32), targets_of(tr, cfg.targets),
                    te[:, :SEQ_LEN].astype(np.float32), targets_of(te, cfg.targets)))
    return build_federated(
        "shakespeare",
        raw,
        VOCAB_SIZE,
        args,
        partition=(f"shakespeare(natural,roles={len(raw)},source={source},cap={cfg.max_samples_per_client}"
                   + (",targets=last)" if cfg.targets == "last" else ")")),
        default_models={"explicit": "transformer8", "deq": "deq_transformer"},
    )
