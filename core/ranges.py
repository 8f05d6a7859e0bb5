"""The valid range of every numeric config field, declared with the field and checked in one place.

    lr: float = ranged(0.05, gt=0)
    fraction: float = ranged(1.0, gt=0, le=1)
    clients: int | None = ranged(None, ge=1)      # None is the field's own "unset", never range-checked
    checkpoint_every: int = ranged(10, ge=0, note="0: no checkpoints")
    dual_init: float = ranged(0.0)                # any finite number, on purpose

`ranged` is `dataclasses.field(default=...)` with a `Range` in its metadata, so the dataclass, its
defaults and its docstrings stay as they were (and a default outside its own range fails at import).
`check` is the one rule every config level goes through once its value is typed (bench/config.py:
a flag, `--set`, a TOML preset, a sweep bound, a whole config before a run):
  * a float field takes finite numbers only: nan, inf, -inf, and 1e400 (which parses to inf) are
    refused whatever the bounds, because `inf > 0` is true and a NaN compares false both ways;
  * an int field takes ints only (not 2.5, not true);
  * the value lies within the bounds; a tuple field (`seeds`) checks each element;
  * the value fits the type it becomes (`FITS`), whatever the bounds: a float field becomes a float32
    tensor or a torch optimizer's float next to float32 tensors, so |x| <= 3.4028e38 (1e39 would be
    inf there: `fedavg.lr=1e39` diverging, `fedeq.rho=1e300` a traceback); an int field becomes an
    int64 (an MLflow metric step, a checkpoint field, a torch or numpy integer), so it fits in int64.
The message is one line with the key as the user writes it, the rule and the value:
`fedavg.lr must be a finite number > 0, got nan`, `fraction must be in (0, 1], got 0.0`,
`rounds must be >= 1, got 0` (an int or finite number outside the bounds: the bounds say it all),
`fedavg.lr must be a finite number > 0 that float32 holds (|x| <= 3.4028e+38), got 1e+39`.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from fedeq_bench.core.errors import BenchError

FLOAT32_MAX = 3.4028234663852886e38
"""float32's largest finite value (numpy.finfo(numpy.float32).max)."""
INT64_MAX = 2**63 - 1

FITS = {float: (FLOAT32_MAX, "that float32 holds (|x| <= 3.4028e+38)"),
        int: (INT64_MAX, "that int64 holds (|x| <= 9223372036854775807)")}
"""The largest magnitude each kind of field takes, and how the error line says it: the type every
value of that kind becomes (module docstring). Declared once, checked by `check` for every field."""

RANGE = "range"
"""The `dataclasses.field` metadata key that holds a field's `Range`."""


@dataclass(frozen=True)
class Range:
    """Open (`gt`, `lt`) or closed (`ge`, `le`) bounds; None: unbounded on that side."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    note: str = ""
    """What a special value means, for the error line: `0: no checkpoints`."""

    def __post_init__(self):
        if (self.gt is not None and self.ge is not None) or (self.lt is not None and self.le is not None):
            raise ValueError(f"{self}: give one lower bound (gt or ge) and one upper bound (lt or le)")

    def __contains__(self, v) -> bool:
        return ((self.gt is None or v > self.gt) and (self.ge is None or v >= self.ge)
                and (self.lt is None or v < self.lt) and (self.le is None or v <= self.le))

    def bounds(self) -> str:
        """`> 0`, `>= 1`, `<= 2`, `in (0, 1]`; empty when unbounded."""
        def num(x) -> str:  # ints in full (4294967295), floats short (0.001, 1e-08)
            return str(x) if isinstance(x, int) else f"{x:g}"

        lo = ("(", self.gt) if self.gt is not None else ("[", self.ge) if self.ge is not None else None
        hi = (")", self.lt) if self.lt is not None else ("]", self.le) if self.le is not None else None
        if lo and hi:
            return f"in {lo[0]}{num(lo[1])}, {num(hi[1])}{hi[0]}"
        if lo:
            return f"{'>' if lo[0] == '(' else '>='} {num(lo[1])}"
        if hi:
            return f"{'<' if hi[0] == ')' else '<='} {num(hi[1])}"
        return ""


def ranged(default, *, gt=None, ge=None, lt=None, le=None, note: str = ""):
    """A dataclass field with a default and its valid range (see the module docstring)."""
    rng = Range(gt=gt, ge=ge, lt=lt, le=le, note=note)
    values = () if default is None else default if isinstance(default, tuple) else (default,)
    for d in values:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d not in rng:
            # A bug in a config class, raised when its module is imported.
            raise ValueError(f"default {default!r} is outside its own range {rng.bounds()!r}")
    return dataclasses.field(default=default, metadata={RANGE: rng})


def range_of(f: dataclasses.Field) -> Range | None:
    """The field's declared `Range`, or None if it declares none."""
    return f.metadata.get(RANGE)


def numeric_kind(tp) -> type | None:
    """`int` or `float` for a numeric field type (`float`, `int | None`, `tuple[int, ...]`); None otherwise."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        kinds = {numeric_kind(a) for a in typing.get_args(tp) if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    if origin is tuple:
        return numeric_kind(typing.get_args(tp)[0])
    return tp if tp in (int, float) else None


def rule(kind: type, rng: Range, many: bool = False, only_bounds: bool = False) -> str:
    """What the field takes, for an error: `a finite number > 0`, `an integer >= 1`, `in (0, 1]`,
    `integers >= 0` (a tuple's elements). `only_bounds`: the value has the right kind (an int, a
    finite float) and only lies outside the bounds, so the bounds alone say what is wrong: `> 0`."""
    bounds = rng.bounds()
    if many:
        what = "integers" if kind is int else "finite numbers"
    elif (only_bounds and bounds) or (kind is float and bounds.startswith("in ")):
        what = ""  # (a two-sided interval says finite by itself)
    else:
        what = "an integer" if kind is int else "a finite number"
    text = " ".join(p for p in (what, bounds) if p)
    return f"{text} ({rng.note})" if rng.note else text


def check(key: str, value: Any, tp, rng: Range) -> None:
    """Raise a one-line BenchError unless `value` (already typed as `tp`) is valid for a field of
    type `tp` declared with range `rng`. None passes: it is an Optional field's "unset"."""
    kind = numeric_kind(tp)
    if value is None or kind is None:
        return
    many = isinstance(value, tuple)
    for v in (value if many else (value,)):
        if isinstance(v, bool):
            ok = False
        elif kind is int:
            ok = isinstance(v, int)
        else:  # an int is finite however large (math.isfinite would overflow on a huge one)
            ok = isinstance(v, int) or (isinstance(v, float) and math.isfinite(v))
        if not ok or v not in rng:
            raise BenchError(f"{key} must be {rule(kind, rng, many, only_bounds=ok)}, got {v!r}")
        limit, fits = FITS[kind]
        if abs(v) > limit:
            raise BenchError(f"{key} must be {rule(kind, rng, many)} {fits}, got {v!r}")


def check_fields(obj, prefix: str = "") -> None:
    """`check` every ranged field of the config dataclass instance `obj`, keys written `prefix + name`."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        rng = range_of(f)
        if rng is not None:
            check(prefix + f.name, getattr(obj, f.name), hints[f.name], rng)
