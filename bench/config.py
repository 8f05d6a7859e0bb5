"""Configuration: frozen dataclasses, TOML presets, `--set key=value`, strict keys and types.

Three kinds of section share one key space:
    run keys           `rounds`, `lr`, ... (also written `run.rounds`)
    method sections    `fedrep.head_epochs`, `fedeq.rho`, `fedavg.lr` (per-method override)
    dataset sections   `synthetic.alpha`, `npz.path`
A preset file uses the same names: a `[run]` table plus one table per method or dataset.

Precedence: dataclass defaults < environment < --config FILE < explicit CLI flags < --set.
The environment is MLflow's own convention: `MLFLOW_TRACKING_URI` and `MLFLOW_EXPERIMENT_NAME` give
`tracking_uri` and `experiment` when nothing more explicit does. It sits below --config because a
preset file names its store on purpose for one study, while an environment variable is ambient (set
once per shell or cluster node); a flag or --set beats both. `default_config()` applies it, so a
library caller (a sweep, a test) gets the same defaults as the command line.

The dataclasses are the one source of truth: the command-line flags are generated from the fields
of `RunConfig` and the docstring under each (`field_docs`), so `--help` says what the code says.
Every numeric field of every section declares its valid range where it is defined
(`lr: float = ranged(0.05, gt=0)`, core/ranges.py). `apply` checks each value it sets against it
once typed (finite floats, ints only, within bounds), whichever level set it: a flag, `--set`, a
preset's [run] or [method] table, a sweep bound; `check_config` checks a whole config the same way.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import math
import os
import textwrap
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict, cast

from fedeq_bench.core.errors import BenchError, choices
from fedeq_bench.core.ranges import check, check_fields, range_of, ranged


@dataclass(frozen=True)
class RunConfig:
    methods: tuple[str, ...] = ("fedavg", "fedrep")
    """Methods to compare (registered names); `all` on the command line means every method."""
    dataset: str = "synthetic"
    """Dataset name, or `npz:PATH` for your own per-client split."""
    model: str | None = None
    """One network for every method; None: the dataset's pairing (DEQ model for FeDEQ, explicit for the rest)."""
    rounds: int = ranged(30, ge=1)
    """Communication rounds; more rounds cost time and bytes linearly."""
    clients: int | None = ranged(None, ge=1)
    """Number of clients; None: the dataset's default (30 for synthetic, all clients of an npz file)."""
    fraction: float = ranged(1.0, gt=0, le=1)
    """Fraction of training clients sampled each round; lowering it cuts per-round bytes and time."""
    local_epochs: int = ranged(1, ge=1)
    """Local epochs per round (a method may override: `fedrep.local_epochs`); at least 1: with 0 a
    method trains on no batch, and its round loss (a mean over none) is NaN, read as divergence."""
    batch_size: int = ranged(32, ge=1)
    """Mini-batch size of local SGD."""
    lr: float = ranged(0.05, gt=0)
    """SGD learning rate of local training."""
    seeds: tuple[int, ...] = ranged((0,), ge=0, le=2**32 - 1)  # numpy's and Optuna's seed range (a sweep's sampler)
    """Seeds; each one reruns every method on data, init and schedule drawn from it."""
    partition: str | None = None
    """How samples are split over clients: `dirichlet:ALPHA`, `shards:K` or `natural`; None: the dataset's default."""
    val_frac: float = ranged(0.1, ge=0, lt=1)
    """Fraction of each client's training data held out as validation (what sweeps optimize)."""
    frac_unseen: float = ranged(0.0, ge=0, lt=1)
    """Fraction of clients held out of training and personalized after it (acc/unseen)."""
    unseen_pick: Literal["random", "last"] = "random"
    """Which clients are held out: `random` (stream `unseen`) or `last`, the highest client ids (the
    FeDEQ reference's trainers/base.py)."""
    drop_last: bool = False
    """Local SGD drops each epoch's last partial mini-batch, a client with fewer samples than the
    batch size taking them all as one batch (the FeDEQ reference's utils/data_utils.py)."""
    eval_dropout: bool = False
    """Evaluate every method with dropout on, masks drawn from the job's `global` stream (the FeDEQ
    reference's Shakespeare evaluation); models without dropout are unaffected."""
    data_dir: str | None = None
    """Directory searched first for file-based datasets."""
    eval_every: int = ranged(1, ge=1)
    """Evaluate every N rounds (the last round is always evaluated); raising it saves time."""
    eval_clients: int | None = ranged(None, ge=1)
    """Evaluate a sample of N training clients (and N held-out ones) in evaluated rounds before the
    last, the same sample for every method (stream `eval_sample`); acc/* of those rounds are then
    estimates. The last round evaluates every client. None: every client every evaluated round."""
    state_budget_gb: float | None = ranged(None, ge=0, note="0: every client state on disk")
    """GB (10^9 bytes) of client states kept in memory; past it the least recently used are written
    to a temporary directory and read back bit for bit (same results, slower). None: no limit."""
    wire: Literal["fp32", "fp16", "bf16", "int8", "topk"] = "fp32"
    """How messages' float32 tensors travel (bench/loop/wire.py): `fp32` as they are; `fp16`/`bf16`
    half the bytes; `int8` a quarter plus a 4-byte scale per tensor (both directions); `topk` uplinks
    send only the largest `wire_topk` fraction of each tensor's change, with indices (downlinks fp32).
    The receiver gets the decoded values (accuracy pays for the loss); a method may override it
    (`fedrep.wire`)."""
    wire_rounding: Literal["nearest", "stochastic"] = "nearest"
    """int8's rounding: `nearest`, or `stochastic` (unbiased; draws from streams wire_down, wire_up)."""
    wire_topk: float = ranged(0.01, gt=0, le=1)
    """topk: the fraction of each tensor's entries a client sends (at least one)."""
    wire_feedback: bool = False
    """topk: error feedback, each client keeping what it did not send and adding it to its next change."""
    devices: str = "uniform"
    """Device profile set each client's compute, bandwidth, latency, memory and availability are drawn
    from (bench/loop/devices.py, docs/devices.md): `uniform` (every client alike, nothing limits),
    `mobile-mix` (phones of several tiers) or your own FILE.toml. Drives the simulated clock
    (sim/time_s); a device without the memory a method's local update needs cannot train, an
    unavailable one does not take part (clients/dropped_*)."""
    round_deadline: float | None = ranged(None, gt=0)
    """Simulated seconds a round waits for updates (FedScale's deadline rounds): a later update is
    dropped (clients/dropped_deadline). None: every round waits for its slowest client."""
    keep_going: bool = False
    """A method x seed that diverges (bench/loop/divergence.py) ends FAILED with a `diverged` tag and
    the comparison goes on with the other runs; the summary and the report name it, outside the
    means. False: the first divergence stops the command (exit 2), as any failure does."""
    checkpoint_every: int = ranged(10, ge=0, note="0: no checkpoints")
    """Write a resumable checkpoint into each child run's artifacts every N rounds and after the last
    (`--resume PARENT_RUN_ID` continues from it); 0: none. Raising it saves I/O, redoes more rounds."""
    memory_every_round: bool = False
    """Meter every local update's memory, not only each client's first (slower; for methods whose
    footprint changes between rounds)."""
    cpu_memory: Literal["live", "parts"] = "live"
    """How a local update's peak memory is metered on CPU: `live`, every tensor operators allocate
    while it is alive (what the CUDA allocator sees); `parts`, params + grads + optimizer state +
    saved-for-backward tensors only (metered updates 2-3x faster; misses a DEQ solver's no-grad
    working set: FeDEQ 9.8x low). bench/loop/memory.py."""
    backend: Literal["ray", "serial"] = "ray"
    """`ray`: clients run on Ray actors (edge nodes); `serial`: in this process (bit-identical)."""
    workers: int | None = ranged(None, ge=1)
    """Ray actors; None: as many as the cluster's CPUs (GPUs) allow at the per-client size."""
    address: str | None = None
    """Ray cluster address (`auto` after `ray up`); None: start a local Ray instance."""
    cpus_per_client: float = ranged(1.0, ge=0)
    """CPUs per actor (also torch threads per local update in both backends); fractions allowed."""
    gpus_per_client: float = ranged(0.0, ge=0)
    """GPUs per actor; fractions allowed (0.25 packs four actors on a GPU)."""
    device: Literal["cpu", "cuda"] | None = None
    """Training device; None: cuda when Ray gives the actor a GPU, else cpu."""
    experiment: str = "fedeq-bench"
    """MLflow experiment name; the default is $MLFLOW_EXPERIMENT_NAME when that is set."""
    tracking_uri: str = "sqlite:///mlflow.db"
    """MLflow tracking store (a SQLite file here, a tracking server URL on a cluster); the default is
    $MLFLOW_TRACKING_URI when that is set."""
    run_name: str | None = None
    """Name of the parent MLflow run; None: generated from methods and dataset."""


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    methods: dict[str, Any] = field(default_factory=dict)
    """Per-method config dataclass instances, keyed by method name (every registered method)."""
    datasets: dict[str, Any] = field(default_factory=dict)
    """Per-dataset config dataclass instances, keyed by dataset name."""


