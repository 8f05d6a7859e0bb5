"""What every command-line entry point shares: one-line errors with exit code 2, signal handling,
and flags generated from the config dataclasses (so a field, its type and its docstring are written
once, in bench/config.py, and `--help` shows them)."""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import typing

from fedeq_bench.core.errors import BenchError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`error: ...; see --help`) and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_BAD_INPUT)


def fail(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def run_guarded(work: typing.Callable[[], int], interrupted: str = "interrupted") -> int:
    """A command's body with the exits every CLI shares: SIGTERM handled as Ctrl-C, a BenchError as one
    line and exit 2, an interrupt as `interrupted` and exit 130; any other exception is a bug and keeps
    its traceback. `work` returns the exit code (0)."""
    sigterm_as_interrupt()
    try:
        return work()
    except BenchError as e:
        fail(str(e))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        fail(interrupted)
        return EXIT_INTERRUPTED


def sigterm_as_interrupt() -> None:
    """Make SIGTERM behave like Ctrl-C, so runs it stops are marked KILLED, not left RUNNING."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _metavar(tp, name: str) -> str:
    """`INT`, `FLOAT`, `{ray,serial}`, `INT,...`; a string field shows its own name (`--dataset DATASET`)."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is typing.Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if origin is tuple:
        return _metavar(args[0], "name") + ",..."
    if args:  # X | None: the flag takes an X (`none` also works, and means the default)
        return _metavar(args[0], name)
    return {int: "INT", float: "FLOAT"}.get(tp, name.upper())


def add_config_flags(parser: argparse.ArgumentParser, cls, names=None) -> list[str]:
    """One `--field-name` flag per field of the config dataclass `cls` (or only `names`), in field order.

    Help is the field's docstring and its default here (the environment's, where bench/config.py
    says the environment supplies one). Every flag defaults to None, meaning "not typed": only
    typed flags override a preset (--config). Values stay strings and are typed by
    `config.coerce`, so a wrong type reads as every other config error (`rounds expects int, got
    '1.5'`); booleans are `--flag` / `--no-flag`. Returns the field names, for `config_flags`.
    """
    from fedeq_bench.bench import config as C

    docs = C.field_docs(cls)
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    from_env = C.env_defaults() if cls is C.RunConfig else {}
    defaults.update(from_env)
    names = [f.name for f in dataclasses.fields(cls)] if names is None else list(names)
    for name in names:
        tp, default = hints[name], defaults[name]
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        source = f", from ${C.ENV_KEYS[name]}" if name in from_env else ""
        help_ = docs.get(name, "") + ("" if default is None else f" (default: {shown}{source})")
        help_ = help_.replace("%", "%%")  # argparse %-formats help strings
        flag = "--" + name.replace("_", "-")
        if tp is bool:
            parser.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction, help=help_)
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=_metavar(tp, name), help=help_)
    return names


def add_preset_args(parser: argparse.ArgumentParser, set_help: str) -> None:
    """`--config FILE` (a preset) and `--set KEY=VALUE` (repeatable): the layers above the generated flags."""
    parser.add_argument("--config", default=None, help="preset TOML file (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def config_flags(args: argparse.Namespace, names: list[str]) -> dict[str, typing.Any]:
    """`{field: value}` of the generated flags, None for those not typed (what `config.from_cli` takes)."""
    return {name: getattr(args, name) for name in names}
