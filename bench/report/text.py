"""The one Markdown table writer: the terminal summary, summary.md, the reports, a sweep's Pareto
front and the perf tables all print through `table`, so every table escapes and aligns alike."""
from __future__ import annotations

from collections.abc import Iterable, Sequence


def escape(text: str) -> str:
    """A cell's text inside a Markdown table row: pipes escaped, no line breaks."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def table(columns: Sequence[str], rows: Iterable[Sequence[object]], right: Sequence[bool] | None = None) -> str:
    """A GitHub Markdown table, cells padded to their column's width (it reads as a table in a terminal
    too). A cell is `str(value)`, escaped; `right[j]` right-aligns column j (`---:`, for numbers)."""
    head = [escape(str(c)) for c in columns]
    body = [[escape(str(c)) for c in row] for row in rows]
    for row in body:
        if len(row) != len(head):
            raise ValueError(f"a row of {len(row)} cells in a table of {len(head)} columns: {row}")
    right = list(right) if right is not None else [False] * len(head)
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w)
                                 for c, w, r in zip(cells, widths, right, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right, strict=True)) + "|"
    return "\n".join([line(head), rule, *map(line, body)])
