"""What every command-line entry point shares: one-line errors with exit code 2, signal handling,
and flags generated from the config dataclasses (so a field, its type and its docstring are written
once, in bench/config.py, and `--help` shows them)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import threading
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
    _INTERRUPTS.clear()  # this command's interrupts only (a notebook may call several)
    sigterm_as_interrupt()
    signal.signal(signal.SIGINT, _raise_interrupt)
    # Ray's C++ core installs a failure signal handler (absl's) for SIGTERM too, when `ray.init`
    # connects: SIGTERM would then abort with a C++ stack dump instead of ending the runs KILLED.
    # A local Ray started by this process inherits the setting (its crash dumps go, its logs stay).
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    try:
        return work()
    except BenchError as e:
        if not interrupt_requested():
            fail(str(e))
            return EXIT_BAD_INPUT
        fail(interrupted)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        fail(interrupted)
        return EXIT_INTERRUPTED
    except BaseException:
        # Some libraries turn a KeyboardInterrupt raised inside them into their own error (pydantic's
        # SchemaError while MLflow is imported, Ray's errors while it starts): after a Ctrl-C or
        # SIGTERM, whatever comes out is that interrupt.
        if not interrupt_requested():
            raise
        fail(interrupted)
        return EXIT_INTERRUPTED


def sigterm_as_interrupt() -> None:
    """Make SIGTERM behave like Ctrl-C, so runs it stops are marked KILLED, not left RUNNING."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


_INTERRUPTS: list[int] = []
"""The Ctrl-C / SIGTERM signals this process has received through `_raise_interrupt` (main thread)."""


def interrupt_requested() -> bool:
    """Whether the user has interrupted this process (Ctrl-C or SIGTERM, as a CLI handles them)."""
    return bool(_INTERRUPTS)


def _raise_interrupt(signum, frame):
    _INTERRUPTS.append(signum)
    raise KeyboardInterrupt


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred_signals():
    """Ctrl-C and SIGTERM wait until the block has finished, then interrupt as usual.

    For writes that must not be cut in half: a KeyboardInterrupt raised inside an MLflow store call
    can leave its database session unusable, so the KILLED status written next fails and the run
    stays RUNNING; one raised inside `ray.shutdown` leaves Ray's processes behind. Inside the block a
    signal is only noted; on leaving it, the first one noted is delivered again to the handler that
    was there before (ours raise KeyboardInterrupt). Nests; outside the main thread (where Python runs
    no handlers) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if noted:
        signal.raise_signal(noted[0])


@contextlib.contextmanager
def handlers_kept():
    """Keep this process's SIGINT and SIGTERM handlers across the block: `ray.init` installs its own
    (Python's on the main thread; its C++ core's from any thread), whose SIGTERM ends the process
    with Ray's stack dump, not with the runs KILLED and exit 130. Setting a handler again through
    `signal.signal` puts Python's back at the C level too. Main thread only (a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            if h is not None:
                signal.signal(s, h)


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
    from bench import config as C

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
