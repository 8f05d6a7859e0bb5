"""The report's tables, built from `ReportData` (bench/report/model.py); no MLflow, no torch.

    group_tables(group, parents, target=0.95)  # per group: accuracy, communication, cost, every run
    verdict(group)                             # per group: the answer at a glance, one paragraph

(A parent run's provenance is bench/report/provenance.py's; a study's tables are bench/report/sweep.py's.)

Only FINISHED runs enter the numbers; every run, whatever its status, is a row of the runs table.
The headline, in every report, is HEADLINE (acc/weighted) as the mean of its last k evaluated rounds
(`last_k`), one lucky round deciding nothing; the final round and the best round stand beside it.
A cell over seeds is `mean ± std` with the SAMPLE std (ddof=1, bench/experiment/ `seed_stat`), as
`bench.run`'s terminal table; one seed: the mean alone. Accuracy has 4 decimals and MB at least 3
decimals and 4 significant digits, so every number can be checked against MLflow (the tests do).
"""
from __future__ import annotations

import math
import shlex
from collections.abc import Callable, Sequence

from bench import commands
from bench.report.model import Cell, Group, Provenance, RunRecord, Table
from bench.report.stats import Stat, seed_stat

REFERENCE = "fedeq"
"""The method the ratio column compares with (the method this benchmark is about)."""
DASH = "—"
HEADLINE = "acc/weighted"
"""The headline metric of every report (comparison and sweep): accuracy over all test samples of all
clients, the figure comparable with the FeDEQ paper."""
ACCURACY = ("acc/mean", "acc/bottom10", "acc/unseen")
"""The other accuracies, final round."""
LAST_K, FINAL, BEST_ROUND = f"{HEADLINE} last-k", f"{HEADLINE} final", f"{HEADLINE} best round"

# -- one run's numbers ----------------------------------------------------------------------------


def total(r: RunRecord, metric: str) -> float:
    """Sum of a per-round metric over the run's rounds; nan when never logged."""
    _, v = r.series(metric)
    return math.fsum(v) if v else math.nan


def per_round(r: RunRecord, metric: str) -> float:
    _, v = r.series(metric)
    return math.fsum(v) / len(v) if v else math.nan


def peak(r: RunRecord, metric: str) -> float:
    _, v = r.series(metric)
    return max(v) if v else math.nan


def last_k_mean(r: RunRecord, metric: str, k: int) -> float:
    """Mean of the metric's last k logged (evaluated) rounds, all of them when fewer; nan when never logged."""
    _, v = r.series(metric)
    return math.fsum(v[-k:]) / len(v[-k:]) if v else math.nan


def mb_to_target(r: RunRecord, target: float, k: int = 1, metric: str = "bytes/cumulative",
                 scale: float = 1e-6) -> float | None:
    """MB sent (bytes/cumulative, up + down) up to and including the first evaluated round at which the
    mean HEADLINE of that round and the k - 1 evaluated rounds before it reaches `target` (k = 1: the
    round's own accuracy); None when no such window does. A window needs k evaluated rounds, so with
    k > 1 one lucky early round does not reach the target. `metric` x `scale`: another cumulative
    measure at that round instead (SIM_TIME_CUMULATIVE, 1.0: the simulated seconds to the target)."""
    sent = dict(r.history.get(metric, []))
    acc = r.history.get(HEADLINE, [])
    for i in range(k - 1, len(acc)):
        rnd = acc[i][0]
        if math.fsum(a for _, a in acc[i - k + 1:i + 1]) / k >= target and rnd in sent:
            return sent[rnd] * scale
    return None


def wall_s(r: RunRecord) -> float:
    """Sum of time/round_s (training and evaluation rounds; data loading and setup not counted), as
    bench.run's table and summary.json; the run's end - start when it logged no round times."""
    s = total(r, "time/round_s")
    if math.isnan(s) and r.start_ms is not None and r.end_ms is not None:
        return (r.end_ms - r.start_ms) / 1e3
    return s


