"""User-facing errors.

A `BenchError` is bad input or a condition the user can fix (unknown name, wrong type, missing
file, diverging solver). The CLIs print its message as one line and exit with code 2; any other
exception is a bug and keeps its traceback.
"""


class BenchError(Exception):
    """Bad input or an unrecoverable run condition, explained in one line."""


class Diverged(BenchError):
    """A run's numbers left the finite range: a solver's residual blew up, or NaN/inf reached an
    update or the server state. A result of the method's settings (`--keep-going` records it and goes
    on with the other runs), not a fault of the harness."""


def choices(names) -> str:
    """`a, b, c`: the valid choices, sorted, for an error message."""
    return ", ".join(sorted(names))


def unknown(kind: str, name: str, valid) -> BenchError:
    """`unknown method 'fedq'; choose from ditto, fedavg, fedeq`."""
    return BenchError(f"unknown {kind} {name!r}; choose from {choices(valid)}")
