"""The report as Markdown: `report.md` with its figures as SVG files in `figures/` beside it.

    write(data, sections, provenance, "reports/fedeq-bench")   # -> "reports/fedeq-bench/report.md"

A static page any Markdown viewer (GitHub, an editor, `mlflow ui`'s artifact view) shows without a
browser's JavaScript; the same tables as index.html, best values in bold, and numbers exact enough to
check against MLflow (bench/report/tables.py says how many digits).
"""
from __future__ import annotations

import re
from pathlib import Path

from bench.report import figures as F
from bench.report import text
from bench.report.model import Group, Image, ReportData, Table
from bench.report.text import escape
from fedeq_bench.core import outputs


def slug(text: str, limit: int = 60) -> str:
    """A file-name-safe stem: `synthetic / dirichlet(alpha=0.3)` -> `synthetic-dirichlet-alpha-0.3`."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-.")[:limit] or "group"


def group_slugs(groups: list[Group]) -> list[str]:
    """One distinct slug per group (`dataset-partition`; a numeric suffix where two would collide)."""
    out: list[str] = []
    for g in groups:
        s = base = slug(f"{g.dataset}-{g.partition}")
        n = 2
        while s in out:
            s, n = f"{base}-{n}", n + 1
        out.append(s)
    return out


def table(t: Table) -> str:
    right = [any(r[j].value is not None for r in t.rows) for j in range(len(t.columns))]  # numbers
    rows = [[f"**{c.text}**" if c.best else c.text for c in row] for row in t.rows]
    out = [f"**{escape(t.title)}**", "", text.table(t.columns, rows, right)]
    if t.notes:
        out += [""] + [f"- {n}" for n in t.notes]
    return "\n".join(out)


OWNS = outputs.starts_with(b"# Report: ")
"""How core/outputs.py's writer recognises a report.md this module wrote: its first line."""


def write(data: ReportData, sections: list[tuple[Group, list[Table], list]], provenance: list[Table],
          out_dir: str | Path, force: bool = False) -> str:
    """Write out_dir/report.md and out_dir/figures/<group-slug>-<figure>.svg (.png for an `Image`)
    through core/outputs.py's writer, every path checked before any is written (`force`: over files
    there that this module did not write); returns report.md's path."""
    text, figures = render(data, sections, provenance)
    files = {**{f"figures/{n}": (b, "report figure", outputs.MATPLOTLIB) for n, b in figures.items()},
             "report.md": (text.encode(), "report", OWNS)}
    for rel, (_, what, owns) in files.items():
        outputs.check(Path(out_dir, rel), what, owns, force=force, root=out_dir)
    for rel, (content, what, owns) in files.items():
        outputs.write(Path(out_dir, rel), content, what, owns, force=force, root=out_dir)
    return str(Path(out_dir, "report.md"))


def render(data: ReportData, sections: list[tuple[Group, list[Table], list]],
           provenance: list[Table]) -> tuple[str, dict[str, bytes]]:
    """(report.md's text, {figure file name: its bytes}) for the folder figures/ beside it."""
    files: dict[str, bytes] = {}
    lines = [f"# Report: {data.name}", "",
             f"MLflow experiment `{data.experiment}` in `{data.tracking_uri}`; "
             f"{len(data.parents)} parent run(s): {', '.join(f'`{p.run_id}`' for p in data.parents)}.", ""]
    for (group, tables, figs), gslug in zip(sections, group_slugs([s[0] for s in sections]), strict=True):
        lines += [f"## {group.title}", "",
                  f"Seeds {', '.join(map(str, group.seeds))}; methods {', '.join(group.methods)}.", ""]
        if group.verdict:
            lines += [f"**At a glance.** {group.verdict}", ""]
        for t in tables:
            lines += [table(t), ""]
        for fig in figs:
            alt = fig.title.replace("[", "(").replace("]", ")")
            if isinstance(fig, Image):  # drawn elsewhere (a sweep's Optuna figures): the PNG as it is
                if fig.png is None:
                    lines += [f"*{escape(fig.title)}*: {escape(fig.note)}.", ""]
                    continue
                name = f"{gslug}-{fig.name}.png"
                files[name] = fig.png
            else:
                name = f"{gslug}-{fig.name}.svg"
                files[name] = F.to_svg(fig).encode()
            lines += [f"![{alt}](figures/{name})", ""]
    lines += ["## Provenance", ""]
    for t in provenance:
        lines += [table(t), ""]
    return "\n".join(lines), files
