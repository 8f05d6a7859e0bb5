"""Accepted values that fail later: a declared range (core/ranges.py) means the method works over all
of it. The table is generated from the declarations: every numeric field of RunConfig and of every
registered method's config, at its boundaries (`boundaries`), either finishes one tiny round of that
method (2 clients, serial, in-process, through the engine) or is refused by the range check with one
line before anything runs. Also: nothing is built per round up front (a run of 10^12 rounds starts at
once), with the cohorts drawn per round equal to the up-front schedule of the code before."""
from __future__ import annotations

import dataclasses
import math
import time
import typing

import pytest

from bench import config as C
from bench.experiment import load_dataset, validate
from bench.loop import engine
from bench.loop.backends import SerialBackend
from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.ranges import FLOAT32_MAX, INT64_MAX, numeric_kind, range_of
from fedeq_bench.methods import METHODS
from tests.helpers import tiny_config, write_tiny_npz


def boundaries(kind: type, rng) -> list[tuple[str, object]]:
    """(what, value) at the edges of a declared range: the lower bound (`ge`, or the next float above
    `gt`) and the next value above it; the upper bound (`le`, or the next float below `lt`); where a
    float is unbounded, float32's largest value (huge, within the range) and the next float above it
    (`overflow`: must be refused); an int's `overflow` is 2**63 (beyond int64). An int's huge value
    within the range is left out: 2**62 epochs or rounds is a valid run that never ends (rounds have
    their own test below, started and stopped)."""
    out: list[tuple[str, object]] = []
    if kind is int:
        lo = rng.ge if rng.ge is not None else None if rng.gt is None else rng.gt + 1
        if lo is not None:
            out += [("min", int(lo)), ("min+1", int(lo) + 1)]
        if rng.le is not None:
            out.append(("max", int(rng.le)))
        out.append(("overflow", INT64_MAX + 1))
        return out
    if rng.ge is not None:
        out += [("min", float(rng.ge)), ("min+eps", math.nextafter(float(rng.ge), math.inf))]
    elif rng.gt is not None:
        out.append(("min+eps", math.nextafter(float(rng.gt), math.inf)))
    else:
        out += [("huge", -FLOAT32_MAX), ("overflow", math.nextafter(-FLOAT32_MAX, -math.inf))]
    if rng.le is not None:
        out.append(("max", float(rng.le)))
    elif rng.lt is not None:
        out.append(("max-eps", math.nextafter(float(rng.lt), -math.inf)))
    else:
        out += [("huge", FLOAT32_MAX), ("overflow", math.nextafter(FLOAT32_MAX, math.inf))]
    return out


def numeric_fields(cls):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        rng, kind = range_of(f), numeric_kind(hints[f.name])
        if rng is not None and kind is not None:
            yield f.name, kind, rng


def members():
    """(method, key, what, value): the run's fields on fedavg, each method's own fields on it."""
    for name, kind, rng in numeric_fields(C.RunConfig):
        for what, value in boundaries(kind, rng):
            yield "fedavg", name, what, value
    for method in METHODS.names():
        for name, kind, rng in numeric_fields(METHODS.get(method).Config):
            for what, value in boundaries(kind, rng):
                yield method, f"{method}.{name}", what, value


MEMBERS = list(members())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_npz(tmp_path_factory.mktemp("d") / "tiny.npz", clients=2, n_train=12, n_test=4)


def test_the_table_covers_every_method_and_every_run_field():
    assert {m for m, *_ in MEMBERS} == set(METHODS.names())
    run_keys = {k for _, k, *_ in MEMBERS if "." not in k}
    assert {"rounds", "lr", "local_epochs", "fraction", "seeds", "state_budget_gb"} <= run_keys


@pytest.mark.parametrize("method, key, what, value", MEMBERS,
                         ids=[f"{k}={w}" for _, k, w, _ in MEMBERS])
