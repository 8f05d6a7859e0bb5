"""Reading the files and folders a user names: one line for every way a path can be wrong.

Every reader of a user-given path (a dataset file or folder, `--data-dir`, the files found in it)
goes through these helpers, so a path that is missing, unreadable, of the wrong kind (a folder where
a file is expected, or the reverse), or whose bytes do not decode or parse (a truncated .npz, a zip
that is not an npz, garbage in a .gz, invalid JSON, text that is not UTF-8) ends as one BenchError
line naming the path and what was expected, never a traceback:

    data = read_bytes(path, "npz dataset", expected="a .npz archive")
    text = read_text(path, "shakespeare play text")            # UTF-8, or one line saying where it is not
    with parsing(path, "FEMNIST JSON file", "LEAF JSON"):       # the parser's own errors, as one line
        doc = json.loads(text)
    folder = require_dir(path, "femnist data folder")

`what` says what the path is for (`npz dataset`, `--data-dir`); `expected` what it should hold.

Every read opens the path with O_NONBLOCK (a named pipe with no writer never blocks), checks the
opened descriptor with fstat (a regular file only: a pipe, a device such as /dev/zero, a socket or a
folder is one line, before a byte is read) and caps the size per kind (`limit`: `SMALL_LIMIT` for a
preset, a search space or a tuned preset, `DATA_LIMIT` for a dataset file; the line says the cap):
`open_input` for a parser that reads from a file object (np.load, tarfile), `read_bytes` and
`read_text` for the whole file.
"""
from __future__ import annotations

import contextlib
import errno
import os
import pickle
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from typing import BinaryIO

from fedeq_bench.core.errors import BenchError

SMALL_LIMIT = 1 << 20
"""The largest preset, search space or tuned preset read (1 MiB; the shipped ones are a few KiB)."""
DATA_LIMIT = 1 << 34
"""The largest dataset file read (16 GiB; Fashion-MNIST's largest is 26 MB, CIFAR-100's tarball 169 MB)."""

DECODE_ERRORS = (UnicodeDecodeError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, tarfile.TarError,
                 pickle.UnpicklingError)
"""What a parser raises on bytes it cannot make sense of (json.JSONDecodeError and np.load's errors
are ValueErrors). Parsers also raise OSErrors without an errno (gzip.BadGzipFile, numpy's "failed to
interpret file"): those are corrupt data too, while an OSError with an errno is the system's (missing,
a folder, permission denied)."""


def one_line(text: object, limit: int = 200) -> str:
    """An exception's text folded to one line (a library message may span several) and capped."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _name(path) -> str:
    return repr(os.fspath(path))


def _os_error(e: OSError, path, what: str, expected: str) -> BenchError:
    """An OSError with an errno, met opening or reading `path`, as one line saying which case it is."""
    where = f"{what} {_name(path)}"
    if isinstance(e, FileNotFoundError) or e.errno == errno.ENOENT:
        return BenchError(f"{where} not found; expected {expected}")
    if isinstance(e, IsADirectoryError) or e.errno == errno.EISDIR:
        return BenchError(f"{where} is a folder; expected {expected}")
    if isinstance(e, NotADirectoryError) or e.errno == errno.ENOTDIR:
        return BenchError(f"{where}: a part of the path is a file, not a folder; expected {expected}")
    if isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EPERM):
        return BenchError(f"{where} cannot be read (permission denied); expected {expected}")
    return BenchError(f"cannot read {where} ({e.strerror or one_line(e)}); expected {expected}")


def decode_error(e: BaseException, path, what: str, expected: str) -> BenchError:
    """A parser's error on the bytes of `path` (or an OSError reading them) as one line."""
    if isinstance(e, OSError) and e.errno is not None:
        return _os_error(e, path, what, expected)
    if isinstance(e, UnicodeDecodeError):
        bad = e.object[e.start:e.start + 1] if isinstance(e.object, (bytes, bytearray)) else b""
        return BenchError(f"{what} {_name(path)} is not UTF-8 text (byte {e.start}: {bytes(bad)!r}); "
                          f"expected {expected}")
    return BenchError(f"{what} {_name(path)} is corrupt or truncated, or not {expected} "
                      f"({type(e).__name__}: {one_line(e) or 'no detail'})")


