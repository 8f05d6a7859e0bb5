"""Writing the files the project writes for a user: one writer, so that no write destroys what it did not create.

Every file a command writes for its user (the report's index.html, report.md and figures, a tuned
preset, `bench.data describe --plot`) goes through `write`, and the command calls `check` with the
same arguments before its work starts (before training, sweeping or drawing), so a path it would
refuse costs nothing. The rules, each one line (a BenchError) naming the path:

- **Regular files only.** A folder, a named pipe, a device node or a socket at the path is refused,
  with or without `--force` (a write-and-rename would replace the device node or the pipe itself).
- **Never through a symbolic link.** A link at the path is refused, and so is a folder below the
  output folder (`root`) reached through a link planted in it: the folders below `root` are opened
  one at a time with O_NOFOLLOW, and the file is made and renamed relative to the last one's
  descriptor, so a link swapped in after the check is not followed either.
- **Never over a file it cannot recognise as its own.** Each kind of output says how it recognises
  its own (`owns`: a header, a marker such as matplotlib's name in a figure's metadata), from a
  sample of the file (its first 64 KiB and last 4 KiB, `sample`). Anything else is refused with a
  line naming `--force`; `force=True` replaces a regular file it does not recognise, and nothing else.
- **Atomic.** The bytes go to a temp file beside the target (`.NAME.XXXX.tmp`, made with O_EXCL and
  O_NOFOLLOW), fsync'd, then `os.replace`d over it, and the folder fsync'd. On any failure the temp
  file is removed and the old file is left as it was; a full disk, a quota or a read-only file system
  (ENOSPC, EDQUOT, EROFS) and every other OSError is one line.

    outputs.check(path, "report page", owns=outputs.contains(b"fedeq-bench report</title>"), force=args.force)
    outputs.write(path, page.encode(), "report page", owns=..., force=args.force)

`atomic_write` is the atomic part alone, for internal caches (the partition and data cache, the
checkpoints in MLflow's artifacts): it raises OSError as before, and it too refuses to replace a
symbolic link (ELOOP). `check_dir` is the check of an output folder made if missing (`--report-dir`,
`--out`).
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from fedeq_bench.core import files
from fedeq_bench.core.errors import BenchError

Owns = Callable[[bytes], bool]
"""How a kind of output recognises a file it wrote, from `sample(path)`."""

HEAD, TAIL = 1 << 16, 1 << 12
"""The sample an `Owns` sees: the file's first 64 KiB and its last 4 KiB (a PDF names its creator at its end)."""

FORCE_HINT = "give --force to replace it, or another path"

_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def starts_with(prefix: bytes) -> Owns:
    """Recognises a file that begins with `prefix` (a header line)."""
    return lambda head: head.startswith(prefix)


def contains(marker: bytes) -> Owns:
    """Recognises a file whose sample contains `marker`."""
    return lambda head: marker in head


MATPLOTLIB: Owns = contains(b"Matplotlib")
"""A figure saved by matplotlib: PNG, SVG, PDF, EPS and PS name it in their metadata (JPEG, TIFF,
WebP and raw do not, so such a file is replaced only with `--force`)."""


def _kind(mode: int) -> str:
    """The reader's words for what is at a path (`files.kind_of`), and the writer's two more."""
    if stat.S_ISLNK(mode):
        return "a symbolic link (never written through)"
    return "a file" if stat.S_ISREG(mode) else files.kind_of(mode)


def _refuse(path, what: str, why: str) -> BenchError:
    return BenchError(f"cannot write the {what} {os.fspath(path)!r}: {why}")


def _os_line(e: OSError, path, what: str) -> BenchError:
    """An OSError met writing, as one line: a full disk, a quota, a read-only file system, the rest."""
    reason = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
              errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied"}.get(e.errno or 0, e.strerror or str(e))
    code = f" ({errno.errorcode[e.errno]})" if e.errno is not None and e.errno in errno.errorcode else ""
    return _refuse(path, what, f"{reason}{code}; nothing was written and a previous file there is kept")


def sample(fd: int, size: int) -> bytes:
    """The first HEAD and the last TAIL bytes of the open file `fd` of `size` bytes."""
    head = os.pread(fd, HEAD, 0)
    return head + (os.pread(fd, TAIL, size - TAIL) if size > HEAD + TAIL else head[HEAD:])


def _parts(path, root) -> tuple[str, list[str], str]:
    """(root, the folders from root down to the file's, the file's name); root defaults to the file's folder."""
    p = os.path.abspath(os.fspath(path))
    base = os.path.abspath(os.fspath(root)) if root is not None else os.path.dirname(p)
    rel = os.path.relpath(os.path.dirname(p), base)
    if rel.startswith(os.pardir):
        raise ValueError(f"{p!r} is not under {base!r}")
    folders = [] if rel == os.curdir else rel.split(os.sep)
    return base, folders, os.path.basename(p)