# (column, per-run value, format, best: max or min or None), per table. MB columns are per client
# message bytes / 1e6, as bench/experiment/'s SUMMARY. The last-k column's value needs k: see columns().
Column = tuple[str, Callable[[RunRecord], float], str, Callable | None]
COMMUNICATION: list[Column] = [
    ("MB up/round", lambda r: per_round(r, "bytes/up") / 1e6, "mb", min),
    ("MB down/round", lambda r: per_round(r, "bytes/down") / 1e6, "mb", min),
    ("MB up", lambda r: total(r, "bytes/up") / 1e6, "mb", min),
    ("MB down", lambda r: total(r, "bytes/down") / 1e6, "mb", min),
    ("MB total", lambda r: r.final("bytes/cumulative") / 1e6, "mb", min),
]
COST: list[Column] = [
    ("peak train MB", lambda r: peak(r, "mem/peak_train_bytes") / 1e6, "mb", min),
    # The mean over rounds of a local update's FLOPs (bench/loop/flops.py), in 10^9.
    ("GFLOP/update", lambda r: per_round(r, "compute/flops_update") / 1e9, "mb", min),
    # Parameter counts are a property of the method, not a score: no best is marked.
    ("params shared", lambda r: float(r.params.get("params/shared", "nan")), "int", None),
    ("params personal", lambda r: float(r.params.get("params/personal", "nan")), "int", None),
    ("wall s", wall_s, "s", min),
]
TARGET_COLUMN, RATIO_COLUMN, MEMORY_RATIO_COLUMN = "MB to target", "bytes vs FeDEQ", "memory vs FeDEQ"
FLOPS_RATIO_COLUMN = "FLOPs vs FeDEQ"

def accuracy_columns(k: int) -> list[Column]:
    return [(LAST_K, lambda r: last_k_mean(r, HEADLINE, k), "acc", max),
            (FINAL, lambda r: r.final(HEADLINE), "acc", max),
            (BEST_ROUND, lambda r: peak(r, HEADLINE), "acc", max),
            *((name, (lambda n: lambda r: r.final(n))(name), "acc", max) for name in ACCURACY)]


# -- formatting -----------------------------------------------------------------------------------


def decimals(kind: str, x: float) -> int:
    """acc: 4; MB: at least 3 and at least 4 significant digits (0.06120, 12.300); s: 2; int: 0; count
    (clients summed over a run): 2, the mean of unequal seeds (every seed's count equal: 0, as int)."""
    if kind == "mb":
        return max(3, 3 - math.floor(math.log10(abs(x)))) if x and math.isfinite(x) else 3
    return {"acc": 4, "s": 2, "int": 0, "count": 2}[kind]


def fmt(x: float, kind: str) -> str:
    return f"{x:.{decimals(kind, x)}f}"


def stat_cell(values: list[float], kind: str) -> Cell:
    """`mean ± std` over seeds (sample std), the mean alone for one seed, a dash when a value is missing."""
    if not values or any(math.isnan(v) for v in values):
        return Cell(DASH)
    s: Stat = seed_stat(values)
    d = decimals(kind, s.mean)
    if kind in ("int", "count") and not s.std:  # one seed, or equal seeds: the count itself
        return Cell(f"{s.mean:.0f}", s.mean)
    text = f"{s.mean:.{d}f}" + (f" ± {s.std:.{d}f}" if len(values) > 1 else "")
    return Cell(text, s.mean)


def mark_best(rows: list[list[Cell]], col: int, better) -> None:
    """Mark every cell of column `col` that holds the best value (max or min; ties all marked)."""
    vals = [v for v in (row[col].value for row in rows) if v is not None and not math.isnan(v)]
    if not vals:
        return
    best = better(vals)
    for row in rows:
        if row[col].value is not None and row[col].value == best:
            row[col].best = True


# -- a comparison ---------------------------------------------------------------------------------


def finished(group: Group, method: str) -> list[RunRecord]:
    """The method's FINISHED run of each seed, in seed order; the newest where several comparisons of
    one experiment ran the same method and seed (their configs may differ: never average them)."""
    latest: dict[int, RunRecord] = {}
    for r in group.runs:
        if r.method == method and r.status == "FINISHED":
            if r.seed not in latest or (r.start_ms or 0) >= (latest[r.seed].start_ms or 0):
                latest[r.seed] = r
    return [latest[s] for s in sorted(latest)]


