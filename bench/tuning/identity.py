"""What a study and a trial are, checked on every resume.

- **A study is its search space and its fixed config.** Both are stored in the study's user attrs
  when it is created (`bench.space`, `bench.fixed`; optuna-dashboard shows them) and compared when the
  same command resumes it: a resume with another space or another fixed setting (rounds, dataset,
  clients, a method key, ...) would put trials that measured different things in one study, and the
  tuned preset would misstate how its winner was found. The fixed config is every key of the
  resolved config that changes what a trial measures: the run keys, the method's keys and the
  dataset's, less where and how the work runs (the keys `bench.run --resume` may change,
  bench/experiment/resume.py `RESUME_KEYS`, and the experiment and run names) and less the swept keys
  (their fixed value is never used); and the objectives.
- **A trial is alive while its process is.** The process that runs a trial records itself in the
  trial's system attrs when the trial starts (`bench.owner`: host, pid, and the process's start time
  with the machine's boot id, so a reused pid is not taken for the owner). On resume a RUNNING trial
  whose owner ran on this host and is gone (no such pid, a zombie, or a process that started at
  another time) is marked FAIL at once, with no heartbeat grace to wait out; a live owner's trial is
  left alone.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
from typing import Any

from fedeq_bench.core.errors import BenchError

FIXED_ATTR = "bench.fixed"
SPACE_ATTR = "bench.space"
OWNER_ATTR = "bench.owner"

NOT_IDENTITY = ("experiment", "run_name", "tracking_uri", "backend", "workers", "address", "state_budget_gb",
                "checkpoint_every", "keep_going")
"""Run keys that do not define a study: the MLflow names, and where and how the work runs (what a test
keeps equal to bench/experiment/resume.py's RESUME_KEYS, which `--resume` may change for the same reason)."""


def fixed_config(flat: dict[str, str], space, objectives) -> dict[str, str]:
    """The study-defining part of a trial's base config, `flat` as `config.flatten` gives it
    (`{"run.rounds": "2", "fedavg.lr": "0.05", ...}`): the keys of `NOT_IDENTITY`, the swept keys (with
    the run key a swept method key would default to: `run.lr` for `fedavg.lr`) and `run.methods` (the
    study's one method, which its keys and space name) left out, the objectives added as
    `sweep.objectives`."""
    unused = {*space, *(f"run.{k.rpartition('.')[2]}" for k in space), "run.methods"}  # the study's own method
    out = {k: v for k, v in sorted(flat.items()) if k not in unused and k.removeprefix("run.") not in NOT_IDENTITY}
    out["sweep.objectives"] = ",".join(objectives)
    return out


def space_record(space) -> dict[str, dict[str, Any]]:
    """`{key: {"kind": ..., "low": ..., ...}}` of a `spaces.Dist` dict, as JSON stores it."""
    rec = {k: {f: v for f, v in dataclasses.asdict(d).items() if f != "key"} for k, d in sorted(space.items())}
    return json.loads(json.dumps(rec))


def _shown(value) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, dict):  # a space entry: `float low=0.01 high=0.3 log=True`
        return " ".join([str(value.get("kind"))] + [f"{k}={v}" for k, v in value.items()
                                                     if k != "kind" and v not in (None, False, [])])
    return str(value)


def differences(old: dict, new: dict, label: str = "", added: dict | None = None) -> list[str]:
    """`run.rounds 2 -> 3` for every key whose value differs between `old` and `new` (sorted). A key
    only `new` has is no difference when its value is the one `added` gives for it."""
    added = added or {}
    return [f"{label}{k} {_shown(old.get(k))} -> {_shown(new.get(k))}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not (k not in old and k in added and new.get(k) == added[k])]


def mismatch(study, fixed: dict[str, str], space: dict[str, dict]) -> list[str]:
    """What differs between the identity stored on `study` and this run's; [] for a study that stores
    none (a new one, or one made before identities were recorded). A key the stored identity lacks is
    an option the harness gained after the study was made: at its default it computes what the study's
    trials computed (a new option's default keeps the earlier numbers, e.g. `wire = fp32`), so only
    another value is a difference. A stored run key that NOT_IDENTITY has since come to name is no
    part of the identity any more, and is not compared."""
    from bench import config as C

    attrs = study.user_attrs
    if FIXED_ATTR not in attrs:
        return []
    defaults = C.flatten(C.default_config())
    stored = {k: v for k, v in attrs[FIXED_ATTR].items()
              if not (k.startswith("run.") and k.removeprefix("run.") in NOT_IDENTITY)}
    return (differences(stored, fixed, added=defaults)
            + differences(attrs.get(SPACE_ATTR, {}), space, "search space "))


def refusal(study, diffs: list[str], storage_url: str) -> BenchError:
    """The one line that refuses to resume `study`, naming each key with its old and new value."""
    return BenchError(f"study {study.study_name!r} in {storage_url} was made with other settings "
                      f"({'; '.join(diffs)}); resuming it would mix unlike trials: give a new --study-name "
                      f"(or --storage) to start a new study, or the study's settings to resume it")


def check_or_record(study, fixed: dict[str, str], space: dict[str, dict], storage_url: str) -> None:
    """Record this run's identity on a study that has none; refuse to resume a study that was made with
    another one (`refusal`)."""
    diffs = mismatch(study, fixed, space)
    if diffs:
        raise refusal(study, diffs, storage_url)
    if FIXED_ATTR not in study.user_attrs:
        study.set_user_attr(FIXED_ATTR, fixed)
        study.set_user_attr(SPACE_ATTR, space)


# -- a trial's owner process ---------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first, start time 20th); None when
    there is no such process (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str | None:
    """`BOOT_ID:TICKS`: when process `pid` started (clock ticks since boot, /proc/PID/stat field 22) on
    which boot of this machine; None without /proc or without the process."""
    fields = _stat(pid)
    return None if fields is None else f"{_boot_id()}:{fields[19]}"


def owner() -> dict[str, Any]:
    """This process, as a trial's owner: host, pid, start time."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": process_start(os.getpid())}


def owner_dead(record) -> bool:
    """Whether the process `record` (an `owner()`) names is known to be gone: it ran on this host and
    its pid is no process, a zombie, or a process that started at another time (the pid reused).
    False for another host (its processes cannot be seen from here: Optuna's heartbeat decides), a
    record of another form, and a process that lives."""
    if not isinstance(record, dict) or record.get("host") != socket.gethostname():
        return False
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: it exists
        pass
    fields = _stat(pid)
    if fields is None:  # no /proc: the pid exists, which is all that can be known
        return False
    return fields[0] == "Z" or (record.get("started") is not None and record["started"] != process_start(pid))


def record_owner(trial) -> None:
    """Write `owner()` into a running trial's system attrs (Optuna's Trial has no public setter for
    them; its storage does)."""
    trial.study._storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, owner())


def fail_dead_owners(study) -> list[int]:
    """Mark FAIL every RUNNING trial of `study` whose owner is dead (`owner_dead`), with the reason as
    its `error` user attr. Returns their numbers."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage, failed = study._storage, []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        rec = t.system_attrs.get(OWNER_ATTR)
        if not owner_dead(rec):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "error", f"its process {rec['pid']} on {rec['host']} ended "
                                                              f"while it ran")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:  # ended by another process meanwhile
            continue
        failed.append(t.number)
    return failed