@contextlib.contextmanager
def parsing(path, what: str, expected: str) -> Iterator[None]:
    """Inside the block, an OSError or a parser's error (`DECODE_ERRORS`) on `path` becomes one
    BenchError line naming the path and `expected`; a BenchError raised inside passes unchanged."""
    try:
        yield
    except BenchError:
        raise
    except (OSError, *DECODE_ERRORS) as e:
        raise decode_error(e, path, what, expected) from None


def kind_of(mode: int) -> str:
    """What a path that is not a regular file is, in words (its `st_mode`)."""
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _not_regular(path, what: str, expected: str, mode: int) -> BenchError:
    if stat.S_ISDIR(mode):
        return BenchError(f"{what} {_name(path)} is a folder; expected {expected}")
    return BenchError(f"{what} {_name(path)} is not a regular file ({kind_of(mode)}); expected {expected}")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} bytes"


def _too_big(path, what: str, size: int | None, limit: int) -> BenchError:
    said = f"{size:,} bytes" if size is not None else "larger than that"
    return BenchError(f"{what} {_name(path)} is {said}, over the {_size(limit)} limit for a {what}; "
                      f"give a smaller file")


def require_file(path, what: str, expected: str = "a file") -> str:
    """`path` (as a str) if it is a regular file; else one line: not found, a folder, a broken link, a
    device or pipe (what it is named)."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except OSError as e:
        if os.path.lexists(p) and e.errno == errno.ENOENT:
            raise BenchError(f"{what} {_name(p)} is a broken symbolic link; expected {expected}") from None
        raise _os_error(e, p, what, expected) from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(p, what, expected, st.st_mode)
    return p


def open_input(path, what: str, expected: str = "a readable file", limit: int = DATA_LIMIT) -> BinaryIO:
    """`path` opened for reading (binary), or one line: missing, unreadable, not a regular file (a
    folder, a pipe, a device), or over `limit` bytes. Opened with O_NONBLOCK, so a named pipe never
    blocks; the checks are on the opened descriptor (fstat), so a path swapped after `require_file`
    is caught too. The returned file blocks as usual."""
    p = require_file(path, what, expected)  # one line without opening a device (which may have effects)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise _os_error(e, p, what, expected) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(p, what, expected, st.st_mode)
        if st.st_size > limit:
            raise _too_big(p, what, st.st_size, limit)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def require_dir(path, what: str, expected: str = "a folder") -> str:
    """`path` (as a str) if it is a folder that can be listed; else one line: not found, a file, or
    unreadable."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise BenchError(f"{what} {_name(p)} not found; expected {expected}")
    if not os.path.isdir(p):
        raise BenchError(f"{what} {_name(p)} is a file, not a folder; expected {expected}")
    try:
        os.listdir(p)
    except OSError as e:
        raise _os_error(e, p, what, expected) from None
    return p


def read_bytes(path, what: str, expected: str = "a readable file", limit: int = DATA_LIMIT) -> bytes:
    """The whole file, or one line (missing, a folder, a pipe or device, over `limit`, unreadable)."""
    with open_input(path, what, expected, limit) as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise _os_error(e, path, what, expected) from None
    if len(data) > limit:  # it grew after the fstat
        raise _too_big(path, what, None, limit)
    return data


def read_text(path, what: str, expected: str = "UTF-8 text", limit: int = DATA_LIMIT) -> str:
    """The whole file decoded as UTF-8, or one line (as `read_bytes`, or not UTF-8 text)."""
    data = read_bytes(path, what, expected, limit)
    with parsing(path, what, expected):
        return data.decode("utf-8")


def require_output_dir(path, what: str) -> str:
    """`path` if it is, or can be made as, a folder this user writes into (core/outputs.py `check_dir`)."""
    from fedeq_bench.core.outputs import check_dir

    return check_dir(path, what)