def test_a_boundary_value_finishes_a_round_or_is_refused_before_anything_runs(tiny, method, key, what, value):
    typed = str(value) if key == "seeds" else value  # a tuple field takes its comma list
    try:
        cfg = validate(C.apply(tiny_config(tiny, methods=method, rounds=1), {key: typed}))
    except BenchError as e:  # the range check: one line naming the key
        line = str(e)
        assert "\n" not in line and line.startswith(f"{key} must be"), line
        assert what not in ("min", "min+1", "min+eps", "max", "max-eps"), f"a declared bound refused: {line}"
        return
    assert what != "overflow", f"{key}={value!r} overflows its type and was accepted"
    try:
        ds = load_dataset(cfg, cfg.run.seeds[0])
    except BenchError as e:  # refused by the data's own check, still before any round or any record
        assert "\n" not in str(e)
        return
    try:
        result = engine.run_method(cfg, method, cfg.run.seeds[0], ds, SerialBackend())
    except BenchError as e:
        # A step size or penalty as large as float32 holds may diverge: the divergence family's line,
        # naming method and round (the runs end FAILED), which says what to lower. Nothing else may.
        assert what == "huge" and str(e).startswith(f"{method}: round 1"), str(e)
        return
    last = result.history[-1]
    # A deadline shorter than any update takes none of them (clients/dropped_deadline): the round's
    # loss is a mean over no update, NaN, and the server stays as it was.
    nothing_arrived = key == "round_deadline" and last["clients/participated"] == 0 == last["bytes/up"]
    assert len(result.history) == cfg.run.rounds and (math.isfinite(last["loss/train"]) or nothing_arrived)


def test_a_float_that_float32_cannot_hold_is_one_line_naming_the_limit():
    """Values the reports found ending in a traceback or a misleading divergence."""
    for key, value in (("fedavg.lr", "1e39"), ("fedeq.rho", "1e300"), ("fedeq.dual_init", "-3.5e38")):
        with pytest.raises(BenchError) as e:
            C.apply(C.default_config(), {key: value})
        assert str(e.value).startswith(f"{key} must be") and "float32 holds (|x| <= 3.4028e+38)" in str(e.value)
    assert C.apply(C.default_config(), {"fedavg.lr": "3.4e38"}).methods["fedavg"].lr == 3.4e38


def test_zero_local_epochs_is_refused_with_the_valid_range():
    for key in ("local_epochs", "fedavg.local_epochs"):
        with pytest.raises(BenchError, match=f"^{key} must be >= 1, got 0$"):
            C.apply(C.default_config(), {key: "0"})


def test_rounds_must_fit_the_metric_step_type():
    with pytest.raises(BenchError, match=r"^rounds must be an integer >= 1 that int64 holds"):
        C.apply(C.default_config(), {"rounds": str(2**63)})
    assert C.apply(C.default_config(), {"rounds": str(2**63 - 1)}).run.rounds == 2**63 - 1


def test_cohorts_drawn_per_round_are_the_schedule_the_code_drew_up_front():
    """Expected values: `make_schedule` of the code before the cohorts were drawn lazily (commit
    a0915f6, which drew every round's cohort before round 1), printed for these arguments."""
    before = {
        (0, tuple(range(10)), 5, 0.3): [[2, 3, 7], [1, 5, 8], [0, 7, 8], [0, 1, 9], [0, 1, 7]],
        (7, (3, 1, 4, 15, 9, 2, 6), 4, 0.5): [[1, 3, 4, 15], [1, 4, 6, 15], [1, 4, 6, 9], [1, 3, 4, 15]],
        (123, tuple(range(30)), 3, 0.1): [[4, 19, 21], [0, 8, 11], [8, 14, 20]],
    }
    for (seed, ids, rounds, fraction), want in before.items():
        assert [engine.cohort_at(seed, list(ids), r, fraction) for r in range(1, rounds + 1)] == want
        assert engine.make_schedule(seed, list(ids), rounds, fraction) == want


class _Stop(Exception):
    pass


def test_a_run_of_a_trillion_rounds_starts_at_once(tiny):
    """Nothing is sized by the number of rounds before round 1 (the cohorts were: a list of 10^12)."""
    cfg = validate(tiny_config(tiny, methods="fedavg", rounds=10**12, eval_every=10**12))
    ds = load_dataset(cfg, 0)

    def stop(rnd, metrics):
        raise _Stop(rnd)

    t0 = time.perf_counter()
    with pytest.raises(_Stop) as e:
        engine.run_method(cfg, "fedavg", 0, ds, SerialBackend(), on_round=stop)
    assert e.value.args == (1,) and time.perf_counter() - t0 < 30  # about 0.1 s alone; 2 shared cores


def test_a_phase_of_zero_epochs_leaves_the_loss_of_the_others():
    from fedeq_bench.methods.train import phases_loss

    assert phases_loss((math.nan, 0), (0.5, 3)) == 0.5
    assert phases_loss((0.25, 1), (0.5, 3)) == (0.25 * 1 + 0.5 * 3) / 4  # the formula it replaced, bit for bit
    assert math.isnan(phases_loss((math.nan, 0), (math.nan, 0)))
