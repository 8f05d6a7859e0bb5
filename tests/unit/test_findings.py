"""The study's findings page (reports/README.md) cannot drift from the reports it summarises: every
number in its headline table is the report.md cell it comes from (or the one derivation the page
states: MB/round = up + down, s/round = wall s / rounds), each report's per-seed table and headline
accuracy are what its MLflow export (runs.json, beside it) holds, the mobile-fleet table's cells are
its device reports' (each checked against its own export too), and every ratio the page quotes is in
the paper-scale tables or a report."""
import json
import math
import re
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REPORTS = ROOT / "reports"


def md_tables(text: str) -> list[list[dict[str, str]]]:
    out, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip().replace("**", "") for c in line.strip().strip("|").split("|")])
        elif block:
            if len(block) > 2:
                out.append([dict(zip(block[0], row, strict=True)) for row in block[2:]])
            block = []
    return out


def table_with(text: str, column: str) -> list[dict[str, str]]:
    (found,) = [t for t in md_tables(text) if t and column in t[0]]
    return found


def mean_std(cell: str) -> tuple[float, float]:
    m, s = cell.split("±")
    return float(m), float(s)


FINDINGS = (REPORTS / "README.md").read_text() if (REPORTS / "README.md").exists() else ""
HEADLINE = table_with(FINDINGS, "s/round") if FINDINGS else []
COMPARISONS = sorted({row["comparison"] for row in HEADLINE})
FLEET = next((t for t in md_tables(FINDINGS) if t and "sim s to target (mobile)" in t[0]), [])
"""The page's mobile-fleet table: a column `NAME (LABEL)` is the report reports/fmnist-dir0.3-LABEL/'s
column NAME (the mean, without the std), one row per method."""
FLEET_REPORTS = sorted({f"fmnist-dir0.3-{m.group(1)}" for c in (FLEET[0] if FLEET else ())
                        if (m := re.fullmatch(r".+ \((.+)\)", c))})


def test_the_findings_page_has_its_headline_table():
    assert FINDINGS, "reports/README.md, the study's findings page, is missing"
    assert HEADLINE and COMPARISONS


@pytest.mark.parametrize("name", COMPARISONS)
def test_every_headline_number_is_its_reports_cell(name):
    text = (REPORTS / name / "report.md").read_text()
    rounds = int(re.search(r"^\| run\.rounds +\| (\d+) ", text, re.M).group(1))
    acc = {r["method"]: r for r in table_with(text, "acc/weighted last-k")}
    comm = {r["method"]: r for r in table_with(text, "MB total")}
    mem = {r["method"]: r for r in table_with(text, "peak train MB")}
    rows = [r for r in HEADLINE if r["comparison"] == name]
    assert sorted(r["method"] for r in rows) == sorted(acc)  # every method of the report, no other
    for r in rows:
        m = r["method"]
        assert (r["model"], r["seeds"]) == (acc[m]["model"], acc[m]["seeds"])
        assert r["acc/weighted last-k"] == acc[m]["acc/weighted last-k"]
        assert r["acc/unseen"] == acc[m]["acc/unseen"]
        up, down = mean_std(comm[m]["MB up/round"])[0], mean_std(comm[m]["MB down/round"])[0]
        assert float(r["MB/round"]) == pytest.approx(up + down, abs=1e-3)
        assert float(r["MB total"]) == mean_std(comm[m]["MB total"])[0]
        assert float(r["peak train MB"]) == mean_std(mem[m]["peak train MB"])[0]
        want = mem[m].get("GFLOP/update", "—")  # reports of runs from before FLOPs were counted have none
        assert r["GFLOP/update"] == (want if want == "—" else want.split("±")[0].strip())
        assert float(r["s/round"]) == pytest.approx(mean_std(mem[m]["wall s"])[0] / rounds, abs=0.006)


