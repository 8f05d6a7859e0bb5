"""The report's provenance: per parent run, what produced its numbers (command, commit, package
versions, dataset fingerprints, its metrics) and its resolved config."""
from __future__ import annotations

from datetime import UTC, datetime

from bench.report.model import Cell, ReportData, Table
from bench.report.tables import DASH


def when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1e3, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ms else DASH


def fingerprints(data: ReportData, parent_id: str) -> list[tuple[str, str]]:
    """(dataset / partition, `seed S: fingerprint; ...`) for each group with runs under this parent."""
    out = []
    for g in data.groups:
        fp = {r.seed: r.fingerprint for r in sorted(g.runs, key=lambda r: r.seed) if r.parent_id == parent_id}
        if fp:
            out.append((g.title, "; ".join(f"seed {s}: {f}" for s, f in fp.items())))
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