# Run key <- environment variable (MLflow's conventions). An empty variable counts as unset.
ENV_KEYS = {"tracking_uri": "MLFLOW_TRACKING_URI", "experiment": "MLFLOW_EXPERIMENT_NAME"}


class EnvDefaults(TypedDict, total=False):
    """What `env_defaults` returns: the `RunConfig` fields of ENV_KEYS (all str), each only when set."""

    tracking_uri: str
    experiment: str


def env_defaults(environ: Mapping[str, str] | None = None) -> EnvDefaults:
    """The run keys the environment sets: `{"tracking_uri": $MLFLOW_TRACKING_URI, ...}`, unset ones left out."""
    environ = os.environ if environ is None else environ
    # cast: ENV_KEYS's keys are EnvDefaults's keys, which a comprehension cannot tell mypy.
    return cast(EnvDefaults, {key: environ[var] for key, var in ENV_KEYS.items() if environ.get(var, "").strip()})


def default_config() -> Config:
    """Every section at its defaults, with the environment's MLflow store and experiment (see above)."""
    from fedeq_bench.datasets.base import DATASETS
    from fedeq_bench.methods import METHODS

    return Config(
        run=RunConfig(**env_defaults()),
        methods={n: METHODS.get(n).Config() for n in METHODS.names()},
        datasets={n: DATASETS.get(n).config() for n in DATASETS.names()},
    )


