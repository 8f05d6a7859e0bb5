"""The report as one self-contained HTML file: tables, interactive figures, provenance.

Everything the page needs is inside it: plotly.js (the copy bundled with the installed plotly package,
inlined), the figures' data as JSON (a sweep's Optuna figures as PNG data: URIs), a few lines of CSS
and a table sort. It requests nothing: no CDN,
no web font, no MathJax (`typesetMath: false`), so it opens from disk on a machine with no network
(tests/integration/test_report_browser.py checks that in Chromium). Text from MLflow (method names,
commands, config values) is escaped.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from bench.report.figures import Figure, to_plotly
from bench.report.model import Group, Image, ReportData, Table
from fedeq_bench.core import outputs
from fedeq_bench.core.outputs import contains

PLOTLY_CONFIG = {"displaylogo": False, "responsive": True, "typesetMath": False, "showLink": False}
# Text that is code (a command, a commit, a run id), shown in <code>: a column with one of these
# names, or in a two-column (what, value) table the value of a row with one of these names.
CODE = ("command", "git commit", "run id")

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; padding: 1em 2em;
       max-width: 1400px; color: #222; }
.verdict { background: #f6f8fb; border-left: 3px solid #1f77b4; padding: .5em .8em; }
td { overflow-wrap: anywhere; }
.wide { overflow-x: auto; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0 .3em; font-size: 13px; }
caption { text-align: left; font-weight: 600; padding-bottom: .3em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; vertical-align: top; }
th { background: #f3f3f3; cursor: pointer; user-select: none; }
th.asc::after { content: " \\25B2"; } th.desc::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.best { background: #e3f4e1; font-weight: 600; }
ul.notes { margin: 0 0 1em; padding-left: 1.2em; color: #555; font-size: 12px; }
.plot { width: 100%; min-height: 420px; }
figure { margin: 1em 0; }
code { font-size: 12px; background: #f5f5f5; padding: 1px 3px; word-break: break-all; }
details { margin: .5em 0; } summary { cursor: pointer; }
.meta { color: #555; }
"""

# Click a header to sort by its column (numbers by the value behind the cell, text otherwise).
SORT_JS = """
document.querySelectorAll("table.sortable th").forEach((th, col) => th.addEventListener("click", () => {
  const table = th.closest("table"), body = table.tBodies[0];
  const dir = th.classList.contains("asc") ? -1 : 1;
  table.querySelectorAll("th").forEach(h => h.classList.remove("asc", "desc"));
  th.classList.add(dir > 0 ? "asc" : "desc");
  const key = tr => { const td = tr.cells[col]; const v = td && td.dataset.v;
                      return v !== undefined && v !== "" ? Number(v) : (td ? td.textContent : ""); };
  const rows = Array.from(body.rows);
  rows.sort((a, b) => { const x = key(a), y = key(b);
    if (typeof x === "number" && typeof y === "number") return dir * (x - y);
    if (typeof x === "number") return -1; if (typeof y === "number") return 1;
    return dir * String(x).localeCompare(String(y)); });
  rows.forEach(r => body.appendChild(r));
}));
"""

DRAW_JS = """
for (const [id, fig] of Object.entries(FIGURES)) Plotly.newPlot(id, fig.data, fig.layout, CONFIG);
"""


OWNS = contains(b": fedeq-bench report</title>")
"""How core/outputs.py's writer recognises an index.html this module wrote: its title, in its first lines."""


def write(data: ReportData, sections: list[tuple[Group, list[Table], list[Figure | Image]]],
          provenance: list[Table], path: str | Path, force: bool = False) -> str:
    """Write the report to `path` (the index.html file; its folder is created) through core/outputs.py's
    writer (`force`: over a file there that this module did not write) and return the path."""
    return outputs.write(path, render(data, sections, provenance).encode(), "report page", OWNS, force=force)


