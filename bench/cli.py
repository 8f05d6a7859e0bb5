"""What every command-line entry point shares: one-line errors with exit code 2, signal handling,
and flags generated from the config dataclasses (so a field, its type and its docstring are written
once, in bench/config.py, and `--help` shows them)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import signal
import sys
import threading
import typing

from fedeq_bench.core.errors import BenchError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`error: ...; see --help`) and exit code 2, and the
    epilog may be a function, called only when the help is shown (so listing the registered methods,
    which imports torch, costs nothing to a command that is not asking for help)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        sys.stderr.write(f"error: {message} (see {runnable(self.prog)} --help)\n")
        sys.exit(EXIT_BAD_INPUT)

    def __init__(self, *, epilog: str | typing.Callable[[], str] | None = None, **kwargs):
        super().__init__(epilog=None if callable(epilog) else epilog, **kwargs)
        self.late_epilog = epilog if callable(epilog) else None

    def format_help(self) -> str:
        if self.late_epilog is not None:
            self.epilog, self.late_epilog = self.late_epilog(), None
        return super().format_help()


# -- commands printed for the user to type ---------------------------------------------------------
# A command a CLI prints (a resume, a rerun, `mlflow ui`) must run as shown from the directory the
# user is in, whether or not the virtual environment is active: so it names this interpreter and
# the console scripts beside it by path, never a bare `python` or `mlflow` that PATH may not find.


def shown_path(path: str) -> str:
    """`path` as a command word that runs from the current directory: relative when it lies under
    it (`.venv/bin/python`, `./python`: a word with a slash is not looked up on PATH), else absolute;
    shell-quoted."""
    path, here = os.path.abspath(path), os.getcwd()
    if path.startswith(here.rstrip(os.sep) + os.sep):
        rel = os.path.relpath(path, here)
        path = rel if os.sep in rel else os.path.join(".", rel)
    return shlex.quote(path)


def python() -> str:
    """This interpreter, as a command word (`.venv/bin/python`): its path as Python was started with it,
    links not followed (a virtual environment's `python` is a link to the base interpreter, which does
    not see the environment's packages)."""
    return shown_path(sys.executable) if sys.executable else "python"


def runnable(command: str) -> str:
    """A command line written `python -m ...` (as commands are recorded and documented) with `python`
    replaced by this interpreter (`python`), so that it runs as printed; any other line unchanged."""
    word, sep, rest = command.partition(" ")
    return f"{python()}{sep}{rest}" if word == "python" and sep else command


def without_keys(command: str, keys: typing.Collection[str]) -> str:
    """A recorded command line less what sets the run keys `keys`: `--key VALUE`, `--key=VALUE` (also
    as argparse's abbreviation, `--meth`: a recorded command was parsed, so an abbreviation in it was
    unambiguous) and `--set [run.]key=VALUE`; so appending `--key VALUE` gives each key once."""
    flags = ["--" + k.replace("_", "-") for k in keys]
    sets = {*keys, *(f"run.{k}" for k in keys)}
    words, out, i = shlex.split(command), [], 0
    while i < len(words):
        word = words[i]
        flag, eq, value = word.partition("=")
        if len(flag) > 2 and any(f.startswith(flag) for f in flags):
            i += 1 if eq else 2
            continue
        if word == "--set" and i + 1 < len(words) or flag == "--set" and eq:
            assignment = value if eq else words[i + 1]
            if assignment.partition("=")[0].strip() in sets:
                i += 1 if eq else 2
                continue
        out.append(word)
        i += 1
    return shlex.join(out)


def program(name: str, module: str | None = None, distribution: str | None = None) -> str | None:
    """The console script `name` as a command word that runs as printed: the one beside this
    interpreter (`.venv/bin/mlflow`), else the one its `distribution` installed (a virtual environment
    that sees another's packages), else `python -m module`, else the one on PATH; None if none is found."""
    from importlib import metadata

    beside = os.path.join(os.path.dirname(sys.executable or ""), name)
    if sys.executable and os.access(beside, os.X_OK):
        return shown_path(beside)
    files = []
    if distribution is not None:
        try:
            files = metadata.distribution(distribution).files or []
        except metadata.PackageNotFoundError:
            pass
    for f in files:  # its RECORD lists the scripts it installed, e.g. ../../../bin/mlflow
        if f.name == name and f.parent.name in ("bin", "Scripts") and os.access(str(f.locate()), os.X_OK):
            return shown_path(str(f.locate()))
    if module is not None:
        return f"{python()} -m {module}"
    import shutil

    found = shutil.which(name)
    return shown_path(found) if found else None


def fail(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def run_guarded(work: typing.Callable[[], int],
                interrupted: str | typing.Callable[[], str] = "interrupted") -> int:
    """A command's body with the exits every CLI shares: SIGTERM handled as Ctrl-C, a BenchError as one
    line and exit 2, an interrupt as `interrupted` (a function: called then, to say what the work had
    done) and exit 130; any other exception is a bug and keeps its traceback. `work` returns the exit
    code (0)."""
    def said() -> str:
        return interrupted() if callable(interrupted) else interrupted

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
        fail(said())
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        fail(said())
        return EXIT_INTERRUPTED
    except BaseException:
        # Some libraries turn a KeyboardInterrupt raised inside them into their own error (pydantic's
        # SchemaError while MLflow is imported, Ray's errors while it starts): after a Ctrl-C or
        # SIGTERM, whatever comes out is that interrupt.
        if not interrupt_requested():
            raise
        fail(said())
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


def add_config_flags(parser: argparse.ArgumentParser, cls, names=None,
                     defaults_shown: typing.Mapping[str, str] | None = None) -> list[str]:
    """One `--field-name` flag per field of the config dataclass `cls` (or only `names`), in field order.

    Help is the field's docstring and its default here (the environment's, where bench/config.py
    says the environment supplies one); `defaults_shown` replaces the default's text for the fields
    a command does not default that way (bench.sweep has no default method: `(no default: ...)`).
    Every flag defaults to None, meaning "not typed": only
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
        if defaults_shown and name in defaults_shown:
            help_ = f"{docs.get(name, '')} ({defaults_shown[name]})"
        help_ = help_.replace("%", "%%")  # argparse %-formats help strings
        flag = "--" + name.replace("_", "-")
        if tp is bool:
            parser.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction, help=help_)
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=_metavar(tp, name), help=help_)
    return names


def registered() -> str:
    """The registered methods and datasets, for a help epilog (imports them: call it only for help)."""
    from fedeq_bench.datasets.base import DATASETS
    from fedeq_bench.methods import METHODS

    datasets = [f"{n}:PATH" if n == "npz" else n for n in DATASETS.names()]
    return f"Methods: {', '.join(METHODS.names())} (or all). Datasets: {', '.join(datasets)}."


def add_preset_args(parser: argparse.ArgumentParser, set_help: str) -> None:
    """`--config FILE` (a preset) and `--set KEY=VALUE` (repeatable): the layers above the generated flags."""
    parser.add_argument("--config", default=None, help="preset TOML file (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def config_flags(args: argparse.Namespace, names: list[str]) -> dict[str, typing.Any]:
    """`{field: value}` of the generated flags, None for those not typed (what `config.from_cli` takes)."""
    return {name: getattr(args, name) for name in names}
