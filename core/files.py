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
"""
from __future__ import annotations

import contextlib
import errno
import os
import pickle
import tarfile
import zipfile
import zlib
from collections.abc import Iterator

from fedeq_bench.core.errors import BenchError

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


def require_file(path, what: str, expected: str = "a file") -> str:
    """`path` (as a str) if it is a file; else one line: not found, or a folder."""
    p = os.fspath(path)
    if os.path.isfile(p):
        return p
    if os.path.isdir(p):
        raise BenchError(f"{what} {_name(p)} is a folder; expected {expected}")
    if os.path.lexists(p) and not os.path.exists(p):
        raise BenchError(f"{what} {_name(p)} is a broken symbolic link; expected {expected}")
    if os.path.exists(p):
        raise BenchError(f"{what} {_name(p)} is not a regular file (a device or pipe); expected {expected}")
    raise BenchError(f"{what} {_name(p)} not found; expected {expected}")


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


def read_bytes(path, what: str, expected: str = "a readable file") -> bytes:
    """The whole file, or one line (missing, a folder, unreadable)."""
    require_file(path, what, expected)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise _os_error(e, path, what, expected) from None


def read_text(path, what: str, expected: str = "UTF-8 text") -> str:
    """The whole file decoded as UTF-8, or one line (missing, a folder, unreadable, not UTF-8 text)."""
    data = read_bytes(path, what, expected)
    with parsing(path, what, expected):
        return data.decode("utf-8")


def require_output_dir(path, what: str) -> str:
    """`path` (as a str) if it is, or can be made as, a folder this user writes into: checked before
    the work whose results go there, not after it. One line when the path is a file, when a part of it
    is a file, or when the folder it would be made in (or it itself) is not writable."""
    p = os.fspath(path)
    probe = os.path.abspath(p)
    while not os.path.lexists(probe):  # the nearest part that exists: the folders below it get made
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        which = "is a file" if probe == os.path.abspath(p) else f"lies under the file {probe!r}"
        raise BenchError(f"{what} {_name(p)} {which}; expected a folder (it is made if missing)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BenchError(f"{what} {_name(p)}: {probe!r} is not writable by this user; give a folder you can write")
    return p
