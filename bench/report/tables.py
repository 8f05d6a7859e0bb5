"""The report's tables, built from `ReportData` (bench/report/model.py); no MLflow, no torch.

    group_tables(group, parents, target=0.95)  # per dataset x partition: methods, then every run
    provenance_tables(data)                    # per parent run: command, commit, versions, config
    sweep_tables(group, parents)               # a study: trials, best values, every run

Only FINISHED runs enter the numbers; every run, whatever its status, is a row of the runs table.
A cell over seeds is `mean ± std` with the SAMPLE std (ddof=1, bench/experiment/ `seed_stat`), as
`bench.run`'s terminal table; one seed: the mean alone. Accuracy has 4 decimals and MB at least 3
decimals and 4 significant digits, so every number can be checked against MLflow (the tests do).
"""
from __future__ import annotations

import math
import shlex
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from bench import cli
from bench.report.model import Cell, Group, Provenance, ReportData, RunRecord, Table
from bench.report.stats import Stat, seed_stat

REFERENCE = "fedeq"
"""The method the ratio column compares with (the method this benchmark is about)."""
DASH = "—"
ACCURACY = ("acc/weighted", "acc/mean", "acc/bottom10", "acc/unseen")
"""acc/weighted first: the paper-comparable figure (accuracy over all test samples of all clients)."""

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


def mb_to_target(r: RunRecord, target: float) -> float | None:
    """MB sent (bytes/cumulative, up + down) up to and including the first evaluated round whose
    acc/weighted reaches `target`; None when no round does."""
    sent = dict(r.history.get("bytes/cumulative", []))
    for rnd, acc in r.history.get("acc/weighted", []):
        if acc >= target and rnd in sent:
            return sent[rnd] / 1e6
    return None


def wall_s(r: RunRecord) -> float:
    """Sum of time/round_s (training and evaluation rounds; data loading and setup not counted), or
    the run's end - start when it logged no round times."""
    s = total(r, "time/round_s")
    if math.isnan(s) and r.start_ms is not None and r.end_ms is not None:
        return (r.end_ms - r.start_ms) / 1e3
    return s


# (column, per-run value, format, best: max or min or None). MB columns are per client message bytes
# / 1e6, as bench/experiment/'s SUMMARY.
COLUMNS: list[tuple[str, Callable[[RunRecord], float], str, Callable | None]] = [
    *((name, (lambda n: lambda r: r.final(n))(name), "acc", max) for name in ACCURACY),
    ("MB up/round", lambda r: per_round(r, "bytes/up") / 1e6, "mb", min),
    ("MB down/round", lambda r: per_round(r, "bytes/down") / 1e6, "mb", min),
    ("MB up", lambda r: total(r, "bytes/up") / 1e6, "mb", min),
    ("MB down", lambda r: total(r, "bytes/down") / 1e6, "mb", min),
    ("MB total", lambda r: r.final("bytes/cumulative") / 1e6, "mb", min),
    ("peak train MB", lambda r: peak(r, "mem/peak_train_bytes") / 1e6, "mb", min),
    # Parameter counts are a property of the method, not a score: no best is marked.
    ("params shared", lambda r: float(r.params.get("params/shared", "nan")), "int", None),
    ("params personal", lambda r: float(r.params.get("params/personal", "nan")), "int", None),
    ("wall s", wall_s, "s", min),
]
TARGET_COLUMN, RATIO_COLUMN = "MB to target", "bytes vs FeDEQ"


# -- formatting -----------------------------------------------------------------------------------


def decimals(kind: str, x: float) -> int:
    """acc: 4; MB: at least 3 and at least 4 significant digits (0.06120, 12.300); s: 2; int: 0."""
    if kind == "mb":
        return max(3, 3 - math.floor(math.log10(abs(x)))) if x and math.isfinite(x) else 3
    return {"acc": 4, "s": 2, "int": 0}[kind]


def fmt(x: float, kind: str) -> str:
    return f"{x:.{decimals(kind, x)}f}"


