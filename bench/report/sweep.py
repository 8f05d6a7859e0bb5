"""A study's report page (`python -m bench.report --sweep STUDY`): its tables, its figures and Optuna's.

    sections(data)   # [(group, tables, figures)] for bench/report/__init__.py `build`

A sweep (bench/tuning/study.py) leaves two kinds of child run, and the page never shows one under the
other's name:

- **trials** (`trial N`, one run per seed) train and score on the validation view, so they log
  validation accuracy, `acc/val` (the objective), and no test metric. They are shown by `acc/val`.
- **the best trial's rerun** (`best (trial N) on test`, one run per seed) runs the best values once on
  the real data. It is shown by test accuracy: `acc/weighted` first, the headline of every report,
  then `acc/mean`.

Every trial's curve is drawn, a trial that did not finish (pruned, failed, killed) dashed and labelled
with its state; swept values have 4 significant digits (the exact ones are the runs' `trial.*` and the
parent's `best.*` params, in the provenance); Optuna's figures are shown as the sweep logged them
(history, parameter importances, slices; the Pareto front with several objectives), importances only
for a study with at least MIN_IMPORTANCE_TRIALS completed trials, else a sentence says why not.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from bench import commands
from bench.report import figures as F
from bench.report.model import Cell, Group, Image, Provenance, ReportData, RunRecord, Table
from bench.report.tables import DASH, fmt, mark_best, peak, stat_cell, wall_s

MIN_IMPORTANCE_TRIALS = 5
"""Completed trials a study needs before its parameter importances are drawn (bench/tuning/pareto.py
`log_figures`) and shown: Optuna's fANOVA fits a random forest to the completed trials' values, and on
a handful of points its ranking says little."""
VAL = "acc/val"
"""What a trial is shown by: validation accuracy, the objective."""
TEST = ("acc/weighted", "acc/mean")
"""What the best trial's rerun is shown by: test accuracy, the headline first."""
RERUN_COLOR = "#000000"
"""The best trial's rerun is black in every figure, apart from the trials' palette."""
OPTUNA_FIGURES = (
    ("optimization_history", "Optuna: acc/val (validation) of each completed trial and the best so far"),
    ("param_importances", "Optuna: parameter importances (fANOVA on acc/val)"),
    ("slice", "Optuna: acc/val against each swept value, one point per completed trial"),
    ("pareto_front", "Optuna: the Pareto front of the objectives (validation)"),
)
"""Optuna's figures a sweep logs (figures/<name>.png on its parent run), in page order."""
STATE_ORDER = ("RUNNING", "FAILED", "KILLED", "PRUNED")
"""A trial with several seed runs shows the first of these any of its runs has (else FINISHED)."""


def is_rerun(method: str) -> bool:
    """The best trial's rerun on test (collect.py `best_label`), not a trial."""
    return method.startswith("best ")


def trial_state(runs: list[RunRecord]) -> str:
    statuses = {r.status for r in runs}
    return next((s for s in STATE_ORDER if s in statuses), "FINISHED")


def swept(text: str) -> Cell:
    """A swept value as a cell: a real number with 4 significant digits (`0.0646642271741456` ->
    `0.06466`; trailing zeros kept: `0.04430`), an integer as it is, anything else (a categorical
    choice) as text. The value behind the cell stays exact (the HTML table sorts by it)."""
    try:
        x = float(text)
    except ValueError:
        return Cell(text)
    return Cell(text.strip() if text.strip().lstrip("+-").isdigit() else f"{x:#.4g}", x)


# -- tables -----------------------------------------------------------------------------------------


def sweep_tables(group: Group, parents: Sequence[Provenance] = ()) -> list[Table]:
    """The best values per invocation (the headline: the rerun's test accuracy), the trials, every run."""
    return [best_table(group, parents), trials_table(group), runs_table(group, parents)]


def best_table(group: Group, parents: Sequence[Provenance]) -> Table:
    """One row per sweep invocation: the best trial, its values, its acc/val (the objective) and its
    rerun's test acc/weighted and acc/mean (mean ± sample std over the rerun's FINISHED seeds)."""
    rows = []
    for p in parents:
        best = {k[len("best."):]: v for k, v in sorted(p.config.items()) if k.startswith("best.")}
        number = best.pop("trial_number", DASH)
        values = "; ".join(f"{k}={swept(v).text}" for k, v in best.items()) or DASH
        score = p.metrics.get("best/value")
        reruns = [r for r in group.runs if r.parent_id == p.run_id and is_rerun(r.method) and r.status == "FINISHED"]
        rows.append([Cell(p.config.get("study", DASH)), Cell(p.run_id), Cell(number), Cell(values),
                     Cell(fmt(score, "acc"), score) if score is not None else Cell(DASH),
                     *(stat_cell([r.final(m) for r in reruns], "acc") for m in TEST)])
    return Table(f"{group.dataset} / {group.partition}: best values", ["study", "parent run", "best trial",
                 "values", "acc/val", *(f"test {m}" for m in TEST)], rows,
                 ["one row per sweep invocation (a resume adds one); values: 4 significant digits (exact in the "
                  "provenance's best.* params)",
                  "acc/val: the best trial's validation accuracy, the objective, mean over seeds",
                  "test acc/weighted (the headline, as in every report), test acc/mean: the best values rerun "
                  "once on the test split, final round, mean ± sample std over seeds; never used to choose"])


