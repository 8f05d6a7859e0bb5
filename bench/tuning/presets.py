"""The tuned preset a sweep writes (`configs/tuned/<dataset>.toml` by default): `[run]` methods and
dataset, and one `[method]` table of best values per method, which `python -m bench.run --config`
loads as is. Written with tomli-w (TOML's `inf`/`nan` for a diverged value included), atomically.

A preset is updated, never clobbered: the tables of methods not swept this time are kept, and a file
at the path that is not a tuned preset this module wrote (another config, unreadable TOML, a folder,
a device) is refused with one line before the sweep starts (`check_out`), not overwritten after it.
"""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

from fedeq_bench.core.errors import BenchError

HEADER = "# Best values of Optuna sweeps (python -m bench.sweep)"
"""The first line of every tuned preset: how a preset this module may update is recognised."""


def default_path(dataset: str) -> str:
    """configs/tuned/<dataset>.toml (an `npz:` path's file name, other characters made safe)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset.replace("npz:", "npz_").rsplit("/", 1)[-1])
    return os.path.join("configs", "tuned", f"{name}.toml")


def _existing(path: str) -> dict[str, dict[str, Any]]:
    """The tables of the tuned preset at `path` ({} when there is none), or one BenchError line when
    something else is there."""
    if not os.path.lexists(path):
        return {}
    if not os.path.isfile(path) or os.path.islink(path):
        raise BenchError(f"--tuned-out {path!r} is not a regular file; give a new path or remove it")
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
        if not raw.decode().startswith(HEADER):
            raise ValueError("not written by bench.sweep")
        tables = tomllib.loads(raw.decode())
    except (OSError, UnicodeDecodeError, ValueError) as e:  # TOMLDecodeError is a ValueError
        raise BenchError(f"--tuned-out {path!r} exists and is not a tuned preset ({str(e).splitlines()[0][:120]}); "
                         f"give a new path, or remove it to have it written") from None
    return {k: v for k, v in tables.items() if isinstance(v, dict)}


def check_out(path: str) -> None:
    """Refuse, before any trial runs, a path this module would not write (see the module doc)."""
    _existing(path)
    parent = os.path.dirname(os.path.abspath(path))
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise BenchError(f"--tuned-out {path!r}: cannot create files under {probe!r}")


def tables(outcomes) -> dict[str, dict[str, Any]]:
    """`{method: {field: best value}}`; `study.method_space` keeps every key under its method."""
    out: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        table = out.setdefault(o.method, {})
        for key, value in o.best_params.items():
            table[key.rpartition(".")[2]] = value
    return out


def write(cfg, outcomes, path: str | None = None) -> str | None:
    """Write (or update) the tuned preset; returns its path, or None if no study has a best."""
    import tomli_w

    from fedeq_bench.datasets.cache import atomic_write

    done = [o for o in outcomes if o.best_params]
    if not done:
        return None
    path = path or default_path(cfg.run.dataset)
    old = _existing(path)
    methods = list(dict.fromkeys(list(old.get("run", {}).get("methods", [])) + [o.method for o in done]))
    new = {**old, **tables(done)}
    new["run"] = {**old.get("run", {}), "methods": methods, "dataset": cfg.run.dataset}
    ordered = {"run": new["run"], **{k: new[k] for k in sorted(new) if k != "run"}}
    multi = any(len(o.objectives) > 1 for o in done)
    head = (f"{HEADER}, objective acc/val (validation)"
            + ("; a multi-objective study gives its Pareto front's most accurate trial.\n" if multi else ".\n")
            + f"# Found with rounds={cfg.run.rounds}, clients={cfg.run.clients}, seeds="
            f"{','.join(map(str, cfg.run.seeds))}. Rerun on test: python -m bench.run --config {path}\n\n")
    text = head + tomli_w.dumps(ordered)
    atomic_write(Path(path), lambda f: f.write(text.encode()))
    return path
