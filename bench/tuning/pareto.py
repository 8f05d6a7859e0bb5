"""A multi-objective study's Pareto front (rows, table, artifacts) and Optuna's figures of a study."""
from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

from bench.report import text
from bench.report.sweep import MIN_IMPORTANCE_TRIALS
from bench.tuning.objectives import COLUMN, OBJECTIVE, shown
from bench.tuning.storage import best_values


def pareto_rows(study, objectives, space) -> list[dict[str, Any]]:
    """The Pareto front as rows: trial number, each objective's value (bytes and memory in MB), the
    trial's values of the space; most accurate first."""
    rows = []
    for t in study.best_trials:
        row: dict[str, Any] = {"trial": t.number}
        for o, v in zip(objectives, t.values, strict=True):
            row[COLUMN[o]] = shown(o, v)
        row.update(best_values(t, space))
        rows.append(row)
    rows.sort(key=lambda r: (-r[COLUMN["acc"]], r["trial"]))
    return rows


def pareto_table(rows) -> str:
    """The Pareto rows as a Markdown table."""
    if not rows:
        return "(empty Pareto front: no trial completed)"
    head = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return text.table(head, [[fmt(r.get(h, "")) for h in head] for r in rows])


def log_pareto(tracker, run_id: str, rows, objectives) -> None:
    """The front as pareto.md, pareto.csv and pareto.json artifacts, and its size as a metric."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    tracker.log_text(run_id, buf.getvalue(), "pareto.csv")
    tracker.log_text(run_id, pareto_table(rows) + "\n", "pareto.md")
    tracker.log_json(run_id, rows, "pareto.json")
    tracker.log_metrics(run_id, 0, {"pareto/size": float(len(rows))})


def log_figures(tracker, run_id: str, study, objectives=("acc",),
                min_importance_trials: int = MIN_IMPORTANCE_TRIALS) -> None:
    """Optuna's matplotlib figures as artifacts: optimization history, parameter importances and slice
    plots (of accuracy), and with several objectives the Pareto front. Skipped without matplotlib;
    a figure that cannot be drawn is left out. Parameter importances are drawn only from
    `min_importance_trials` COMPLETE trials on (bench/report/sweep.py `MIN_IMPORTANCE_TRIALS`, where the
    report says why they are absent): Optuna draws them from two, but a ranking fitted to a handful of
    points says little."""
    from optuna.trial import TrialState

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as vis
    except Exception:
        return
    multi = len(objectives) > 1
    # Several objectives: history, importances and slices need one target; accuracy is the first.
    target = {"target": lambda t: t.values[0], "target_name": OBJECTIVE} if multi else {}
    plots: list[tuple[str, Callable[..., Any], dict[str, Any]]]
    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    plots = [("optimization_history", vis.plot_optimization_history, target),
             *([("param_importances", vis.plot_param_importances, target)]
               if completed >= min_importance_trials else []),
             ("slice", vis.plot_slice, target)]
    if multi:
        plots.append(("pareto_front", vis.plot_pareto_front,
                      {"target_names": [COLUMN[o] for o in objectives],
                       "targets": lambda t: tuple(shown(o, v) for o, v in zip(objectives, t.values, strict=True))}))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fname, plot, kwargs in plots:
            try:
                ax = plot(study, **kwargs)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                path = os.path.join(tmp, f"{fname}.png")
                fig.savefig(path, dpi=80, bbox_inches="tight")
                plt.close(fig)
                tracker.client.log_artifact(run_id, path, "figures")
            except Exception:  # too few trials for a figure, no params: nothing to draw
                plt.close("all")
