"""Command lines a command prints for its user to run (`rerun with: ...`, `browse with: ...`,
`continue with: ...`): the interpreter and console scripts as words that run as printed, and a
recorded command line with some of its keys taken out."""
from __future__ import annotations

import os
import shlex
import sys
import typing


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
