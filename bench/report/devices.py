"""The report's devices table: simulated edge devices (the engine's device profiles, `--devices`,
`--round-deadline`, docs/devices.md): simulated time in total and to the target accuracy, and each
method's participation with the drops by cause. Every run logs these metrics (the default `uniform`
set too); runs recorded before devices existed have none, and a report of only those has no such
table (bench/report/tables.py `group_tables` adds it)."""
from __future__ import annotations

import math

from bench.report.model import Cell, Group, RunRecord, Table
from bench.report.tables import Column, finished, seeds_note, stat_table, target_cell, target_note, target_of, total

# Per round: the simulated seconds and what became of each sampled client.
SIM_TIME, SIM_TIME_CUMULATIVE = "sim/time_s", "sim/time_cumulative_s"
PARTICIPATED = "clients/participated"
DROPS = {"deadline": "clients/dropped_deadline", "memory": "clients/dropped_memory",
         "unavailable": "clients/dropped_unavailable"}
"""Why a sampled client's update was not aggregated -> its per-round count."""
EXCLUDED_MEMORY = "clients/excluded_memory"
"""Distinct clients so far that cannot train the method (device memory below its peak), cumulative."""
SIM_TARGET_COLUMN = "sim s to target"


def participation(r: RunRecord) -> float:
    """Updates aggregated over updates sampled, over the run: the sum of clients/participated over the sum
    of it and every drop (deadline, memory, unavailable); nan without those metrics or with none sampled."""
    agg = total(r, PARTICIPATED)
    sampled = agg + math.fsum(total(r, m) for m in DROPS.values())
    return agg / sampled if sampled > 0 else math.nan


DEVICE_TIME: list[Column] = [("sim s", lambda r: total(r, SIM_TIME), "s", min)]
DEVICE_PARTICIPATION: list[Column] = [
    ("participation", participation, "acc", max),
    *((f"dropped: {why}", (lambda name: lambda r: total(r, name))(m), "count", None) for why, m in DROPS.items()),
    ("excluded by memory", lambda r: r.final(EXCLUDED_MEMORY), "count", None),
]


def logged(group: Group, metric: str) -> bool:
    """Whether a FINISHED run of the group logged `metric` (runs made before it existed did not)."""
    return any(r.history.get(metric) for r in group.runs if r.status == "FINISHED")


def devices_table(group: Group, target_fraction: float, k: int) -> Table | None:
    """Simulated edge devices: simulated time in total and to the target accuracy (where runs logged
    SIM_TIME), and participation with the drops by cause (where they logged PARTICIPATED); None when
    no FINISHED run logged either (runs recorded before devices existed)."""
    time, part = logged(group, SIM_TIME), logged(group, PARTICIPATED)
    if not (time or part):
        return None
    notes = [seeds_note(group)]
    if "run.devices" in group.config:  # each profile set is a group of its own (a run key)
        deadline = group.config.get("run.round_deadline", "None")
        notes.append(f"device profile set: {group.config['run.devices']}; round deadline: "
                     + ("none" if deadline == "None" else f"{deadline} simulated s"))
    extra: dict[str, dict[str, Cell]] = {}
    if time:
        tgt = target_of(group, target_fraction, k)
        notes.append(f"sim s: simulated seconds of the run, the sum of {SIM_TIME} (a round: its slowest aggregated "
                     "update, or the deadline when an update came later)")
        notes.append(target_note(SIM_TARGET_COLUMN, f"simulated seconds ({SIM_TIME_CUMULATIVE} at the window's "
                                 "last round)", tgt, target_fraction, k))
        extra[SIM_TARGET_COLUMN] = {m: target_cell(finished(group, m), tgt[0] if tgt else None, k,
                                                   SIM_TIME_CUMULATIVE, 1.0, "s") for m in group.methods}
    if part:
        notes.append(f"participation: updates aggregated over clients sampled, over the run ({PARTICIPATED} "
                     "summed, over it plus every drop summed); dropped: sampled clients whose update was dropped "
                     "(late for the deadline), that could not train (device memory below the method's peak "
                     "training memory) or whose device was unavailable, summed over the run; excluded by "
                     f"memory: distinct clients unable to train the method by the run's end ({EXCLUDED_MEMORY})")
    columns = (DEVICE_TIME if time else []) + (DEVICE_PARTICIPATION if part else [])
    return stat_table(group, "devices", columns, ["method"], notes, extra, after={SIM_TARGET_COLUMN: "sim s"},
                      best_extra=tuple(extra))