def repeat_notes(group: Group) -> list[str]:
    """`fedeq seed 0: 2 FINISHED runs; the numbers use the newest, <id>` where a seed ran more than once."""
    notes = []
    for m in group.methods:
        for r in finished(group, m):
            n = sum(1 for o in group.runs if o.method == m and o.seed == r.seed and o.status == "FINISHED")
            if n > 1:
                notes.append(f"{m} seed {r.seed}: {n} FINISHED runs (several comparisons); "
                             f"the numbers use the newest, {r.run_id}")
    return notes


def seed_notes(group: Group) -> list[str]:
    """`fedrep: no FINISHED run for seed 1 (FAILED)` for every method x seed of the group without one;
    a diverged run says where (`FAILED, diverged: fedeq: round 25, client 10: ...`)."""
    notes = []
    for m in group.methods:
        for s in group.seeds:
            rs = [r for r in group.runs if r.method == m and r.seed == s]
            if not any(r.status == "FINISHED" for r in rs):
                why = ", ".join(f"{r.status}, diverged: {r.diverged}" if r.diverged else r.status for r in rs) or "no run"
                notes.append(f"{m}: no FINISHED run for seed {s} ({why})")
    return notes


def last_k(group: Group, k: int | None = None) -> tuple[int, int]:
    """(k, n): the last-k window and the most evaluated rounds (logged HEADLINE values) of a FINISHED run
    of the group. k: as given (at most n), else a tenth of n rounded down, at least 1."""
    n = max((len(r.history.get(HEADLINE, [])) for r in group.runs if r.status == "FINISHED"), default=0)
    k = min(k, n) if k is not None else n // 10
    return max(1, k), n


def method_means(group: Group, get: Callable[[RunRecord], float]) -> dict[str, float]:
    """Method -> mean over its FINISHED seeds of `get(run)`, for the methods whose every seed has a value."""
    out = {}
    for m in group.methods:
        vals = [get(r) for r in finished(group, m)]
        if vals and not any(math.isnan(v) for v in vals):
            out[m] = seed_stat(vals).mean
    return out


def target_of(group: Group, fraction: float, k: int = 1) -> tuple[float, str, float] | None:
    """(target accuracy, best method, its mean last-k HEADLINE): `fraction` of the best method's."""
    means = method_means(group, lambda r: last_k_mean(r, HEADLINE, k))
    if not means:
        return None
    best = max(means, key=means.__getitem__)
    return fraction * means[best], best, means[best]


def target_cell(runs: list[RunRecord], target: float | None, k: int = 1, metric: str = "bytes/cumulative",
                scale: float = 1e-6, kind: str = "mb") -> Cell:
    """mean ± std over seeds of `mb_to_target` (of `metric` x `scale`); `never` when no seed reaches the
    target, `never in N of M seeds` when some do not; a dash when a seed did not log `metric`."""
    if target is None or not runs or any(not r.history.get(metric) for r in runs):
        return Cell(DASH)
    mbs = [mb_to_target(r, target, k, metric, scale) for r in runs]
    reached = [x for x in mbs if x is not None]
    if not reached:
        return Cell("never")
    if len(reached) < len(mbs):
        return Cell(f"never in {len(mbs) - len(reached)} of {len(mbs)} seeds")
    return stat_cell(reached, kind)


def model_of(group: Group, m: str) -> str:
    return next((r.model for r in finished(group, m)), next(r.model for r in group.runs if r.method == m))


def ratio_cells(group: Group, get: Callable[[RunRecord], float], what: str, notes: list[str]) -> dict[str, Cell]:
    """Method -> `1.29x`: its mean of `get` over the REFERENCE method's, with a note per method
    (`fedrep sends 1.29x the bytes of fedeq`); {} when the group has no REFERENCE run with a value > 0."""
    means = method_means(group, get)
    ref = means.get(REFERENCE)
    if ref is None or not ref > 0:
        return {}
    out = {}
    for m in group.methods:
        if m in means:
            ratio = means[m] / ref
            out[m] = Cell(f"{ratio:.2f}x", ratio)
            if m != REFERENCE:
                notes.append(what.format(method=m, ratio=f"{ratio:.2f}x", ref=REFERENCE))
        else:
            out[m] = Cell(DASH)
    return out


def seeds_note(group: Group) -> str:
    n = sorted({len(finished(group, m)) for m in group.methods} - {0, 1})
    return (f"mean ± sample std (ddof=1) over {' or '.join(map(str, n))} seeds" if n
            else "one seed per method (no std)")


