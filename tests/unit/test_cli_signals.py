"""bench/cli.py's signal handling and exit, in isolation (the whole commands: test_signals.py)."""
import os
import signal
import subprocess
import sys

import pytest

from bench import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_signal_inside_deferred_signals_waits_for_the_block_to_finish(guarded):
    signal.signal(signal.SIGINT, cli._raise_interrupt)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with cli.deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("after the signal")  # without the deferral, KeyboardInterrupt comes first
    assert done == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is cli._raise_interrupt  # the handler is back
    assert cli.interrupt_requested()


def test_no_signal_no_interrupt(guarded):
    with cli.deferred_signals():
        pass
    assert not cli.interrupt_requested()


@pytest.mark.parametrize("wrapped", [RuntimeError, ValueError])
def test_an_interrupt_a_library_wraps_in_its_own_error_is_still_exit_130(guarded, capsys, wrapped):
    def work():
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # run_guarded made SIGTERM an interrupt
        except KeyboardInterrupt:
            # What pydantic does to it: a plain raise, the interrupt only its implicit context.
            raise wrapped("SchemaError: ... KeyboardInterrupt")  # noqa: B904
        return 0

    assert cli.run_guarded(work, "interrupted (test)") == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err == "error: interrupted (test)\n"


def test_without_an_interrupt_another_error_keeps_its_traceback(guarded):
    def work():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        cli.run_guarded(work)


def test_exit_now_joins_threads_runs_atexit_and_flushes(tmp_path):
    code = f"""
import atexit, sys, threading, time
sys.path.insert(0, {ROOT!r})
from bench.quick_exit import exit_now
atexit.register(lambda: open({str(tmp_path / 'atexit')!r}, 'w').write('ran'))
def late():
    time.sleep(0.3)
    open({str(tmp_path / 'thread')!r}, 'w').write('joined')
threading.Thread(target=late).start()
from concurrent.futures import ThreadPoolExecutor
pool = ThreadPoolExecutor(1)  # its worker thread ends only when told at exit (a hang if not)
pool.submit(print, end="")
sys.stdout.write('no newline, still flushed')
exit_now(3)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "no newline, still flushed"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "joined"


def test_the_private_cpython_exit_steps_quick_exit_uses_still_exist():
    """bench/quick_exit.py calls two private CPython functions, in the interpreter's own order. If a
    Python release renames or removes one, this fails here, by name, not at the end of every command."""
    import atexit
    import threading

    assert callable(getattr(threading, "_shutdown", None)), "threading._shutdown is gone: see bench/quick_exit.py"
    assert callable(getattr(atexit, "_run_exitfuncs", None)), "atexit._run_exitfuncs is gone: see bench/quick_exit.py"


def test_an_interrupt_raised_inside_a_finalizer_is_not_lost(guarded, capsys):
    """A Ctrl-C whose KeyboardInterrupt lands in a `__del__` (as one landed in SQLAlchemy's registry
    cleanup, and the run went on training for its 500 rounds): Python prints "Exception ignored" and
    swallows it; the guard delivers it again, so the command ends interrupted, exit 130, no traceback."""
    class Finalized:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # the handler raises KeyboardInterrupt here, inside __del__

    def work():
        Finalized()  # dropped at once: __del__ runs, its KeyboardInterrupt is unraisable
        import time
        for _ in range(500):  # "training": the re-delivered interrupt stops it
            time.sleep(0.01)
        return 0

    assert cli.run_guarded(work) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: interrupted"], err
    assert "Exception ignored" not in err and "Traceback" not in err


def test_other_unraisable_errors_still_reach_pythons_hook(guarded, capsys, monkeypatch):
    """Only a KeyboardInterrupt after a signal is taken over; another error in a finalizer is printed
    as Python prints it, and the hook is Python's again after the command."""
    class Broken:
        def __del__(self):
            raise ValueError("finalizer bug")

    def work():
        Broken()
        return 0

    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)  # Python's, not pytest's collector
    before = sys.unraisablehook
    assert cli.run_guarded(work) == 0
    assert "finalizer bug" in capsys.readouterr().err
    assert sys.unraisablehook is before


def test_sighup_ends_a_command_like_ctrl_c_unless_nohup_ignored_it(guarded):
    """A terminal's SIGHUP (default disposition) becomes the interrupt handler; a SIGHUP that `nohup`
    set to ignored stays ignored, so the command goes on when the terminal closes."""
    import signal

    from bench import cli

    cli.sigterm_as_interrupt()  # the guarded fixture starts SIGHUP at its default, as a terminal does
    assert signal.getsignal(signal.SIGHUP) is signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup hands its command
    cli.sigterm_as_interrupt()
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
