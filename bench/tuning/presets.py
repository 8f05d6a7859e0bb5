"""The tuned preset a sweep writes (`configs/tuned/<dataset>.toml` by default): `[run]` methods and
dataset, and one `[method]` table of best values per method, which `python -m bench.run --config`
loads as is. Written with tomli-w (TOML's `inf`/`nan` for a diverged value included), atomically.

A preset is updated, never clobbered: the tables of methods not swept this time are kept, and a file
at the path that is not a tuned preset this module wrote (another config, unreadable TOML) is refused
with one line before the sweep starts (`check_out`), not overwritten after it; `--force` (`force=True`)
replaces it with a new preset. Written through core/outputs.py's one writer: a folder, a device, a
pipe or a symbolic link at the path is refused even with `--force`.
"""
from __future__ import annotations

import os
import re
import tomllib
from typing import Any

from fedeq_bench.core.errors import BenchError

HEADER = "# Best values of Optuna sweeps (python -m bench.sweep)"
"""The first line of every tuned preset: how a preset this module may update is recognised."""


def default_path(dataset: str) -> str:
    """configs/tuned/<dataset>.toml (an `npz:` path's file name, other characters made safe)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset.replace("npz:", "npz_").rsplit("/", 1)[-1])
    return os.path.join("configs", "tuned", f"{name}.toml")


def _owns(head: bytes) -> bool:
    return head.startswith(HEADER.encode())


WHAT = "tuned preset"


def _existing(path: str, force: bool = False) -> dict[str, dict[str, Any]]:
    """The tables of the tuned preset at `path` ({} when there is none, or with `force` when something
    else is there), or one BenchError line when something else is there."""
    from fedeq_bench.core import outputs
    from fedeq_bench.core.files import SMALL_LIMIT, read_bytes

    outputs.check(path, WHAT, _owns, force=True)  # a folder, a device, a pipe, a link: never, even with --force
    if not os.path.lexists(path):
        return {}
    try:
        raw = read_bytes(path, f"--tuned-out {WHAT}", "a tuned preset (give --force to replace it)", SMALL_LIMIT)
    except BenchError:
        if force:
            return {}
        raise
    try:
        if not raw.decode().startswith(HEADER):
            raise ValueError("not written by bench.sweep")
        tables = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as e:  # TOMLDecodeError is a ValueError
        if force:
            return {}
        raise BenchError(f"--tuned-out {path!r} exists and is not a tuned preset ({str(e).splitlines()[0][:120]}); "
                         f"give --force to replace it, or a new path") from None
    return {k: v for k, v in tables.items() if isinstance(v, dict)}


def check_out(path: str, force: bool = False) -> None:
    """Refuse, before any trial runs, a path this module would not write (see the module doc)."""
    _existing(path, force)


def tables(outcomes) -> dict[str, dict[str, Any]]:
    """`{method: {field: best value}}`; `study.method_space` keeps every key under its method."""
    out: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        table = out.setdefault(o.method, {})
        for key, value in o.best_params.items():
            table[key.rpartition(".")[2]] = value
    return out


def rerun_configs(path: str, configs: tuple[str, ...] = ()) -> str:
    """`--config A ... --config PATH`: the sweep's own presets, then the tuned one over them."""
    import shlex

    return " ".join(f"--config {shlex.quote(c)}" for c in (*configs, path))


def write(cfg, outcomes, path: str | None = None, force: bool = False, configs: tuple[str, ...] = ()) -> str | None:
    """Write (or update) the tuned preset; returns its path, or None if no study has a best. `force`:
    a file at `path` that is not a tuned preset is replaced (`--force`). `configs`: the sweep's own
    --config files, which the header's rerun command layers under the preset."""
    import tomli_w

    from fedeq_bench.core import outputs

    done = [o for o in outcomes if o.best_params]
    if not done:
        return None
    path = path or default_path(cfg.run.dataset)
    old = _existing(path, force)
    methods = list(dict.fromkeys(list(old.get("run", {}).get("methods", [])) + [o.method for o in done]))
    new = {**old, **tables(done)}
    new["run"] = {**old.get("run", {}), "methods": methods, "dataset": cfg.run.dataset}
    ordered = {"run": new["run"], **{k: new[k] for k in sorted(new) if k != "run"}}
    multi = any(len(o.objectives) > 1 for o in done)
    head = (f"{HEADER}, objective acc/val (validation)"
            + ("; a multi-objective study gives its Pareto front's most accurate trial.\n" if multi else ".\n")
            + f"# Found with rounds={cfg.run.rounds}, clients={cfg.run.clients}, seeds="
            f"{','.join(map(str, cfg.run.seeds))}. Rerun on test: python -m bench.run {rerun_configs(path, configs)}\n\n")
    text = head + tomli_w.dumps(ordered)
    outputs.write(path, text.encode(), WHAT, _owns, force=force)
    return path