def _check_at(dfd: int | None, name: str, path, what: str, owns: Owns | None, force: bool, hint: str) -> None:
    """The target `name` in the folder `dfd` (None: not made yet, so nothing is there) may be written."""
    if dfd is None:
        return
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, what, f"it is {_kind(st.st_mode)}, not a regular file; remove it, or give another path")
    if force:
        return
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    try:
        head = sample(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    if owns is None or not owns(head):
        raise _refuse(path, what, f"a file is there that this command did not write; {hint}")


@contextlib.contextmanager
def _folder(path, root, make: bool) -> Iterator[tuple[int | None, str]]:
    """(a descriptor of the file's folder, or None where a folder below root is still missing and
    `make` is False; the file's name). Every folder below `root` is opened with O_NOFOLLOW: a link
    there is refused (one line), never followed."""
    base, folders, name = _parts(path, root)
    fds: list[int] = []
    try:
        if make:
            os.makedirs(base, exist_ok=True)
        try:
            fds.append(os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        except FileNotFoundError:
            if make:
                raise
            yield None, name
            return
        for i, part in enumerate(folders):
            if make:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o777, dir_fd=fds[-1])
            try:
                fds.append(os.open(part, _NOFOLLOW_DIR, dir_fd=fds[-1]))
            except FileNotFoundError:
                if make:
                    raise
                yield None, name
                return
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                inside = os.path.join(base, *folders[:i + 1])
                st = os.stat(inside, follow_symlinks=False)
                raise BenchError(f"cannot write {os.fspath(path)!r}: {inside!r} inside the output folder is "
                                 f"{_kind(st.st_mode)}, not a folder; remove it") from None
        yield fds[-1], name
    finally:
        for fd in fds:
            os.close(fd)


def check(path, what: str, owns: Owns | None, *, force: bool = False, root=None, hint: str = FORCE_HINT) -> str:
    """`path` (a str) if `write` would write it (the module's rules); else one BenchError line. Call it
    before the work whose result goes there. `root`: the output folder the command was given (default:
    the file's folder); the folders below it must not be links. `hint`: how to replace a file this
    command did not write (`--force`)."""
    try:
        with _folder(path, root, make=False) as (dfd, name):
            _check_at(dfd, name, path, what, owns, force, hint)
    except OSError as e:
        raise _os_line(e, path, what) from None
    check_dir(os.path.dirname(os.path.abspath(os.fspath(path))), f"the {what}'s folder")  # made, or writable
    return os.fspath(path)


def check_folder(path, root) -> None:
    """One line if the folder `path` below the output folder `root`, or one between them, is a symbolic
    link or not a folder (a folder `write` would make into, not follow); a missing one is fine."""
    try:
        with _folder(os.path.join(os.fspath(path), "_"), root, make=False):
            pass
    except OSError as e:
        raise _os_line(e, path, "folder") from None


def _replace_at(dfd: int, name: str, write: Callable[[BinaryIO], object], check: Callable[[Path], None] | None,
                where: str) -> None:
    """`write(fileobj)` into a temp file beside `name` in the folder `dfd`, fsync, `check(temp path)`,
    os.replace onto `name`, fsync the folder; the temp file removed on any exception. A symbolic link
    at `name` is an OSError (ELOOP): replaced, it would no longer point where its owner meant."""
    tmp = f".{name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # not the umask's: a report, a cache or a data file is not secret
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(Path(where) / tmp)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISLNK(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
                raise OSError(errno.ELOOP, "is a symbolic link; not replaced", os.path.join(where, name))
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    with contextlib.suppress(OSError):  # the rename itself made durable; some file systems refuse a folder fsync
        os.fsync(dfd)


def _as_writer(data: bytes | Callable[[BinaryIO], object]) -> Callable[[BinaryIO], object]:
    return (lambda f: f.write(data)) if isinstance(data, (bytes, bytearray)) else data


def write(path, data: bytes | Callable[[BinaryIO], object], what: str, owns: Owns | None, *, force: bool = False,
          root=None, hint: str = FORCE_HINT) -> str:
    """Write `data` (bytes, or a function that writes into a binary file object) to `path` by the
    module's rules; returns `path` as a str. Folders below `root` (default: the file's folder) are
    made if missing; `root` itself too. Raises one BenchError line where `check` would, and on an
    OSError while writing (the old file intact, no temp file left)."""
    try:
        with _folder(path, root, make=True) as (dfd, name):
            assert dfd is not None
            _check_at(dfd, name, path, what, owns, force, hint)
            _replace_at(dfd, name, _as_writer(data), None, os.path.dirname(os.path.abspath(os.fspath(path))))
    except OSError as e:
        raise _os_line(e, path, what) from None
    return os.fspath(path)


def check_dir(path, what: str) -> str:
    """`path` (as a str) if it is, or can be made as, a folder this user writes into: checked before
    the work whose results go there, not after it. One line when the path is a file, when a part of it
    is a file, or when the folder it would be made in (or it itself) is not writable. Where the folder
    is missing, a folder is made and removed at once where it would be made, so that a place where
    none can be made (`/proc/x`, a read-only or full disk that `access` does not see) is refused
    before the work too, and nothing is left behind."""
    p = os.fspath(path)
    probe = os.path.abspath(p)
    while not os.path.lexists(probe):  # the nearest part that exists: the folders below it get made
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        kind = _kind(os.stat(probe).st_mode) if os.path.exists(probe) else "a broken symbolic link"
        the = kind.replace("a ", "the ", 1)
        which = f"is {kind}" if probe == os.path.abspath(p) else f"lies under {the} {probe!r}"
        raise BenchError(f"{what} {p!r} {which}; expected a folder (it is made if missing)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BenchError(f"{what} {p!r}: {probe!r} is not writable by this user; give a folder you can write")
    if probe != os.path.abspath(p):
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".fedeq-bench-probe-", dir=probe))
        except OSError as e:
            raise BenchError(f"{what} {p!r}: no folder can be made in {probe!r} ({e.strerror or e}); "
                             f"give a folder you can write") from None
    return p


def atomic_write(path, write: Callable[[BinaryIO], object], check: Callable[[Path], None] | None = None) -> None:
    """The atomic part alone, for internal files (caches, checkpoints): `write(fileobj)` into a temp
    file beside `path`, fsync, `check(temp path)` (may raise), then os.replace onto `path`. Its folder
    is made if missing. On any exception the temp file is removed and `path` is untouched; OSErrors
    pass as they are (the caller decides), a symbolic link at `path` among them (ELOOP)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _replace_at(dfd, path.name, write, check, str(path.parent))
    finally:
        os.close(dfd)