def trials_table(group: Group) -> Table:
    """One row per trial: state, swept values, final acc/val over seeds (where an unfinished trial
    stopped), MB, memory, time."""
    trials = [m for m in group.methods if not is_rerun(m)
              and any(r.params.get("trial_number") for r in group.runs if r.method == m)]
    keys = sorted({k for r in group.runs for k in r.params if k.startswith("trial.")})
    columns = ["trial", "state", "seeds", *(k[len("trial."):] for k in keys), VAL, "MB total",
               "peak train MB", "wall s"]
    rows = []
    for m in trials:
        runs = [r for r in group.runs if r.method == m]
        state = trial_state(runs)
        done = [r for r in runs if r.status == "FINISHED"]
        if state == "FINISHED":
            acc = stat_cell([r.final(VAL) for r in done], "acc")
        else:  # where a pruned or failed trial stopped, not a final value
            rounds, vals = runs[0].series(VAL)
            acc = Cell(f"{fmt(vals[-1], 'acc')} (round {rounds[-1]}, {runs[0].status})" if vals else DASH)
        number = runs[0].params.get("trial_number", DASH)
        rows.append([Cell(number), Cell(state), Cell(str(len(runs))),
                     *(swept(runs[0].params[k]) if k in runs[0].params else Cell(DASH) for k in keys), acc,
                     stat_cell([r.final("bytes/cumulative") / 1e6 for r in done], "mb"),
                     stat_cell([peak(r, "mem/peak_train_bytes") / 1e6 for r in done], "mb"),
                     stat_cell([wall_s(r) for r in done], "s")])
    mark_best(rows, columns.index(VAL), max)
    for col in ("MB total", "peak train MB", "wall s"):
        mark_best(rows, columns.index(col), min)
    return Table(f"{group.dataset} / {group.partition}: trials", columns, rows,
                 ["acc/val: final validation accuracy (the objective), mean ± sample std over seeds; a trial not "
                  "FINISHED shows where it stopped",
                  "swept values: the trial's `trial.*` params, 4 significant digits (exact in MLflow)"])


def runs_table(group: Group, parents: Sequence[Provenance]) -> Table:
    """Every run, whatever its status: a trial's final acc/val, the rerun's final test acc/weighted,
    each only in its own column; the commands once per invocation, in the notes."""
    columns = ["run", "seed", "status", "run id", VAL, f"test {TEST[0]}"]
    order = {m: i for i, m in enumerate(group.methods)}
    rows = []
    for r in sorted(group.runs, key=lambda r: (order[r.method], r.seed, r.start_ms or 0)):
        metric = TEST[0] if is_rerun(r.method) else VAL
        acc = r.final(metric)
        cell = Cell(fmt(acc, "acc"), acc) if r.status == "FINISHED" and not math.isnan(acc) else Cell(DASH)
        rows.append([Cell(r.method), Cell(str(r.seed), float(r.seed)), Cell(r.status), Cell(r.run_id),
                     *((cell, Cell(DASH)) if metric == VAL else (Cell(DASH), cell))])
    bad = [r for r in group.runs if r.status != "FINISHED"]
    notes = ["acc/val: a trial's final validation accuracy; test acc/weighted: the best trial's rerun on "
             "the test split"]
    notes += [f"command of invocation {p.run_id} (running it again resumes the study): {commands.runnable(p.command) if p.command else DASH}"
              for p in parents]
    if bad:
        notes.append(f"{len(bad)} run(s) not FINISHED ({', '.join(sorted({r.status for r in bad}))}): shown here, "
                     f"left out of the numbers")
    return Table(f"{group.dataset} / {group.partition}: every run", columns, rows, notes)


# -- figures ----------------------------------------------------------------------------------------