BEST_NOTE = "best value of each column in bold (highest accuracy; fewest MB, least memory, least time)"


def stat_table(group: Group, title: str, columns: list[Column], lead: list[str], notes: list[str],
               extra: dict[str, dict[str, Cell]] | None = None, after: dict[str, str] | None = None,
               best_extra: tuple[str, ...] = ()) -> Table:
    """One row per method: `lead` columns (method, model, seeds), a stat cell per column over FINISHED
    seeds, and the `extra` columns (name -> method -> cell), each right after the column `after` names
    for it (default: at the end); best values marked."""
    extra = extra or {}
    head = list(lead)
    for name in [c[0] for c in columns]:
        head += [name, *(e for e in extra if (after or {}).get(e) == name)]
    head += [e for e in extra if e not in head]
    rows = []
    for m in group.methods:
        runs = finished(group, m)
        cells = {"method": Cell(m), "model": Cell(model_of(group, m)), "seeds": Cell(str(len(runs)), float(len(runs))),
                 **{name: stat_cell([get(r) for r in runs], kind) for name, get, kind, _ in columns},
                 **{name: by_method.get(m, Cell(DASH)) for name, by_method in extra.items()}}
        rows.append([cells[c] for c in head])
    for name, _, _, better in columns:
        if better is not None:
            mark_best(rows, head.index(name), better)
    for name in best_extra:
        mark_best(rows, head.index(name), min)
    return Table(f"{group.title}: {title}", head, rows, notes)


def accuracy_table(group: Group, k: int, n: int) -> Table:
    """Headline accuracy (last-k mean, final round, best round) and the other final accuracies."""
    notes = [f"headline: {HEADLINE}, the mean of the last k = {k} of {n} evaluated rounds (a tenth, at least 1, "
             f"unless --last-k says), so that one round does not decide; beside it the final round and the best "
             f"round; acc/mean, acc/bottom10, acc/unseen: final round", seeds_note(group),
             BEST_NOTE + "; only FINISHED runs count"]
    for m in group.methods:
        if not finished(group, m):
            statuses = ", ".join(sorted({r.status for r in group.runs if r.method == m}))
            notes.append(f"{m}: no FINISHED run ({statuses}); its rows are empty")
    return stat_table(group, "accuracy", accuracy_columns(k), ["method", "model", "seeds"],
                      notes + seed_notes(group) + repeat_notes(group))


def target_note(column: str, what: str, tgt: tuple[float, str, float] | None, target_fraction: float,
                k: int) -> str:
    """How `column` (MB or simulated seconds to the target) is measured, with the target's value."""
    if tgt is None:
        return f"{column}: no FINISHED run logged {HEADLINE}, so there is no target"
    window = (f"the mean {HEADLINE} of {k} consecutive evaluated rounds first reaches" if k > 1
              else f"{HEADLINE} first reaches")
    return (f"{column}: {what} until {window} {tgt[0]:.4f} = {target_fraction:.0%} of the best mean last-{k} "
            f"{HEADLINE} ({tgt[1]}, {tgt[2]:.4f}); mean over seeds; never: no window reaches it")


def communication_table(group: Group, target_fraction: float, k: int) -> Table:
    """Bytes per round and in total, MB to the target accuracy, bytes as a multiple of FeDEQ's."""
    tgt = target_of(group, target_fraction, k)
    target = tgt[0] if tgt else None
    notes = [seeds_note(group), "MB up/round, MB down/round: mean over rounds; MB up, MB down, MB total "
             "(bytes/cumulative): over the run",
             target_note(TARGET_COLUMN, "MB sent (up + down, bytes/cumulative, at the window's last round)", tgt,
                         target_fraction, k)]
    cells = {TARGET_COLUMN: {m: target_cell(finished(group, m), target, k) for m in group.methods}}
    ratio = ratio_cells(group, lambda r: r.final("bytes/cumulative"), "{method} sends {ratio} the bytes of {ref} "
                        "(MB total, mean over seeds)", notes)
    if ratio:
        cells[RATIO_COLUMN] = ratio
    return stat_table(group, "communication", COMMUNICATION, ["method"], notes, cells, best_extra=(TARGET_COLUMN,))


