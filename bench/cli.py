"""What every command-line entry point shares: one-line errors with exit code 2, signal handling,
and flags generated from the config dataclasses (so a field, its type and its docstring are written
once, in bench/config.py, and `--help` shows them)."""
from __future__ import annotations

import _thread
import argparse
import contextlib
import dataclasses
import errno
import os
import signal
import sys
import threading
import time
import typing

from bench.commands import runnable
from fedeq_bench.core.errors import BenchError

EXIT_BUG = 1
"""An exception that is not a BenchError: a bug, with its traceback (Python's own exit code)."""
EXIT_BAD_INPUT = 2
"""Bad input, or a condition the user can fix (a missing file, a full disk): one `error:` line."""
EXIT_INTERRUPTED = 130
"""Ctrl-C, SIGTERM or SIGHUP: one `error: interrupted...` line; the runs it stopped end KILLED."""
EXIT_OUTPUT_CLOSED = 141
"""Standard output (or error) was closed by its reader (`| head -1`): 128 + SIGPIPE, what a shell
reports for a program that a closed pipe stops; one line on stderr where stderr still works."""
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`error: ...; see --help`) and exit code 2, and the
    epilog may be a function, called only when the help is shown (so listing the registered methods,
    which imports torch, costs nothing to a command that is not asking for help)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        fail(f"{message} (see {runnable(self.prog)} --help)")
        sys.exit(EXIT_BAD_INPUT)

    def __init__(self, *, epilog: str | typing.Callable[[], str] | None = None, **kwargs):
        super().__init__(epilog=None if callable(epilog) else epilog, **kwargs)
        self.late_epilog = epilog if callable(epilog) else None

    def _print_message(self, message, file=None):  # argparse drops a failed write (--help > /dev/full)
        if message:
            (file or sys.stderr).write(message)

    def format_help(self) -> str:
        if self.late_epilog is not None:
            self.epilog, self.late_epilog = self.late_epilog(), None
        return super().format_help()


# -- commands printed for the user to type ---------------------------------------------------------
# A command a CLI prints (a resume, a rerun, `mlflow ui`) must run as shown from the directory the
# user is in, whether or not the virtual environment is active: so it names this interpreter and
# the console scripts beside it by path, never a bare `python` or `mlflow` that PATH may not find.


def fail(message: str) -> None:
    """`error: message` on stderr; nothing (no second error) where stderr itself cannot be written:
    a closed pipe, a full disk, a terminal that hung up."""
    try:
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # ValueError: the stream is closed
        pass


class StreamError(OSError):
    """A write to standard output or standard error failed (`stream` says which): what `run_guarded`
    turns into `EXIT_OUTPUT_CLOSED` (a reader that went away) or a full-disk line."""

    stream = "standard output"
    target: typing.Any = None
    """The stream object the write failed on (its descriptor is pointed at /dev/null: `_quiet`)."""


class _Guarded:
    """sys.stdout or sys.stderr during a guarded command: the stream itself, except that a failed
    write or flush raises `StreamError` naming it (an OSError still, for code that catches those)."""

    def __init__(self, stream, name: str):
        self._stream, self._name = stream, name

    def _call(self, how, *args):
        try:
            return getattr(self._stream, how)(*args)
        except StreamError:
            raise
        except OSError as e:
            err = StreamError(e.errno, e.strerror)
            err.stream, err.target = self._name, self._stream
            raise err from e

    def write(self, text):
        return self._call("write", text)

    def writelines(self, lines):
        return self._call("writelines", lines)

    def flush(self):
        return self._call("flush")

    def __getattr__(self, name):  # isatty, fileno, encoding, buffer, ...: the stream's own
        return getattr(self._stream, name)


