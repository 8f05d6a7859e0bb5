"""Summaries over seeds: the rows and the terminal table `python -m bench.run` prints and stores as
summary.md / summary.json, and the per-client CSV of a child run."""
from __future__ import annotations

import math

from bench.report import text
from bench.report.stats import Stat, seed_stat


def wall_s(r) -> float:
    """The sum of the run's time/round_s (training and evaluation rounds; data loading and setup not
    counted): the one "wall s" of the terminal table, summary.md/json and the reports (bench/report/
    tables.py `wall_s` sums the same values from MLflow). The whole method's time when no round logged one."""
    times = [h["time/round_s"] for h in r.history if "time/round_s" in h]
    return math.fsum(times) if times else r.wall_s


SUMMARY = {
    "acc/mean": lambda r: r.final["acc/mean"],
    "acc/weighted": lambda r: r.final["acc/weighted"],
    "acc/bottom10": lambda r: r.final["acc/bottom10"],
    "mb_up": lambda r: r.ledger.total("up") / 1e6,
    "mb_down": lambda r: r.ledger.total("down") / 1e6,
    "peak_train_mb": lambda r: r.peak("mem/peak_train_bytes") / 1e6,
    "wall_s": wall_s,
    "sim_s": lambda r: r.final.get("sim/time_cumulative_s", float("nan")),
}
"""`sim_s`: the simulated seconds of the whole run on its devices (bench/loop/devices.py)."""


def summarize(results) -> list[dict]:
    """One row per method (in first-seen order): its model, its number of seeds, and a `Stat`
    (mean, sample std with ddof=1) over seeds of each `SUMMARY` column."""
    rows = []
    for method in dict.fromkeys(r.method for r in results):
        rs = [r for r in results if r.method == method]
        row = {"method": method, "model": rs[0].model, "seeds": len(rs)}
        row.update({name: seed_stat(get(r) for r in rs) for name, get in SUMMARY.items()})
        rows.append(row)
    return rows


# (header, summary column, format) of the terminal table, in order.
TABLE = [("acc/mean", "acc/mean", ".4f"), ("acc/weighted", "acc/weighted", ".4f"),
         ("acc/bottom10", "acc/bottom10", ".4f"), ("MB up", "mb_up", ".2f"), ("MB down", "mb_down", ".2f"),
         ("peak train MB", "peak_train_mb", ".3f"), ("sim s", "sim_s", ".1f"),
         ("wall s", "wall_s", ".1f")]


def format_table(rows, diverged: dict[str, str] | None = None) -> str:
    """The Markdown table the CLI prints and stores as summary.md.

    A cell is the mean; with several seeds it is `mean ± std` (even `± 0.00`: equal bytes across
    seeds is a finding too), and a footnote says the std is the sample std over how many seeds.
    `diverged` (`fedeq seed 0` -> why, runs `keep_going` went past) is listed under the table: those
    runs are in no mean, and a method whose every seed diverged has no row.
    """
    def cell(stat, fmt, seeds):
        return f"{stat.mean:{fmt}}" + (f" ± {stat.std:{fmt}}" if seeds > 1 else "")

    head = ["method", "model", *(h for h, _, _ in TABLE)]
    body = [[r["method"], r["model"], *(cell(Stat(*r[key]), fmt, r["seeds"]) for _, key, fmt in TABLE)]
            for r in rows]
    out = [text.table(head, body)]
    seeds = sorted({r["seeds"] for r in rows if r["seeds"] > 1})
    if seeds:
        out.append(f"\nmean ± sample std (ddof=1) over {' or '.join(map(str, seeds))} seeds; final round")
    if diverged:
        out.append("\ndiverged (runs FAILED, in no mean):")
        out += [f"- {label}: {why}" for label, why in diverged.items()]
    return "\n".join(out)


CLIENT_COLUMNS = ("cid", "group", "test_acc", "test_n", "val_acc", "val_n")


def clients_csv(rows) -> str:
    """The final evaluation per client (engine.client_rows) as CSV; floats as repr (exact round trip)."""
    lines = [",".join(CLIENT_COLUMNS)]
    lines += [",".join(str(r[c]) if c in ("cid", "group") else repr(float(r[c])) for c in CLIENT_COLUMNS)
              for r in rows]
    return "\n".join(lines) + "\n"