def stat_cell(values: list[float], kind: str) -> Cell:
    """`mean ± std` over seeds (sample std), the mean alone for one seed, a dash when a value is missing."""
    if not values or any(math.isnan(v) for v in values):
        return Cell(DASH)
    s: Stat = seed_stat(values)
    d = decimals(kind, s.mean)
    if kind == "int" and s.std == 0:
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


def when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1e3, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ms else DASH


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
    """`fedrep: no FINISHED run for seed 1 (FAILED)` for every method x seed of the group without one."""
    notes = []
    for m in group.methods:
        for s in group.seeds:
            rs = [r for r in group.runs if r.method == m and r.seed == s]
            if not any(r.status == "FINISHED" for r in rs):
                why = ", ".join(r.status for r in rs) or "no run"
                notes.append(f"{m}: no FINISHED run for seed {s} ({why})")
    return notes


def target_of(group: Group, fraction: float) -> tuple[float, str, float] | None:
    """(target accuracy, best method, its final mean acc/weighted): `fraction` of the best method's."""
    means = {}
    for m in group.methods:
        vals = [r.final("acc/weighted") for r in finished(group, m)]
        if vals and not any(math.isnan(v) for v in vals):
            means[m] = seed_stat(vals).mean
    if not means:
        return None
    best = max(means, key=means.__getitem__)
    return fraction * means[best], best, means[best]


def target_cell(runs: list[RunRecord], target: float | None) -> Cell:
    if target is None or not runs:
        return Cell(DASH)
    mbs = [mb_to_target(r, target) for r in runs]
    reached = [x for x in mbs if x is not None]
    if not reached:
        return Cell("never")
    if len(reached) < len(mbs):
        return Cell(f"never in {len(mbs) - len(reached)} of {len(mbs)} seeds")
    return stat_cell(reached, "mb")


def method_table(group: Group, target_fraction: float = 0.95) -> Table:
    """One row per method: final accuracies, bytes, memory, parameters, time, over FINISHED seeds."""
    tgt = target_of(group, target_fraction)
    target = tgt[0] if tgt else None
    totals = {m: seed_stat([r.final("bytes/cumulative") for r in finished(group, m)]).mean
              for m in group.methods if finished(group, m)}
    ref = totals.get(REFERENCE)
    with_ratio = ref is not None and ref > 0
    names = [c[0] for c in COLUMNS]
    at = names.index("MB total") + 1
    columns = ["method", "model", "seeds", *names[:at], TARGET_COLUMN, *names[at:]]
    columns += [RATIO_COLUMN] if with_ratio else []
    rows, notes = [], []
    for m in group.methods:
        runs = finished(group, m)
        model = next((r.model for r in runs), next(r.model for r in group.runs if r.method == m))
        cells = {name: stat_cell([get(r) for r in runs], kind) for name, get, kind, _ in COLUMNS}
        cells[TARGET_COLUMN] = target_cell(runs, target)
        if with_ratio:
            assert ref is not None  # with_ratio says so
            if m in totals:
                ratio = totals[m] / ref
                cells[RATIO_COLUMN] = Cell(f"{ratio:.2f}x", ratio)
                if m != REFERENCE:
                    notes.append(f"{m} sends {ratio:.2f}x the bytes of {REFERENCE} (MB total, mean over seeds)")
            else:
                cells[RATIO_COLUMN] = Cell(DASH)
        rows.append([Cell(m), Cell(model), Cell(str(len(runs)), float(len(runs))), *(cells[c] for c in columns[3:])])
        if not runs:
            statuses = ", ".join(sorted({r.status for r in group.runs if r.method == m}))
            notes.append(f"{m}: no FINISHED run ({statuses}); its row is empty")
    for name, _, _, better in COLUMNS:
        if better is not None:
            mark_best(rows, columns.index(name), better)
    mark_best(rows, columns.index(TARGET_COLUMN), min)
    n = sorted({len(finished(group, m)) for m in group.methods} - {0, 1})
    head = [f"final round; mean ± sample std (ddof=1) over {' or '.join(map(str, n))} seeds"
            if n else "final round; one seed per method (no std)",
            "best value of each column in bold (highest accuracy; fewest MB, least memory, least time); "
            "only FINISHED runs count"]
    if target is None:
        head.append(f"{TARGET_COLUMN}: no FINISHED run logged acc/weighted, so there is no target")
    else:
        assert tgt is not None  # target is tgt[0]
        head.append(f"{TARGET_COLUMN}: MB sent (up + down, bytes/cumulative) until acc/weighted first reaches "
                    f"{target:.4f} = {target_fraction:.0%} of the best final mean acc/weighted ({tgt[1]}, "
                    f"{tgt[2]:.4f}); mean over seeds; never: no evaluated round reaches it")
    head.append("MB up/round, MB down/round: mean over rounds; MB up, MB down, MB total: over the run; "
                "peak train MB: max over rounds of mem/peak_train_bytes; wall s: sum of time/round_s")
    return Table(f"{group.dataset} / {group.partition}: methods", columns, rows,
                 head + notes + seed_notes(group) + repeat_notes(group))


