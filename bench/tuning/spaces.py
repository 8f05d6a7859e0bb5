"""Search spaces as data: `configs/sweeps/<method>.toml`, keyed exactly as `--set` keys.

    fedeq.rho = {low = 1e-4, high = 10, log = true}     # float range (log-uniform)
    fedrep.head_epochs = {low = 1, high = 10}           # int range: the field is an int
    fedeq.solver = {choices = ["anderson", "broyden"]}  # categorical
    [fedeq]                                             # the table form says the same:
    max_iter = {low = 5, high = 40, step = 5}           #   fedeq.max_iter

An entry has `low` and `high` (optional `log`, `step`) or `choices`, nothing else. Every bound and
choice goes through `config.apply`, the code behind `--set`, so an unknown key, a wrong type or a
value outside the field's declared range (`fedeq.rho = {low = 0, ...}`: rho must be > 0; nan and inf
never pass) fails with the same one-line BenchError; a range is an interval, so with both ends valid
every value drawn between them is too. Whether a range is int or float is the field's type as `apply`
coerces it (an int bound on a float field such as `lr` is a float range, a float bound on an int field
is an error). `suggest(trial, space)` draws one value per key from an Optuna trial and returns
`{--set key: value}`, ready for `config.apply`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bench import config as C
from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.errors import choices as _choices

ENTRY_FIELDS = ("low", "high", "log", "step", "choices")


@dataclass(frozen=True)
class Dist:
    """One swept key: a float or int range, or a categorical choice (Optuna's three suggest calls)."""

    key: str
    """The `--set` key (`fedeq.rho`); also the Optuna parameter name, so a trial's params apply as is."""
    kind: Literal["float", "int", "categorical"]
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    """Sample log-uniformly (needs low > 0); for scales such as rho, tolerances and learning rates."""
    step: float | int | None = None
    """Grid spacing within [low, high]; None: continuous (float) or 1 (int)."""
    choices: tuple = ()


def sweeps_dir() -> Path | None:
    """`configs/sweeps/` of the checkout this package runs from; None when installed without one.

    `configs/` is the sibling of the folder `bench/` (`bench.CHECKOUT`). A wheel installs no
    `configs/`, hence None.
    """
    from bench import CHECKOUT

    d = Path(CHECKOUT) / "configs" / "sweeps"
    return d if d.is_dir() else None


def space_path(method: str) -> Path:
    """The default space file of `method`, or a BenchError saying to pass --space."""
    from fedeq_bench.methods import METHODS

    METHODS.get(method)  # unknown method: "unknown method 'fedq'; choose from ..."
    d = sweeps_dir()
    if d is None:
        raise BenchError(f"no configs/sweeps/ beside this installation to find {method}'s search space; "
                         f"pass --space FILE")
    p = d / f"{method}.toml"
    if not p.is_file():
        have = sorted(f.stem for f in d.glob("*.toml"))
        raise BenchError(f"no search space {p} for method {method!r} (spaces: {_choices(have) or 'none'}); "
                         f"pass --space FILE")
    return p


def load_space(method: str, path: str | None = None, params: list[str] | None = None) -> dict[str, Dist]:
    """`{--set key: Dist}` of `method`, from `path` (--space FILE) or `configs/sweeps/<method>.toml`.

    `params` (--params) keeps only the named keys, each a full key (`fedeq.rho`) or a short name
    (`rho`, meaning `<method>.rho`); an unknown name is a BenchError listing the space's keys.
    """
    p = Path(path) if path is not None else space_path(method)
    label = str(p)
    doc = C.read_toml(p, "search space", "spaces are in configs/sweeps/")

    cfg = C.default_config()
    space = {key: _dist(label, key, entry, cfg) for key, entry in _flatten(label, doc, cfg).items()}
    if not space:
        raise BenchError(f"search space {label!r} has no entries; write e.g. {method}.lr = {{low = 1e-3, high = 0.3, log = true}}")
    if params is not None:
        space = restrict(space, method, params)
    return space


def restrict(space: dict[str, Dist], method: str, params: list[str]) -> dict[str, Dist]:
    """The entries of `space` named in `params` (full keys or short names of `<method>.`), in space order."""
    wanted = set()
    for name in (n.strip() for n in params):
        if not name:
            continue
        key = name if name in space else f"{method}.{name}"
        if key not in space:
            raise BenchError(f"--params: {name!r} is not in {method}'s search space; "
                             f"choose from {_choices(space_keys(space, short=method))}")
        wanted.add(key)
    if not wanted:
        raise BenchError(f"--params names nothing; choose from {_choices(space_keys(space, short=method))}")
    return {k: d for k, d in space.items() if k in wanted}


def space_keys(space: dict[str, Dist], short: str | None = None) -> list[str]:
    """The space's keys in file order; with `short=method`, `<method>.` is dropped (`rho`), as --params takes them."""
    prefix = f"{short}." if short else None
    return [k[len(prefix):] if prefix and k.startswith(prefix) else k for k in space]


def suggest(trial, space: dict[str, Dist]) -> dict[str, Any]:
    """One value per key drawn from an Optuna trial: `{--set key: value}`, ready for `config.apply`."""
    out: dict[str, Any] = {}
    for key, d in space.items():
        if d.kind == "categorical":
            out[key] = trial.suggest_categorical(key, list(d.choices))
        elif d.kind == "int":
            out[key] = trial.suggest_int(key, d.low, d.high, step=d.step or 1, log=d.log)
        else:
            out[key] = trial.suggest_float(key, d.low, d.high, step=d.step, log=d.log)
    return out


# -- parsing and validation -----------------------------------------------------------------------

def _flatten(label: str, doc: dict, cfg: C.Config) -> dict[str, Any]:
    """`{key: entry}` from the file's dotted keys and [section] tables (tomllib nests both alike).

    A top-level name holds entries when it is a config section (`run`, a method, a dataset) or when
    every value under it is a table (`fedq.rho = {...}`: `apply` then names the unknown section);
    any other top-level name is itself an entry for a run key (`lr = {...}`), so a typo in an
    entry's fields (`lo = 1`) is reported as such.
    """
    sections = {"run", *cfg.methods, *cfg.datasets}
    out: dict[str, Any] = {}
    for top, value in doc.items():
        nested = isinstance(value, dict) and bool(value) and all(isinstance(v, dict) for v in value.values())
        if (top in sections and isinstance(value, dict)) or nested:
            for name, entry in value.items():
                out[f"{top}.{name}"] = entry
        else:
            out[top] = value
    return out


def _dist(label: str, key: str, entry: Any, cfg: C.Config) -> Dist:
    def bad(msg: str) -> BenchError:
        return BenchError(f"search space {label!r}: {key}: {msg}")

    if not isinstance(entry, dict):
        raise bad(f"expected a table such as {{low = 1e-3, high = 0.3, log = true}} or {{choices = [...]}}, "
                  f"got {entry!r}")
    extra = set(entry) - set(ENTRY_FIELDS)
    if extra:
        raise bad(f"unknown field {_choices(map(repr, extra))}; an entry has {', '.join(ENTRY_FIELDS)}")

    def check(value):
        """The value as `--set key=value` would type and range-check it (the same one-line BenchError if not)."""
        try:
            return _get(C.apply(cfg, {key: value}), key)
        except BenchError as e:
            msg = str(e)
            if msg.startswith(key + " "):  # `fedeq.rho must be > 0, got 0.0` names the key already
                raise BenchError(f"search space {label!r}: {msg}") from None
            raise bad(msg) from None

    if "choices" in entry:
        if set(entry) - {"choices"}:
            raise bad(f"give either choices or low/high, not both (got {', '.join(sorted(entry))})")
        ch = entry["choices"]
        if not isinstance(ch, list) or not ch:
            raise bad(f"choices must be a non-empty list, got {ch!r}")
        for c in ch:
            if not isinstance(c, (bool, int, float, str)):  # what Optuna's suggest_categorical stores
                raise bad(f"each choice must be a string, number or boolean, got {c!r}")
            check(c)
        if len(set(map(repr, ch))) != len(ch):
            raise bad(f"choices repeat a value: {ch!r}")
        return Dist(key, "categorical", choices=tuple(ch))

    if "low" not in entry or "high" not in entry:
        raise bad(f"a range needs both low and high (got {', '.join(sorted(entry)) or 'neither'}), "
                  f"or give choices = [...]")
    log = entry.get("log", False)
    if not isinstance(log, bool):
        raise bad(f"log must be true or false, got {log!r}")
    low, high = check(entry["low"]), check(entry["high"])
    if isinstance(low, bool) or not isinstance(low, (int, float)) or type(low) is not type(high):
        raise bad(f"low and high must be numbers of the field's type, got {entry['low']!r} and {entry['high']!r}")
    kind: Literal["int", "float"] = "int" if isinstance(low, int) else "float"
    if not (math.isfinite(low) and math.isfinite(high)):
        raise bad(f"bounds must be finite, got low = {low!r}, high = {high!r}")
    if not low < high:
        raise bad(f"low must be below high, got low = {low!r}, high = {high!r}")
    if log and low <= 0:
        raise bad(f"a log range needs low > 0, got low = {low!r}")
    step = entry.get("step")
    if step is not None:
        if log:
            raise bad("step and log cannot be combined (Optuna samples a log range continuously)")
        ok = (isinstance(step, int) if kind == "int" else isinstance(step, (int, float))) and not isinstance(step, bool)
        if not ok or step <= 0 or step > high - low:
            raise bad(f"step must be a positive {kind} no larger than high - low, got {step!r}")
        step = float(step) if kind == "float" else step
    return Dist(key, kind, low=low, high=high, log=log, step=step)


def _get(cfg: C.Config, key: str) -> Any:
    """The value at a `--set` key (after `apply` has accepted it, so the key is known to exist)."""
    section, _, name = key.rpartition(".")
    if section in ("", "run"):
        return getattr(cfg.run, name)
    target = cfg.methods[section] if section in cfg.methods else cfg.datasets[section]
    return getattr(target, name)