@pytest.mark.parametrize("name", COMPARISONS + FLEET_REPORTS)
def test_each_report_holds_its_mlflow_exports_numbers(name):
    """report.md's per-seed rows are the export's runs (run id, status, final acc/weighted), and its
    headline accuracy is the mean and sample std over seeds of each FINISHED run's last-k mean, k = a
    tenth of the evaluated rounds (at least 1), recomputed here from the exported histories (a run
    that diverged ends FAILED and is in no mean)."""
    text = (REPORTS / name / "report.md").read_text()
    export = json.loads((REPORTS / name / "runs.json").read_text())
    runs = {r["run_id"]: r for r in export["runs"]}
    seeds = table_with(text, "run id")
    assert {s["run id"] for s in seeds} == set(runs)
    for s in seeds:
        run = runs[s["run id"]]
        assert (row_name(run), run["seed"], run["status"]) == (s["method"], int(s["seed"]), s["status"])
        if run["status"] == "FINISHED":
            assert float(s["acc/weighted"]) == round(run["metrics"]["acc/weighted"], 4)
        else:  # a run that diverged (or was stopped) is listed, its numbers in no table
            assert s["acc/weighted"] == "—" and ("diverged" in run or run["status"] != "FAILED")
    k = int(re.search(r"the mean of the last k = (\d+) of (\d+) evaluated rounds", text).group(1))
    for row in table_with(text, "acc/weighted last-k"):
        per_seed = [statistics.fmean(v for _, v in r["acc/weighted history"][-k:])
                    for r in export["runs"] if row_name(r) == row["method"] and r["status"] == "FINISHED"]
        m, s = mean_std(row["acc/weighted last-k"])
        assert m == round(statistics.fmean(per_seed), 4)
        assert s == round(statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0, 4)
        assert not any(math.isnan(v) for v in per_seed)


def row_name(run: dict) -> str:
    """A report's row for an exported run: its method, `METHOD@FORMAT` when sent in another wire format
    than fp32 (runs exported before formats existed have none: fp32)."""
    wire = run.get("wire", "fp32")
    return run["method"] if wire == "fp32" else f"{run['method']}@{wire}"


def test_the_scaled_models_table_is_its_reports_cells():
    """Each comparison's row of the scaled-models table: FeDEQ's and FedAvg's parameter counts as its
    report's cost table has them, the bytes ratio as its communication table's."""
    rows = [r for r in table_with(FINDINGS, "FeDEQ params shared") if r["setting"] in COMPARISONS]
    assert {r["setting"] for r in rows} == set(COMPARISONS)
    for r in rows:
        text = (REPORTS / r["setting"] / "report.md").read_text()
        cost = {c["method"]: c for c in table_with(text, "params shared")}
        comm = {c["method"]: c for c in table_with(text, "bytes vs FeDEQ")}
        assert (r["FeDEQ model"], r["FedAvg model"]) == (model_of(text, "fedeq"), model_of(text, "fedavg"))
        assert (r["FeDEQ params shared"], r["FeDEQ params personal"]) == (cost["fedeq"]["params shared"],
                                                                          cost["fedeq"]["params personal"])
        assert r["FedAvg params"] == cost["fedavg"]["params shared"]
        assert r["bytes: FedAvg / FeDEQ"] == comm["fedavg"]["bytes vs FeDEQ"]


def model_of(text: str, method: str) -> str:
    return next(r["model"] for r in table_with(text, "acc/weighted last-k") if r["method"] == method)


def test_the_mobile_fleet_table_is_its_reports_cells():
    assert FLEET and FLEET_REPORTS, "the findings page has no mobile-fleet table"
    for column in FLEET[0]:
        m = re.fullmatch(r"(.+) \((.+)\)", column)
        if m is None:
            continue
        name, label = m.groups()
        cells = {r["method"]: r[name] for r in table_with((REPORTS / f"fmnist-dir0.3-{label}" / "report.md").read_text(),
                                                         name)}
        assert sorted(cells) == sorted(r["method"] for r in FLEET), column  # every method, no other
        for row in FLEET:
            assert row[column] == cells[row["method"]].split("±")[0].strip(), (column, row["method"])


def test_every_ratio_quoted_is_in_the_tables_it_comes_from():
    """The claims' numbers (`3.026x`, `1.63x`...) on the findings page: each one appears in a table of
    reports/paper-scale/ (bytes.md, memory.md, memory-gmres.md: the commands' own output) or of a
    comparison's report.md (its `bytes vs FeDEQ` and `memory vs FeDEQ` columns)."""
    scale = "".join(p.read_text() for p in sorted((REPORTS / "paper-scale").glob("*.md")))
    scale += "".join((REPORTS / name / "report.md").read_text() for name in COMPARISONS + FLEET_REPORTS)
    quoted = set(re.findall(r"\b\d+\.\d+x\b", FINDINGS))
    assert quoted, "the findings page quotes no paper-scale ratio"
    assert {q for q in quoted if q not in scale} == set()


def test_the_published_folder_stays_under_15_mb():
    """Everything under reports/ that git keeps (the stores beside a comparison are ignored:
    .gitignore's mlflow.db, optuna.db, *.db.lock): plotly.js once (4.8 MB), pages, SVGs, exports."""
    kept = [p for p in REPORTS.rglob("*") if p.is_file() and p.name not in ("mlflow.db", "optuna.db")
            and not p.name.endswith(".db.lock")]
    assert sum(p.stat().st_size for p in kept) < 15_000_000