def rerun_command(parents: dict[str, Provenance], r: RunRecord) -> str:
    """The parent's recorded command less its methods and seeds, with `--methods M --seeds S` appended
    (so each flag appears once and this reruns exactly the one method x seed), as it runs here
    (bench/cli.py: `python` is this interpreter's path)."""
    p = parents.get(r.parent_id)
    if p is None or not p.command:
        return DASH
    return cli.runnable(f"{cli.without_keys(p.command, ('methods', 'seeds'))} --methods {shlex.quote(r.method)} "
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


def group_tables(group: Group, parents: Sequence[Provenance] = (), target: float = 0.95) -> list[Table]:
    """The methods table and the runs table of one dataset x partition."""
    by_id = {p.run_id: p for p in parents}
    runs = runs_table(group, f"{group.dataset} / {group.partition}: every run",
                      lambda r: rerun_command(by_id, r),
                      "command: the comparison's recorded command plus --methods and --seeds, rerunning that run")
    return [method_table(group, target), runs]


# -- provenance -----------------------------------------------------------------------------------


def fingerprints(data: ReportData, parent_id: str) -> list[tuple[str, str]]:
    """(dataset / partition, `seed S: fingerprint; ...`) for each group with runs under this parent."""
    out = []
    for g in data.groups:
        fp = {r.seed: r.fingerprint for r in sorted(g.runs, key=lambda r: r.seed) if r.parent_id == parent_id}
        if fp:
            out.append((f"{g.dataset} / {g.partition}", "; ".join(f"seed {s}: {f}" for s, f in fp.items())))
    return out


SHOWN = ("command", "git_commit")


def provenance_tables(data: ReportData, config: bool = True) -> list[Table]:
    """Per parent run: what produced its numbers (command, commit, versions, data), then (`config`) its
    resolved config: every param of the parent run."""
    tables = []
    for p in data.parents:
        rows = [("run id", p.run_id), ("run name", p.name), ("status", p.status), ("started", when(p.start_ms)),
                ("command", p.command or f"{DASH} (not recorded: a library call)"), ("git commit", p.git_commit),
                *((f"version: {k}", v) for k, v in p.versions.items()),
                *((f"dataset fingerprint: {g}", f) for g, f in fingerprints(data, p.run_id)),
                *((f"metric: {k}", f"{v:.6g}") for k, v in sorted(p.metrics.items()))]
        tables.append(Table(f"provenance: {p.name} ({p.run_id})", ["what", "value"],
                            [[Cell(k), Cell(v)] for k, v in rows],
                            ["equal dataset fingerprints: identical client data"]))
        if not config:
            continue
        params = [(k, v) for k, v in sorted(p.config.items()) if k not in SHOWN and not k.startswith("version.")]
        tables.append(Table(f"resolved config: {p.name} ({p.run_id})", ["key", "value"],
                            [[Cell(k), Cell(v)] for k, v in params],
                            ["every param of the parent run (a child run adds its method's resolved fields)"]))
    return tables


# -- a sweep --------------------------------------------------------------------------------------

STATE_ORDER = ("RUNNING", "FAILED", "KILLED", "PRUNED")
"""A trial with several seed runs shows the first of these any of its runs has (else FINISHED)."""


def trial_state(runs: list[RunRecord]) -> str:
    statuses = {r.status for r in runs}
    return next((s for s in STATE_ORDER if s in statuses), "FINISHED")


def sweep_tables(group: Group, parents: Sequence[Provenance] = ()) -> list[Table]:
    """A study: one row per trial (state, swept values, final acc/val over seeds, MB, memory, time),
    the best values per study invocation, and every run."""
    trials = [m for m in group.methods if any(r.params.get("trial_number") for r in group.runs if r.method == m)
              and not m.startswith("best")]
    keys = sorted({k for r in group.runs for k in r.params if k.startswith("trial.")})
    columns = ["trial", "state", "seeds", *(k[len("trial."):] for k in keys), "acc/val", "MB total",
               "peak train MB", "wall s"]
    rows = []
    for m in trials:
        runs = [r for r in group.runs if r.method == m]
        state = trial_state(runs)
        done = [r for r in runs if r.status == "FINISHED"]
        if state == "FINISHED":
            acc = stat_cell([r.final("acc/val") for r in done], "acc")
        else:  # where a pruned or failed trial stopped, not a final value
            rounds, vals = runs[0].series("acc/val")
            acc = Cell(f"{fmt(vals[-1], 'acc')} (round {rounds[-1]}, {runs[0].status})" if vals else DASH)
        number = runs[0].params.get("trial_number", DASH)
        rows.append([Cell(number), Cell(state),
                     Cell(str(len(runs))), *(Cell(runs[0].params.get(k, DASH)) for k in keys), acc,
                     stat_cell([r.final("bytes/cumulative") / 1e6 for r in done], "mb"),
                     stat_cell([peak(r, "mem/peak_train_bytes") / 1e6 for r in done], "mb"),
                     stat_cell([wall_s(r) for r in done], "s")])
    mark_best(rows, columns.index("acc/val"), max)
    for col in ("MB total", "peak train MB", "wall s"):
        mark_best(rows, columns.index(col), min)
    out = [Table(f"{group.dataset} / {group.partition}: trials", columns, rows,
                 ["acc/val: final validation accuracy (the objective), mean ± sample std over seeds; "
                  "a trial not FINISHED shows where it stopped", "swept values: the trial's `trial.*` params"])]
    best_rows = []
    for p in parents:
        best = {k[len("best."):]: v for k, v in sorted(p.config.items()) if k.startswith("best.")}
        number = best.pop("trial_number", DASH)
        values = "; ".join(f"{k}={v}" for k, v in best.items()) or DASH
        score = p.metrics.get("best/value")
        test = p.metrics.get("best/test_acc")
        best_rows.append([Cell(p.config.get("study", DASH)), Cell(p.run_id), Cell(number), Cell(values),
                          Cell(fmt(score, "acc"), score) if score is not None else Cell(DASH),
                          Cell(fmt(test, "acc"), test) if test is not None else Cell(DASH)])
    out.append(Table(f"{group.dataset} / {group.partition}: best values", ["study", "parent run", "best trial",
                     "values", "acc/val", "test acc/mean"], best_rows,
                     ["one row per sweep invocation (a resume adds one); test acc/mean: the best values rerun "
                      "once on the test split (best/test_acc), never used to choose"]))
    by_id = {p.run_id: p for p in parents}
    out.append(runs_table(group, f"{group.dataset} / {group.partition}: every run",
                          lambda r: cli.runnable(by_id[r.parent_id].command) or DASH if r.parent_id in by_id else DASH,
                          "command: the study's recorded command (rerunning it resumes the study)", "acc/val"))
    return out
