"""bench/cli.py `run_guarded` on failed output, in isolation: every kind of full-disk error (the errnos
of `FULL_DISK`, and SQLite's SQLITE_FULL), raised directly or as the cause of a library's own error,
is one line naming what could not be written and exit 2; a closed reader is exit 141; another
OSError is still a bug with its traceback. The whole commands: tests/integration/test_entry_guard.py."""
import errno
import sqlite3

import pytest

from bench import cli


def sqlite_full():
    con = sqlite3.connect(":memory:")
    try:
        con.execute("pragma max_page_count = 1")  # a database that can hold nothing: SQLITE_FULL
        con.execute("create table t (x)")
        con.executemany("insert into t values (?)", [("x" * 1000,)] * 100)
    except sqlite3.Error as e:
        return e
    raise AssertionError("sqlite did not fill up")


def raised(exc, wrapped):
    if not wrapped:
        return exc
    try:
        raise exc
    except BaseException as e:
        try:
            raise RuntimeError("the library's own error") from e
        except RuntimeError as outer:
            return outer


CASES = [(f"{name}-{'wrapped' if w else 'direct'}", exc, w, what)
         for name, exc, what in [*[(errno.errorcode[n], OSError(n, "full", "/data/out/ledger.csv"),
                                    "'/data/out/ledger.csv'") for n in cli.FULL_DISK],
                                 ("ENOSPC-no-name", OSError(errno.ENOSPC, "full"), "a file (the system did not say"),
                                 ("SQLITE_FULL", sqlite_full(), "a SQLite database")]
         for w in (False, True)]


@pytest.mark.parametrize("name, exc, wrapped, what", CASES, ids=[c[0] for c in CASES])
def test_a_full_disk_is_one_line_naming_what_and_exit_2(guarded, capsys, name, exc, wrapped, what):
    def work():
        raise raised(exc, wrapped)

    assert cli.run_guarded(work) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no space left on the device") and what in err, err


def test_a_closed_reader_is_exit_141_and_another_os_error_is_a_bug(guarded, capsys, tmp_path):
    import os

    r, w = os.pipe()
    os.close(r)
    with os.fdopen(w, "w") as pipe:
        def work():
            cli.sys.stdout = cli._Guarded(pipe, "standard output")
            print("x" * 100000)  # more than the buffer: the write itself fails
            return 0
        assert cli.run_guarded(work) == cli.EXIT_OUTPUT_CLOSED
    assert capsys.readouterr().err.startswith("error: standard output was closed by its reader")

    def other():
        raise OSError(errno.EIO, "input/output error")

    with pytest.raises(OSError):
        cli.run_guarded(other)


def test_a_closed_reader_met_inside_a_library_is_still_exit_141(guarded, capsys):
    """A library that wraps the failed write in its own error (its cause is the stream's)."""
    err = cli.StreamError(32, "Broken pipe")  # errno.EPIPE
    err.stream = "standard output"

    def work():
        try:
            raise err
        except OSError as e:
            raise RuntimeError("a progress bar could not write") from e

    assert cli.run_guarded(work) == cli.EXIT_OUTPUT_CLOSED
    assert capsys.readouterr().err.startswith("error: standard output was closed by its reader")