def cost_table(group: Group) -> Table:
    """Peak training memory (and as a multiple of FeDEQ's), parameter counts, wall time."""
    notes = [seeds_note(group), "peak train MB: max over rounds of mem/peak_train_bytes, the peak memory of one "
             "client's local update (per method: never another method's)",
             "wall s: the sum of the run's time/round_s (training and evaluation rounds; data loading and "
             "setup not counted), the same figure as bench.run's table and summary.json"]
    notes.append("GFLOP/update: the mean over rounds of compute/flops_update, one local update's FLOPs "
                 "(PyTorch's formulas: 2 per multiply-add of matrix products, convolutions, attention; a DEQ's "
                 "solver steps and adjoint included; each client's first update counted)")
    ratio = ratio_cells(group, lambda r: peak(r, "mem/peak_train_bytes"), "{method} needs {ratio} the peak "
                        "training memory of {ref} (peak train MB, mean over seeds)", notes)
    flops = ratio_cells(group, lambda r: per_round(r, "compute/flops_update"), "{method} computes {ratio} the "
                        "FLOPs per local update of {ref} (GFLOP/update, mean over seeds)", notes)
    extra = {**({MEMORY_RATIO_COLUMN: ratio} if ratio else {}), **({FLOPS_RATIO_COLUMN: flops} if flops else {})}
    # each ratio right after the column it divides
    return stat_table(group, "cost", COST, ["method"], notes, extra,
                      after={MEMORY_RATIO_COLUMN: "peak train MB", FLOPS_RATIO_COLUMN: "GFLOP/update"})


def group_tables(group: Group, parents: Sequence[Provenance] = (), target: float = 0.95,
                 k: int | None = None) -> list[Table]:
    """The accuracy, communication and cost tables (and the devices table, where runs simulated edge
    devices) and the runs table of one comparable group. `k`: the last-k window (default a tenth of the
    evaluated rounds, at least 1); `target`: the fraction of the best mean last-k accuracy that MB to
    target (and sim s to target) measures up to."""
    k, n = last_k(group, k)
    by_id = {p.run_id: p for p in parents}
    runs = runs_table(group, f"{group.title}: every run", lambda r: rerun_command(by_id, r),
                      "command: the comparison's recorded command plus --methods and --seeds, rerunning that run")
    from bench.report.devices import devices_table  # (it builds on this module's cells and notes)

    devices = devices_table(group, target, k)
    return [accuracy_table(group, k, n), communication_table(group, target, k), cost_table(group),
            *([devices] if devices else []), runs]


def rerun_command(parents: dict[str, Provenance], r: RunRecord) -> str:
    """The parent's recorded command less its methods and seeds, with `--methods M --seeds S` appended
    (so each flag appears once and this reruns exactly the one method x seed), as it runs here
    (bench/cli.py: `python` is this interpreter's path)."""
    p = parents.get(r.parent_id)
    if p is None or not p.command:
        return DASH
    return commands.runnable(f"{commands.without_keys(p.command, ('methods', 'seeds'))} --methods {shlex.quote(r.registered)} "
                        f"--seeds {r.seed}")


def runs_table(group: Group, title: str, command: Callable[[RunRecord], str], note: str,
               metric: str = "acc/weighted") -> Table:
    """Every run of the group, whatever its status, in method then seed order, with its final `metric`."""
    order = {m: i for i, m in enumerate(group.methods)}
    rows = []
    for r in sorted(group.runs, key=lambda r: (order[r.method], r.seed, r.start_ms or 0)):
        acc = r.final(metric)
        shown = r.status == "FINISHED" and not math.isnan(acc)
        rows.append([Cell(r.method), Cell(str(r.seed), float(r.seed)), Cell(r.status), Cell(r.run_id),
                     Cell(fmt(acc, "acc"), acc) if shown else Cell(DASH), Cell(command(r))])
    bad = [r for r in group.runs if r.status != "FINISHED"]
    notes = [note] + ([f"{len(bad)} run(s) not FINISHED ({', '.join(sorted({r.status for r in bad}))}): shown "
                       f"here, left out of the numbers"] if bad else [])
    return Table(title, ["method", "seed", "status", "run id", metric, "command"], rows, notes)


# -- provenance -----------------------------------------------------------------------------------
