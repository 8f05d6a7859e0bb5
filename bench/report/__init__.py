"""Comparison reports from MLflow: `reports/<name>/index.html` and `report.md` (+ `figures/*.svg`).

    paths = report.build("sqlite:///mlflow.db", "fedeq-bench")              # every comparison there
    paths = report.build(uri, "fedeq-bench", runs=[parent_run_id])           # one bench.run invocation
    paths = report.build(uri, "fedeq-bench", sweep="fedeq-synthetic")        # a study's trials
    report.log_artifacts(paths, MlflowClient(uri), parent_run_id)           # under report/ in the UI

The steps, one module each: `collect` reads the runs with MLflow's client (no torch, no engine) into
`model.ReportData`; `tables` and `figures` build what each dataset x partition shows (`sweep`: a
study's page); `markdown` and `html` write it; `stats` (seed statistics) and `text` (the one Markdown table writer) serve the
terminal table too. `python -m bench.report` is the command line (bench/report/__main__.py). It may
import bench.tracking, bench.config, bench.cli and the library's core: never torch, the round loop
or the experiment library (tests/unit/test_layers.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from fedeq_bench.core import outputs
from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.outputs import Owns


@dataclass(frozen=True)
class ReportPaths:
    out_dir: str
    html: str
    """out_dir/index.html: one self-contained page (data, plots and plotly.js inside)."""
    markdown: str
    """out_dir/report.md, its figures in out_dir/figures/."""


def default_out(name: str) -> str:
    from bench.report.markdown import slug

    return os.path.join("reports", slug(name, 100))


FORCE_HINT = "give --force to replace it, or another --out"


def out_files(out_dir: str, figures=()) -> dict[str, tuple[str, Owns]]:
    """{path: (what it is, how core/outputs.py recognises it)} of every file a report writes into
    `out_dir`: report.md, index.html and the figures named `figures` (in figures/)."""
    from bench.report import html, markdown

    files = {os.path.join(out_dir, "figures", n): ("report figure", outputs.MATPLOTLIB) for n in figures}
    return {**files, os.path.join(out_dir, "report.md"): ("report", markdown.OWNS),
            os.path.join(out_dir, "index.html"): ("report page", html.OWNS)}


def check_out(out_dir: str, force: bool = False, figures=(), hint: str = FORCE_HINT) -> None:
    """Refuse, in one line, an output folder the report would not write into (core/outputs.py's rules:
    a file, a pipe or a device where a report file goes, a symbolic link at it or at figures/, a file
    there that no report wrote unless `force`). Called before the runs are read, and again on the
    whole list of files before the first is written."""
    outputs.check_dir(out_dir, "--out")
    outputs.check_folder(os.path.join(out_dir, "figures"), root=out_dir)
    for path, (what, owns) in out_files(out_dir, figures).items():
        outputs.check(path, what, owns, force=force, root=out_dir, hint=hint)


def build(tracking_uri: str, experiment: str, runs=None, out: str | None = None, sweep: str | None = None,
          target: float = 0.95, last_k: int | None = None, force: bool = False,
          hint: str = FORCE_HINT, shared_plotly: bool = False) -> ReportPaths:
    """Read the comparisons of `experiment` (or only the parent run ids `runs`; or the study `sweep`)
    and write the report to `out` (default reports/<experiment> or reports/<study>). Runs are pooled as
    seeds only when their configs agree (collect.comparable_groups). `last_k`: the headline accuracy is
    the mean of the last k evaluated rounds (default None: a tenth of them, at least 1); `target`: the
    fraction of the best method's mean last-k accuracy that the MB-to-target column measures up to.
    Every file goes through core/outputs.py's writer, `out` checked before the runs are read (`force`:
    replace files there that no report wrote; `hint`: how the refusal says to do that). `shared_plotly`:
    index.html loads plotly.js from `../plotly.min.js`, written there once for every report folder
    beside this one (a published set of reports stores the 4.8 MB bundle once).
    Raises BenchError on bad input (unknown experiment, run or study; no runs; a bad option)."""
    from bench.report import collect, figures, html, markdown, provenance, tables, verdict
    from bench.report import sweep as sweep_page

    if not 0 < target <= 1:
        raise BenchError(f"--target is a fraction of the best mean last-k accuracy, in (0, 1]; got {target}")
    if last_k is not None and last_k < 1:
        raise BenchError(f"--last-k is a number of evaluated rounds, at least 1; got {last_k}")
    if sweep is not None and runs:
        raise BenchError("give --sweep STUDY or --runs PARENT_ID,..., not both")
    out_dir = out or default_out(sweep if sweep is not None else experiment)  # the name collect gives data
    check_out(out_dir, force, hint=hint)  # before anything is read or drawn
    shared = os.path.join(os.path.dirname(os.path.abspath(out_dir)), html.SHARED_PLOTLY)
    if shared_plotly:
        outputs.check(shared, "plotly.js", html.PLOTLY_OWNS, force=force, root=os.path.dirname(shared), hint=hint)
    if sweep is not None:
        data = collect.collect_sweep(tracking_uri, experiment, sweep)
        # Trials by acc/val (they log no test metric), the best trial's rerun by test accuracy: sweep.py.
        sections = sweep_page.sections(data)
    else:
        data = collect.collect(tracking_uri, experiment, runs)
        sections = []
        for g in data.groups:
            k, _ = tables.last_k(g, last_k)
            g.verdict = verdict.verdict(g, k, target)
            sections.append((g, tables.group_tables(g, data.parents, target, k),
                             figures.pareto_figures(g, k) + figures.group_figures(g)))
    if not data.groups:
        raise BenchError(f"{data.name!r}: its parent run(s) have no child runs, so there is nothing to report")
    md_text, figs = markdown.render(data, sections, provenance.provenance_tables(data))
    # index.html shows each parent's resolved config itself (folded), so its provenance tables leave it out.
    page = html.render(data, sections, provenance.provenance_tables(data, config=False),
                       plotly_src=f"../{html.SHARED_PLOTLY}" if shared_plotly else None)
    md, index = os.path.join(out_dir, "report.md"), os.path.join(out_dir, "index.html")
    content = {os.path.join(out_dir, "figures", n): b for n, b in figs.items()}
    content.update({md: md_text.encode(), index: page.encode()})
    check_out(out_dir, force, figs, hint)  # every file, before the first is written
    for path, (what, owns) in out_files(out_dir, figs).items():
        outputs.write(path, content[path], what, owns, force=force, root=out_dir, hint=hint)
    if shared_plotly:
        outputs.write(shared, html.plotly_js().encode(), "plotly.js", html.PLOTLY_OWNS, force=force,
                      root=os.path.dirname(shared), hint=hint)
    return ReportPaths(out_dir=str(out_dir), html=index, markdown=md)


def log_artifacts(paths: ReportPaths, client, run_id: str) -> None:
    """Log index.html, report.md and figures/ as artifacts of `run_id` under `report/`, so the MLflow UI
    shows the report one click from the parent run."""
    client.log_artifact(run_id, paths.html, "report")
    client.log_artifact(run_id, paths.markdown, "report")
    figs = os.path.join(paths.out_dir, "figures")
    if os.path.isdir(figs) and os.listdir(figs):
        client.log_artifacts(run_id, figs, "report/figures")