def sweep_figures(group: Group) -> list[F.Figure]:
    """Accuracy against round and against MB (trials by acc/val, every trial, the unfinished dashed;
    the rerun by test acc/weighted, and by test acc/mean dashed: acc/val is, like acc/mean, an
    unweighted mean over clients, so acc/mean is the curve to set beside the trials'), accuracy per client (trials: validation; the rerun: test), then
    the comparison report's memory and DEQ figures of the FINISHED runs, coloured alike."""
    trials = [m for m in group.methods if not is_rerun(m)]
    color = {m: F.PALETTE[i % len(F.PALETTE)] for i, m in enumerate(trials)}
    color |= {m: RERUN_COLOR for m in group.methods if is_rerun(m)}
    prefix = f"{group.dataset}: "
    ylabel = "accuracy: acc/val (trials), test accuracy (best rerun)"
    shown = "trials: validation acc/val; best trial's rerun: test acc/weighted, acc/mean dashed"

    def curves(**x) -> list[F.Series | None]:
        out = []
        for m in group.methods:
            runs = [r for r in group.runs if r.method == m]
            if is_rerun(m):  # acc/weighted, the headline; acc/mean, defined as acc/val is, to compare with the trials
                done = [r for r in runs if r.status == "FINISHED"]
                out += [F._curve(f"{m}: {t}", done, t, color[m], "" if t == TEST[0] else t, **x) for t in TEST]
            else:
                state = trial_state(runs)
                variant = "" if state == "FINISHED" else state.lower()
                out.append(F._curve(f"{m} ({variant})" if variant else m, runs, VAL, color[m], variant, **x))
        return out

    figs = [F._line("acc_vs_round", f"{prefix}accuracy vs round ({shown}; {F.BAND})", "round", ylabel, curves()),
            F._line("acc_vs_mb", f"{prefix}accuracy vs MB sent ({shown}; {F.BAND})", "cumulative MB sent (up + down)",
                    ylabel, curves(x_metric="bytes/cumulative", x_scale=1e-6)),
            client_acc(prefix, group, color)]
    for fig in F.group_figures(group, accuracy=VAL):  # FINISHED runs: peak memory, DEQ solver statistics
        if fig.name in ("peak_memory", "deq_steps", "deq_residual"):
            for s in fig.series:
                s.color = next(c for m, c in color.items() if s.label == m or s.label.startswith(m + " "))
            figs.append(fig)
    return [f for f in figs if f is not None]


def client_acc(prefix: str, group: Group, color: dict[str, str]) -> F.Figure | None:
    """Every client's final accuracy (clients.csv of the FINISHED runs, seeds pooled): a trial's
    `val_acc` (validation), the rerun's `test_acc` (test); one box per run and client group."""
    series = []
    for m in group.methods:
        column, what = ("test_acc", "test") if is_rerun(m) else ("val_acc", "validation")
        runs = [r for r in group.runs if r.method == m and r.status == "FINISHED"]
        for part in ("train", "never_trained", "unseen"):
            pts = [(r.seed, c) for r in runs for c in (r.clients or [])
                   if c["group"] == part and math.isfinite(float(c[column]))]
            if not pts:
                continue
            variant = "" if part == "train" else part.replace("_", " ")
            label = f"{m} ({variant})" if variant else m
            series.append(F.Series(
                label, [m] * len(pts), [float(c[column]) for _, c in pts],
                hover=[f"{label}<br>client {c['cid']}, seed {s}<br>{what} acc {float(c[column]):.4g}" for s, c in pts],
                color=color[m], variant=variant))
    if not series:
        return None
    return F.Figure("client_acc", f"{prefix}final accuracy per client (trials: validation; best trial's rerun: "
                    "test; all seeds; open markers: clients not trained on)", "run",
                    "client accuracy (trials: validation; best rerun: test)", "box", series)


def optuna_images(group: Group, images: dict[str, bytes]) -> list[Image]:
    """Optuna's figures as the sweep logged them; parameter importances only with at least
    MIN_IMPORTANCE_TRIALS completed (FINISHED) trials; a sentence in place of each one absent."""
    trials = [m for m in group.methods if not is_rerun(m)]
    completed = sum(1 for m in trials if trial_state([r for r in group.runs if r.method == m]) == "FINISHED")
    if not images:
        return [Image("optuna", "Optuna's figures", note="none logged on the study's parent run(s): the sweep ran "
                      "with figures off (SweepOptions.figures) or without matplotlib")]
    out = []
    for name, title in OPTUNA_FIGURES:
        if name == "param_importances" and completed < MIN_IMPORTANCE_TRIALS:
            out.append(Image(name, title, note=f"left out: the study has {completed} completed trial(s), and "
                             f"importances need at least {MIN_IMPORTANCE_TRIALS} (Optuna's fANOVA fits a random "
                             "forest to the completed trials; on fewer its ranking says little)"))
        elif name in images:
            out.append(Image(name, title, images[name]))
        elif name != "pareto_front":  # a single-objective study has none
            out.append(Image(name, title, note="not logged on the study's parent run (Optuna could not draw it "
                             "from the trials there were)"))
    return out


def sections(data: ReportData) -> list[tuple[Group, list[Table], list]]:
    """Per dataset and partition (a study has one): its tables, its figures, then Optuna's figures."""
    return [(g, sweep_tables(g, data.parents),
             [*sweep_figures(g), *(optuna_images(g, data.images) if i == 0 else [])])
            for i, g in enumerate(data.groups)]

