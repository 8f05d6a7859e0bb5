"""LEAF's JSON layout (github.com/TalwalkarLab/leaf), shared by datasets/shakespeare.py and
datasets/femnist.py: where the files are, reading and checking them, merging a user's chunks,
ranking users into clients, and finding a dataset's source on disk."""
from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np

from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.files import read_text, require_dir
from fedeq_bench.datasets.base import DataArgs
from fedeq_bench.datasets.cache import DATA_ENV, data_dirs

Convert = Callable[[list, list, str], tuple[np.ndarray, np.ndarray]]


def leaf_layout(root: str, dataset: str) -> tuple[str, dict[str, list[str]]]:
    """Where LEAF's JSON files are under `root` (or `root/data`, LEAF's own layout):
    ("split", {"train": files, "test": files}) for `-t sample` output, else ("all", {"all": files})."""

    def jsons(d: str) -> list[str]:
        if not os.path.isdir(d):
            return []
        require_dir(d, f"{dataset}: LEAF folder", "a folder of LEAF .json files")  # an unreadable one: one line
        return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".json"))

    require_dir(root, f"{dataset}: LEAF data folder", "train/ and test/ (or all_data/) of LEAF .json files")

    for base in (root, os.path.join(root, "data")):
        train, test = jsons(os.path.join(base, "train")), jsons(os.path.join(base, "test"))
        if train and test:
            return "split", {"train": train, "test": test}
        if train or test:
            have, missing = ("train", "test") if train else ("test", "train")
            raise BenchError(f"{dataset}: LEAF directory {base!r} has {have}/*.json but no {missing}/*.json")
        every = jsons(os.path.join(base, "all_data"))
        if every:
            return "all", {"all": every}
    raise BenchError(
        f"{dataset}: no LEAF JSON under {root!r}: expected train/*.json and test/*.json, or all_data/*.json"
    )


def read_leaf_files(
    files: list[str], dataset: str, convert: Callable[[list, list, str], tuple[np.ndarray, np.ndarray]]
) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """User -> [(x, y) per file, in file order], from LEAF JSON files.

    `convert(x_list, y_list, where)` checks and converts one user's entry of one file (`where`
    names the file and user for its error messages). Users present in `user_data` but not listed
    in `users` are ignored: LEAF's split_data writes such empty entries for the users it drops.
    """
    out: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for path in files:
        name = os.path.basename(path)
        text = read_text(path, f"{dataset}: LEAF file", "UTF-8 LEAF JSON")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchError(f"{dataset}: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        except RecursionError:  # `[[[[...` nested deeper than the parser goes
            raise BenchError(f"{dataset}: {path} is not LEAF JSON (nested too deeply)") from None
        if not isinstance(doc, dict) or not all(k in doc for k in ("users", "num_samples", "user_data")):
            raise BenchError(f"{dataset}: {path} is not LEAF JSON: expected keys users, num_samples, user_data")
        users, counts, data = doc["users"], doc["num_samples"], doc["user_data"]
        if not isinstance(users, list) or not isinstance(counts, list) or not isinstance(data, dict):
            raise BenchError(f"{dataset}: {path}: users and num_samples must be lists, user_data an object")
        if len(users) != len(counts):
            raise BenchError(f"{dataset}: {path} lists {len(users)} users but {len(counts)} num_samples")
        for user, count in zip(users, counts, strict=True):
            user = str(user)
            where = f"{name}: user {user!r}"
            if user not in data:
                raise BenchError(f"{dataset}: {path}: user {user!r} is in users/num_samples but not in user_data")
            entry = data[user]
            if not isinstance(entry, dict) or not isinstance(entry.get("x"), list) or not isinstance(entry.get("y"), list):
                raise BenchError(f"{dataset}: {where}: user_data entry must have lists x and y")
            x, y = entry["x"], entry["y"]
            if len(x) != len(y):
                raise BenchError(f"{dataset}: {where} has {len(x)} x but {len(y)} y; they must match")
            if isinstance(count, bool) or not isinstance(count, int) or count != len(y):
                raise BenchError(f"{dataset}: {where} has num_samples {count!r} but {len(y)} samples")
            out.setdefault(user, []).append(convert(x, y, where))
    return out


def merge(chunks: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """One user's (x, y) chunks (one per file) concatenated in order."""
    if len(chunks) == 1:
        return chunks[0]
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


def rank_users(sizes: dict[str, int], clients: int | None, dataset: str, what: str) -> list[str]:
    """Users by size, largest first, ties by name; the first `clients` of them (all if None)."""
    ranked = sorted(sizes, key=lambda u: (-sizes[u], u))
    if not ranked:
        raise BenchError(f"{dataset}: no {what} left to make clients of")
    if clients is None:
        return ranked
    if not 1 <= clients <= len(ranked):
        raise BenchError(f"{dataset} has {len(ranked)} {what}; clients must be in 1..{len(ranked)}, got {clients}")
    return ranked[:clients]


def find_source(path: str, args: DataArgs, dataset: str, names: tuple[str, ...], how_to_get: str) -> str:
    """`path` (relative: DataArgs.data_dir first), or the first of `names` found in --data-dir, then
    $BENCH_DATA_DIR (datasets/cache.py's `data_dirs`)."""
    data_dir = os.path.expanduser(args.data_dir) if args.data_dir else None
    if path:
        path = os.path.expanduser(path)
        if data_dir and not os.path.isabs(path) and os.path.exists(os.path.join(data_dir, path)):
            return os.path.join(data_dir, path)
        if os.path.exists(path):
            return path
        where = f" (also looked in data_dir {data_dir!r})" if data_dir and not os.path.isabs(path) else ""
        raise BenchError(f"{dataset} data not found: {path!r}{where}; {how_to_get}")
    bases = data_dirs(args.data_dir)
    for base in bases:
        for name in names:
            if (base / name).exists():
                return str(base / name)
    where = (" in " + ", ".join(repr(str(b)) for b in bases)) if bases else f" (no --data-dir or ${DATA_ENV} given)"
    raise BenchError(f"{dataset} data not found: looked for {' or '.join(names)}{where}; {how_to_get}")


def read_split(files: dict[str, list[str]], dataset: str, convert: Convert, who: str = "user"
               ) -> dict[str, tuple[list, list]]:
    """User -> (train chunks, test chunks) from LEAF's `-t sample` output (layout "split").

    Every user must be on both sides: LEAF's per-user split writes each user to both files.
    """
    train = read_leaf_files(files["train"], dataset, convert)
    test = read_leaf_files(files["test"], dataset, convert)
    for user in sorted(set(train) ^ set(test)):
        have = "train" if user in train else "test"
        raise BenchError(
            f"{dataset}: {who} {user!r} is in the LEAF {have} files only; "
            f"per-{who} train and test need LEAF's `-t sample` split"
        )
    return {user: (train[user], test[user]) for user in train}

