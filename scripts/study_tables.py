"""Print the findings page's headline table (reports/README.md) from the comparisons' report.md files:
per comparison and method, the headline accuracy (acc/weighted, mean of the last k evaluated rounds,
mean ± std over seeds), acc/unseen, MB per round (up + down) and in total, peak training MB, GFLOP
per local update (a dash where the report has no such column: runs from before FLOPs were counted)
and seconds per round (the report's wall s over the rounds). Every number is copied or derived from one
report.md cell; tests/unit/test_findings.py checks the page against the reports.

    python scripts/study_tables.py synthetic
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORTS = os.path.join(ROOT, "reports")


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table of `text`, as rows of {header: cell} (bold markers removed)."""
    out, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip().replace("**", "") for c in line.strip().strip("|").split("|")])
        elif block:
            if len(block) > 2:
                out.append([dict(zip(block[0], row, strict=True)) for row in block[2:]])
            block = []
    return out


def by_method(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {r["method"]: r for r in rows}


def mean(cell: str) -> float:
    return float(cell.split("±")[0])


def headline(name: str) -> list[list[str]]:
    """Rows of one comparison: [comparison, method, model, seeds, acc, unseen, MB/round, MB total, peak MB, s/round]."""
    text = open(os.path.join(REPORTS, name, "report.md")).read()
    rounds = int(re.search(r"^\| run\.rounds +\| (\d+) ", text, re.M).group(1))
    found = tables(text)
    acc = by_method(next(t for t in found if t and "acc/weighted last-k" in t[0]))
    comm = by_method(next(t for t in found if t and "MB total" in t[0]))
    mem = by_method(next(t for t in found if t and "peak train MB" in t[0]))
    rows = []
    for m, a in acc.items():
        per_round = mean(comm[m]["MB up/round"]) + mean(comm[m]["MB down/round"])
        rows.append([name, m, a["model"], a["seeds"], a["acc/weighted last-k"], a["acc/unseen"], f"{per_round:.3f}",
                     comm[m]["MB total"].split("±")[0].strip(), mem[m]["peak train MB"].split("±")[0].strip(),
                     mem[m].get("GFLOP/update", "—").split("±")[0].strip(), f"{mean(mem[m]['wall s']) / rounds:.2f}"])
    return rows


HEADER = ["comparison", "method", "model", "seeds", "acc/weighted last-k", "acc/unseen", "MB/round",
          "MB total", "peak train MB", "GFLOP/update", "s/round"]


def markdown(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(HEADER), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


if __name__ == "__main__":
    print(markdown([row for name in sys.argv[1:] for row in headline(name)]))