def render(data: ReportData, sections: list[tuple[Group, list[Table], list[Figure | Image]]],
           provenance: list[Table], plotly_src: str | None = None) -> str:
    """The page's text; plotly.js inside it, or with `plotly_src` a `<script src>` to that path (a copy
    shared by several pages, which `shared_plotly` names).

    `sections`: per dataset and partition, its tables and figures, in page order; `provenance`: the
    tables of the provenance section (provenance.provenance_tables: command, commit, versions...), which
    is followed by each parent run's resolved config, folded."""
    esc = html.escape
    figures: dict[str, dict] = {}
    body = [f"<h1>{esc(data.name)}</h1>",
            f'<p class="meta">MLflow experiment <code>{esc(data.experiment)}</code> in '
            f"<code>{esc(data.tracking_uri)}</code>; {len(data.parents)} invocation(s).</p>"]
    toc = [f'<li><a href="#s{i}">{esc(g.title)}</a></li>' for i, (g, _, _) in enumerate(sections)]
    body.append(f'<nav><ul>{"".join(toc)}<li><a href="#provenance">Provenance</a></li></ul></nav>')
    for i, (group, tables, figs) in enumerate(sections):
        body.append(f'<section id="s{i}"><h2>{esc(group.title)}</h2>')
        body.append(f'<p class="meta">Seeds {esc(", ".join(map(str, group.seeds)))}; methods '
                    f'{esc(", ".join(group.methods))}.</p>')
        if group.verdict:
            body.append(f'<p class="verdict"><strong>At a glance.</strong> {esc(group.verdict)}</p>')
        body += [_table(t) for t in tables]
        for fig in figs:
            fid = f"s{i}-{fig.name}"
            if isinstance(fig, Image):
                body.append(_image(fid, fig))
                continue
            figures[fid] = to_plotly(fig)
            body.append(f'<figure><div class="plot" id="{fid}"></div><noscript>{esc(fig.title)}: the '
                        "interactive figures need JavaScript; report.md beside this file has them as "
                        "SVG.</noscript></figure>")
        body.append("</section>")
    body.append('<section id="provenance"><h2>Provenance</h2>')
    body += [_table(t) for t in provenance]
    body += [_config(p) for p in data.parents]
    body.append("</section>")
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(data.name)}: fedeq-bench report</title><style>{CSS}</style>",
        f'<script src="{esc(plotly_src)}"></script>' if plotly_src else f"<script>{plotly_js()}</script>",
        "</head><body>", *body,
        f"<script>const FIGURES = {_json(figures)};\nconst CONFIG = {_json(PLOTLY_CONFIG)};"
        f"{DRAW_JS}{SORT_JS}</script>",
        "</body></html>", ""])
    return page


SHARED_PLOTLY = "plotly.min.js"
"""The shared copy's file name, in the folder above the report folders that use it."""

PLOTLY_OWNS = outputs.starts_with(b"/**\n* plotly.js v")
"""How the writer recognises a plotly.js it wrote: the bundle's own first lines."""


def plotly_js() -> str:
    """plotly.js, minified, as the installed plotly package bundles it (the same copy plotly's own
    `write_html(include_plotlyjs=True)` inlines): no network, the version pinned by the package."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _json(obj) -> str:
    # Inside <script>, "</" could close the element early (a method named "</script>"): escape it.
    return json.dumps(obj, allow_nan=False).replace("</", "<\\/")


def _table(t: Table) -> str:
    esc = html.escape
    code_cols = {j for j, c in enumerate(t.columns) if c.lower() in CODE}
    head = "".join(f"<th>{esc(c)}</th>" for c in t.columns)
    rows = []
    for row in t.rows:
        cells = []
        key_value = len(row) == 2 and row[0].text.lower() in CODE
        for j, cell in enumerate(row):
            cls = (["num"] if cell.value is not None else []) + (["best"] if cell.best else [])
            attrs = (f' class="{" ".join(cls)}"' if cls else "") + (
                f' data-v="{cell.value!r}"' if cell.value is not None and math.isfinite(cell.value) else "")
            code = (j in code_cols or key_value and j == 1) and cell.text
            text = f"<code>{esc(cell.text)}</code>" if code else esc(cell.text)
            cells.append(f"<td{attrs}>{text}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    notes = "".join(f"<li>{esc(n)}</li>" for n in t.notes)
    return (f'<div class="wide"><table class="sortable"><caption>{esc(t.title)}</caption><thead><tr>{head}'
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
            + (f'<ul class="notes">{notes}</ul>' if notes else ""))


def _image(fid: str, img: Image) -> str:
    """A picture drawn elsewhere (a sweep's Optuna figures) inlined as a data: URI, nothing fetched;
    without one, the sentence saying why it is absent."""
    esc = html.escape
    if img.png is None:
        return f'<p class="meta" id="{fid}"><strong>{esc(img.title)}</strong>: {esc(img.note)}.</p>'
    data = base64.b64encode(img.png).decode("ascii")
    return (f'<figure id="{fid}"><img src="data:image/png;base64,{data}" alt="{esc(img.title)}" '
            f'style="max-width: 100%"><figcaption class="meta">{esc(img.title)}</figcaption></figure>')


def _config(p) -> str:
    """One invocation's resolved config (every param of its parent run), folded."""
    esc = html.escape
    rows = "".join(f"<tr><td><code>{esc(k)}</code></td><td>{esc(v)}</td></tr>" for k, v in sorted(p.config.items()))
    return (f"<details><summary>Resolved config of {esc(p.name)} (<code>{esc(p.run_id)}</code>, "
            f"{len(p.config)} params)</summary><table><tbody>{rows}</tbody></table></details>")