def _quiet(stream) -> None:
    """Point a failed stream's file descriptor at /dev/null, so that what is still buffered in it
    (written at exit) goes nowhere instead of raising again (Python's recipe for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no descriptor (a test's StringIO): nothing at exit
        pass


def _chain(e: BaseException) -> typing.Iterator[BaseException]:
    """`e` and the errors it was raised from or during (a library's own error wrapping an OSError)."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


def _full_disk(e: BaseException) -> str | None:
    """What could not be written, when `e` (or an error it was raised from) is a full disk or quota:
    ENOSPC / EDQUOT, or SQLite's SQLITE_FULL (a tracking database). None otherwise."""
    for cause in _chain(e):
        if isinstance(cause, StreamError) and cause.errno in FULL_DISK:
            return cause.stream
        if isinstance(cause, OSError) and cause.errno in FULL_DISK:
            name = cause.filename if cause.filename is not None else cause.filename2
            return repr(os.fspath(name)) if name is not None else "a file (the system did not say which)"
        if getattr(cause, "sqlite_errorname", None) == "SQLITE_FULL":
            return "a SQLite database (the tracking or Optuna store)"
    return None


def _output_failure(e: BaseException) -> int | None:
    """`e` as the exit code of a failed output, after its one line; None when it is something else.

    A reader that closed stdout or stderr (EPIPE) ends quietly with EXIT_OUTPUT_CLOSED; a full disk
    or quota, on any write (stdout included), is one line naming what could not be written, exit 2."""
    streams = [c for c in _chain(e) if isinstance(c, StreamError) and c.errno in (errno.EPIPE, *FULL_DISK)]
    for c in streams:
        _quiet(c.target)  # nothing more goes to a stream that failed, not even at exit
    closed = [c for c in streams if c.errno == errno.EPIPE]
    if closed:
        fail(f"{closed[0].stream} was closed by its reader (broken pipe); the command stopped there")
        return EXIT_OUTPUT_CLOSED
    what = _full_disk(e)
    if what is None:
        return None
    fail(f"no space left on the device (or over the disk quota) writing {what}; free space or write elsewhere")
    return EXIT_BAD_INPUT


def run_guarded(work: typing.Callable[[], int],
                interrupted: str | typing.Callable[[], str] = "interrupted") -> int:
    """The one entry guard of every command (bench.run, bench.sweep, bench.report, bench.data,
    bench.perf, `python -m bench`): `work` returns the exit code (0); what ends it otherwise ends as
    one line on stderr and an exit code from this table, never a traceback (except a bug's):

        BenchError (bad input, a condition the user can fix)        EXIT_BAD_INPUT (2)
        Ctrl-C, SIGTERM, SIGHUP (a closed terminal), at any moment  EXIT_INTERRUPTED (130), `interrupted`
        stdout or stderr closed by its reader (`| head -1`)         EXIT_OUTPUT_CLOSED (141)
        no space left or over quota writing anything (stdout too)   EXIT_BAD_INPUT (2), naming what
        any other exception: a bug, with its traceback              EXIT_BUG (1, Python's)

    `interrupted` may be a function, called then, to say what the work had done. Standard output is
    flushed inside the guard, so a full disk or a closed pipe met by the last line is caught too."""
    def said() -> str:
        return interrupted() if callable(interrupted) else interrupted

    _INTERRUPTS.clear()  # this command's interrupts only (a notebook may call several)
    sigterm_as_interrupt()
    signal.signal(signal.SIGINT, _raise_interrupt)
    # Ray's C++ core installs a failure signal handler (absl's) for SIGTERM too, when `ray.init`
    # connects: SIGTERM would then abort with a C++ stack dump instead of ending the runs KILLED.
    # A local Ray started by this process inherits the setting (its crash dumps go, its logs stay).
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    streams, unraisable = (sys.stdout, sys.stderr), sys.unraisablehook
    sys.stdout, sys.stderr = _Guarded(sys.stdout, "standard output"), _Guarded(sys.stderr, "standard error")
    sys.unraisablehook = _interrupt_not_lost(unraisable, os.getpid())
    try:
        try:
            code = work()
        except SystemExit:  # argparse's --help and usage errors: their output is flushed here too
            sys.stdout.flush()
            raise
        sys.stdout.flush()
        return code
    except BenchError as e:
        if not interrupt_requested():
            fail(str(e))
            return EXIT_BAD_INPUT
        fail(said())
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        fail(said())
        return EXIT_INTERRUPTED
    except BaseException as e:
        # Some libraries turn a KeyboardInterrupt raised inside them into their own error (pydantic's
        # SchemaError while MLflow is imported, Ray's errors while it starts): after a Ctrl-C, SIGTERM
        # or SIGHUP, whatever comes out is that interrupt.
        if interrupt_requested():
            fail(said())
            return EXIT_INTERRUPTED
        failed = _output_failure(e)
        if failed is None:
            raise
        return failed
    finally:
        (sys.stdout, sys.stderr), sys.unraisablehook = streams, unraisable


def _interrupt_not_lost(default, pid: int):
    """A `sys.unraisablehook` for the guarded command (process `pid`): a Ctrl-C / SIGTERM / SIGHUP whose
    KeyboardInterrupt was raised where Python cannot pass it on (a weakref callback or `__del__`, e.g.
    SQLAlchemy's registry cleanup, or an at-fork hook) is not lost: Python would print "Exception
    ignored in: ..." with a traceback and carry on, so the run kept training after the user's Ctrl-C.
    Here nothing is printed and the interrupt is delivered again to the main thread 50 ms later, from
    a thread started without waiting for it (the hook runs inside the callback, where an interrupt is
    swallowed again; should the new one land in another callback, this repeats); in a child forked by
    this process (about to exec a program or to die of the same signal) it is only silenced. Any
    other unraisable error goes to `default`."""
    def again(signum: int) -> None:
        time.sleep(0.05)
        _thread.interrupt_main(signal.Signals(signum))

    def hook(args) -> None:
        if not (issubclass(args.exc_type, KeyboardInterrupt) and interrupt_requested()):
            default(args)
        elif os.getpid() == pid:
            _thread.start_new_thread(again, (_INTERRUPTS[-1],))

    return hook


def sigterm_as_interrupt() -> None:
    """Make SIGTERM and SIGHUP (the terminal closed) behave like Ctrl-C, so runs they stop are marked
    KILLED, not left RUNNING."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # `nohup` asked to go on when the terminal closes
        signal.signal(signal.SIGHUP, _raise_interrupt)


_INTERRUPTS: list[int] = []
"""The Ctrl-C / SIGTERM / SIGHUP signals this process has received through `_raise_interrupt` (main thread)."""


def interrupt_requested() -> bool:
    """Whether the user has interrupted this process (Ctrl-C, SIGTERM or SIGHUP, as a CLI handles them)."""
    return bool(_INTERRUPTS)


def _raise_interrupt(signum, frame):
    _INTERRUPTS.append(signum)
    raise KeyboardInterrupt


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def deferred_signals():
    """Ctrl-C, SIGTERM and SIGHUP wait until the block has finished, then interrupt as usual.

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
    """Keep this process's SIGINT, SIGTERM and SIGHUP handlers across the block: `ray.init` installs its own
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
    parser.add_argument("--config", action="append", default=None, metavar="FILE",
                        help="preset TOML file (see configs/); repeat it to layer presets, each over the one before")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def config_flags(args: argparse.Namespace, names: list[str]) -> dict[str, typing.Any]:
    """`{field: value}` of the generated flags, None for those not typed (what `config.from_cli` takes)."""
    return {name: getattr(args, name) for name in names}