def field_docs(cls) -> dict[str, str]:
    """`{field: docstring}` of a config dataclass: the string literal right under each field.

    Python keeps no such docstrings at run time, so they are read from the class's source with `ast`
    (the convention of cleanrl's argument dataclasses). Whitespace is folded to one line for --help.
    A class whose source is unavailable (a frozen app) gets no docs rather than an error.
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    node = tree.body[0]
    assert isinstance(node, ast.ClassDef)  # the source of a class: one class statement
    body = node.body
    docs = {}
    for stmt, nxt in itertools.pairwise(body):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


# -- typed parsing --------------------------------------------------------------------------------

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"comma list of {_type_name(typing.get_args(tp)[0])}"
    return "none" if tp is type(None) else getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp, key: str) -> Any:
    """`value` (a CLI string or a TOML value) as type `tp`, or a BenchError naming the key."""
    origin = typing.get_origin(tp)
    bad = BenchError(f"{key} expects {_type_name(tp)}, got {value!r}")
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except BenchError:
                pass
        raise bad
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        raise BenchError(f"{key} must be one of {choices(map(str, allowed))}, got {value!r}")
    if origin is tuple:
        (inner, *_) = typing.get_args(tp)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise bad
        try:
            return tuple(coerce(v.strip() if isinstance(v, str) else v, inner, key) for v in items if v != "")
        except BenchError:
            raise bad from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            try:
                return float(value)
            except OverflowError:  # an int beyond float's range is inf as a float, as "1e400" is
                return math.inf
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"config type {tp} of {key} is not supported")  # a bug in a config class


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def apply(config: Config, overrides: dict[str, Any]) -> Config:
    """Apply `{key: value}` (values are strings from --set or typed TOML values)."""
    run = config.run
    methods = dict(config.methods)
    datasets = dict(config.datasets)
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        if section in ("", "run"):
            target, label = run, "run"
        elif section in methods:
            target, label = methods[section], section
        elif section in datasets:
            target, label = datasets[section], section
        else:
            raise BenchError(
                f"unknown key {key!r}: sections are run, {choices(list(methods) + list(datasets))}"
            )
        hints = _hints(type(target))
        if name not in hints:
            prefix = "" if label == "run" else f"{label}."
            raise BenchError(f"unknown key {key!r}; {label} keys: {choices(prefix + k for k in hints)}")
        typed = coerce(value, hints[name], key)
        rng = range_of(target.__dataclass_fields__[name])
        if rng is not None:
            check(key, typed, hints[name], rng)
        new = dataclasses.replace(target, **{name: typed})
        if label == "run":
            run = new
        elif label in methods:
            methods[label] = new
        else:
            datasets[label] = new
    return Config(run=run, methods=methods, datasets=datasets)


def check_config(config: Config) -> None:
    """Every ranged field of every section within its range (a BenchError line if not), keys written
    as `--set` takes them: `lr`, `fedavg.lr`, `synthetic.alpha`. `apply` already checked what it set;
    this covers a config built or replaced in code (a library caller, a notebook, a test)."""
    check_fields(config.run)
    for name, section in (*config.methods.items(), *config.datasets.items()):
        check_fields(section, f"{name}.")


def parse_set(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise BenchError(f"--set expects key=value (e.g. fedrep.head_epochs=10), got {item!r}")
        out[key.strip()] = value.strip()
    return out


def read_toml(path, what: str = "config file", where: str = "presets are in configs/") -> dict[str, Any]:
    """A TOML file as a dict, or one BenchError line: `config file 'x.toml' not found; expected a .toml file
    (presets are in configs/)`. Read by core/files.py's one reader (never blocks on a pipe, never reads a
    device, at most 1 MiB)."""
    from fedeq_bench.core.files import SMALL_LIMIT, read_bytes

    data = read_bytes(path, what, f"a .toml file ({where})", SMALL_LIMIT)
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BenchError(f"{what} {str(path)!r} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                         f"TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise BenchError(f"{what} {str(path)!r} is not valid TOML: {e}") from None


def load_toml(path: str) -> dict[str, Any]:
    """A preset file as overrides: `[run]` keys and `[section]` keys, flattened to `section.key`."""
    doc = read_toml(path)
    out: dict[str, Any] = {}
    for section, table in doc.items():
        if not isinstance(table, dict):
            raise BenchError(f"config file {path!r}: top-level key {section!r} must be a [table] such as [run]")
        for k, v in table.items():
            out[f"{section}.{k}"] = v
    return out


def flatten(config: Config, methods: list[str] | None = None, dataset: str | None = None) -> dict[str, str]:
    """`{"run.rounds": "30", "fedrep.head_epochs": "10", ...}` for MLflow params."""
    out = {f"run.{k}": _fmt(v) for k, v in dataclasses.asdict(config.run).items()}
    for name, cfg in config.methods.items():
        if methods is None or name in methods:
            out.update({f"{name}.{k}": _fmt(v) for k, v in dataclasses.asdict(cfg).items()})
    for name, cfg in config.datasets.items():
        if dataset is None or name == dataset:
            out.update({f"{name}.{k}": _fmt(v) for k, v in dataclasses.asdict(cfg).items()})
    return out


def _fmt(v) -> str:
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    return str(v)


def from_cli(config_files: str | Sequence[str] | None, flags: dict[str, Any], sets: list[str]) -> Config:
    """The layered config of a command line: defaults < environment < --config FILE (each one given,
    in order: a later file's keys override an earlier one's) < flags given < --set.

    `flags` maps run keys to what the user typed; None means "not typed" and overrides nothing.
    """
    cfg = default_config()
    for config_file in [config_files] if isinstance(config_files, str) else config_files or []:
        cfg = apply(cfg, load_toml(config_file))
    cfg = apply(cfg, {k: v for k, v in flags.items() if v is not None})
    return apply(cfg, parse_set(sets))


def resolve_method(config: Config, name: str, default_models: dict[str, str]):
    """The method's config with every None resolved: the one place "None means the run's value" lives.

    `lr`, `local_epochs`, `batch_size`, `wire`, `wire_rounding`, `wire_topk`, `wire_feedback`: the run's. `model`: `METHOD.model`, else the run's `--model`,
    else the dataset's pairing for the method's kind (`default_models["deq"]` for FeDEQ,
    `default_models["explicit"]` for the rest).
    """
    from fedeq_bench.methods import METHODS

    cfg = config.methods[name]
    run = config.run
    inherit = {}
    for k in ("lr", "local_epochs", "batch_size", "wire", "wire_rounding", "wire_topk", "wire_feedback"):
        if getattr(cfg, k, None) is None:
            inherit[k] = getattr(run, k)
    if getattr(cfg, "model", None) is None:
        inherit["model"] = run.model or default_models[METHODS.get(name).model_kind]
    return dataclasses.replace(cfg, **inherit)
