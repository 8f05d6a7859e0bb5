"""A study is its search space and fixed config; a trial is alive while its owner process is
(bench/tuning/identity.py). One tiny study (fedavg, 1 trial, 1 round, 4 clients, serial, synthetic) is
made once; every key it stores as its identity is then changed, one at a time, and the resume is
refused naming that key; a changed space likewise; an unchanged rerun resumes, failing at once a
RUNNING trial whose owner process is dead and leaving a live owner's alone."""
from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import time
import typing

import optuna
import pytest

from bench import config as C
from bench import sweep as S
from bench.tracking import open_client
from bench.tuning import identity
from bench.tuning.storage import GRACE_S, make_storage
from bench.tuning.study import check_resumable
from fedeq_bench.core.errors import BenchError

SPACE = "fedavg.lr = {low = 0.01, high = 0.3, log = true}\n"
ARGV = ["--method", "fedavg", "--trials", "1", "--space", "space.toml", "--dataset", "synthetic", "--clients", "4",
        "--rounds", "1", "--backend", "serial", "--tracking-uri", "sqlite:///mlflow.db", "--study-name", "s",
        "--no-final-test", "--tuned-out", "tuned.toml", "--quiet"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A folder holding the tiny study `s` in optuna.db and its runs in mlflow.db."""
    d = tmp_path_factory.mktemp("study")
    (d / "space.toml").write_text(SPACE)
    here = os.getcwd()
    os.chdir(d)
    try:
        assert S.main(ARGV) == 0
    finally:
        os.chdir(here)
    return d


@pytest.fixture
def folder(made, tmp_path, monkeypatch):
    """A copy of the made study's folder, as the current directory (a test may change the study)."""
    shutil.copytree(made, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path


OTHER_STRINGS = {"model": "mlp", "partition": "dirichlet:0.3", "data_dir": "elsewhere", "devices": "mobile-mix"}
"""A different value for the string keys whose type allows any string."""


def changed(cfg, key: str, stored: str):
    """A valid value other than the config's for `key` (`run.rounds`, `fedavg.batch_size`,
    `synthetic.alpha`), derived from the field's type: what a user could change on a resume."""
    section, field = key.split(".", 1)
    obj = cfg.run if section == "run" else cfg.methods.get(section) or cfg.datasets[section]
    hint, value = typing.get_type_hints(type(obj))[field], getattr(obj, field)
    if typing.get_origin(hint) is tuple:
        return ",".join(map(str, (*value, max(value) + 1)))
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    inner = args[0] if args and typing.get_origin(hint) is not typing.Literal else hint
    if typing.get_origin(inner) is typing.Literal:
        return next(c for c in typing.get_args(inner) if c != value)
    if inner is bool:
        return not value
    if inner is int:
        return (value or 1) + 1
    if inner is float:
        return (value or 1.0) / 2
    if field == "dataset":
        return next(d for d in cfg.datasets if d != value)
    return OTHER_STRINGS[field]


def test_every_key_of_the_identity_changed_is_refused_naming_it(folder):
    cfg, opts, _ = S.resolve(ARGV)
    storage = make_storage(opts.storage)
    fixed = optuna.load_study(study_name="s", storage=storage).user_attrs[identity.FIXED_ATTR]
    assert "run.rounds" in fixed and "run.tracking_uri" not in fixed and "fedavg.lr" not in fixed
    check_resumable(cfg, opts, storage)  # unchanged: resumable
    for key, old in fixed.items():
        if key == "sweep.objectives":
            c, o, new = cfg, dataclasses.replace(opts, objectives=("acc", "bytes")), "acc,bytes"
        else:
            new = changed(cfg, key, old)
            c, o = C.apply(cfg, {key: new}), opts
        with pytest.raises(BenchError) as e:
            check_resumable(c, o, storage)
        line = str(e.value)
        if key == "sweep.objectives":  # other directions: Optuna's own part of a study's identity, said first
            assert line == "study 's' in sqlite:///optuna.db was created for other objectives (maximize); give " \
                           "another --study-name"
            continue
        assert f"{key} {old} -> " in line, (key, line)
        assert line.startswith("study 's' in sqlite:///optuna.db was made with other settings (") and "\n" not in line
        assert line.endswith("give a new --study-name (or --storage) to start a new study, or the study's settings "
                             "to resume it")


def test_a_key_added_to_the_harness_after_the_study_counts_only_off_its_default(folder):
    """A study made before an option existed stores no key for it: the option at its default (which
    computes what the study's trials computed) resumes the study; any other value is refused."""
    cfg, opts, _ = S.resolve(ARGV)
    storage = make_storage(opts.storage)
    study = optuna.load_study(study_name="s", storage=storage)
    old = {k: v for k, v in study.user_attrs[identity.FIXED_ATTR].items() if k not in ("run.wire", "fedavg.wire")}
    # As a study made before wire formats stores itself, and when a key now named in NOT_IDENTITY
    # (where and how the work runs) was still stored as identity.
    study.set_user_attr(identity.FIXED_ATTR, {**old, "run.keep_going": "False", "run.workers": "7"})
    check_resumable(cfg, opts, storage)
    with pytest.raises(BenchError, match=r"run\.wire \(none\) -> int8"):
        check_resumable(C.apply(cfg, {"wire": "int8"}), opts, storage)


def test_the_keys_left_out_of_the_identity_are_resumes_own():
    """Where and how the work runs is not a study's identity, for the reason `bench.run --resume` may
    change exactly those keys."""
    from bench.experiment.resume import RESUME_KEYS

    assert set(identity.NOT_IDENTITY) == {*RESUME_KEYS, "experiment", "run_name"}


def run_sweep(argv, capsys):
    rc = S.main(argv)
    return rc, capsys.readouterr().err


def statuses(folder) -> list[str]:
    client = open_client(f"sqlite:///{folder}/mlflow.db")
    exp = client.get_experiment_by_name("fedeq-bench")
    return sorted(r.info.status for r in client.search_runs([exp.experiment_id]))


def test_a_changed_space_or_setting_is_one_line_exit_2_from_the_command(folder, capsys):
    before = statuses(folder)
    (folder / "space.toml").write_text("fedavg.lr = {low = 0.01, high = 0.2, log = true}\n")
    rc, err = run_sweep(ARGV, capsys)
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        "error: study 's' in sqlite:///optuna.db was made with other settings (search space fedavg.lr float "
        "low=0.01 high=0.3 log=True -> float low=0.01 high=0.2 log=True); resuming it would mix unlike trials: give "
        "a new --study-name (or --storage) to start a new study, or the study's settings to resume it"]
    (folder / "space.toml").write_text(SPACE)
    rc, err = run_sweep([*ARGV, "--clients", "5"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "(run.clients 4 -> 5)" in err
    assert statuses(folder) == before == ["FINISHED", "FINISHED"]  # nothing recorded, nothing left RUNNING


def owned_trial(study, tracker_client, exp_id, owner):
    """A RUNNING trial as a sweep process leaves it (owner recorded, a fresh heartbeat, its MLflow run
    RUNNING), owned by `owner`. Returns (trial number, MLflow run id)."""
    trial = study.ask()
    study._storage.set_trial_system_attr(trial._trial_id, identity.OWNER_ATTR, owner)
    study._storage.record_heartbeat(trial._trial_id)  # fresh: Optuna's grace alone would wait GRACE_S
    run = tracker_client.create_run(exp_id, tags={"kind": "trial", "study": "s", "trial_number": str(trial.number)})
    return trial.number, run.info.run_id


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")  # study.ask() on it, above
def test_a_rerun_fails_a_dead_owners_trial_at_once_and_leaves_a_live_ones(folder, capsys):
    storage = make_storage("sqlite:///optuna.db")
    study = optuna.load_study(study_name="s", storage=storage)
    client = open_client("sqlite:///mlflow.db")
    exp_id = client.get_experiment_by_name("fedeq-bench").experiment_id
    host = socket.gethostname()
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid is no process
    live = subprocess.Popen(["sleep", "300"])
    try:
        dead_n, dead_run = owned_trial(study, client, exp_id, {"host": host, "pid": gone.pid, "started": "x:1"})
        reused_n, reused_run = owned_trial(study, client, exp_id,  # a live pid that started at another time
                                           {"host": host, "pid": live.pid, "started": "x:1"})
        live_n, live_run = owned_trial(study, client, exp_id,
                                       {"host": host, "pid": live.pid, "started": identity.process_start(live.pid)})
        far_n, far_run = owned_trial(study, client, exp_id, {"host": host + "-elsewhere", "pid": gone.pid, "started": "x"})
        start = time.monotonic()
        rc, err = run_sweep([*ARGV, "--trials", "2"], capsys)
        took = time.monotonic() - start
        assert rc == 0, err
        assert took < GRACE_S  # no heartbeat grace waited out
        trials = {t.number: t for t in optuna.load_study(study_name="s", storage=storage).trials}
        assert trials[dead_n].state == trials[reused_n].state == optuna.trial.TrialState.FAIL
        assert trials[dead_n].user_attrs["error"] == f"its process {gone.pid} on {host} ended while it ran"
        assert trials[live_n].state == trials[far_n].state == optuna.trial.TrialState.RUNNING
        assert [t.state for t in trials.values()].count(optuna.trial.TrialState.COMPLETE) == 2  # resumed: one more
        status = {r: client.get_run(r).info.status for r in (dead_run, reused_run, live_run, far_run)}
        assert status == {dead_run: "FAILED", reused_run: "FAILED", live_run: "RUNNING", far_run: "RUNNING"}
    finally:
        live.kill()
        live.wait()


def test_owner_dead_reads_the_process_not_the_pid_alone():
    """A zombie is dead; this process with its own start time is alive, with another one is not."""
    me = identity.owner()
    assert not identity.owner_dead(me)
    assert identity.owner_dead({**me, "started": "another-boot:1"})
    zombie = subprocess.Popen(["true"])
    deadline = time.monotonic() + 30
    while identity._stat(zombie.pid)[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert identity.owner_dead({"host": me["host"], "pid": zombie.pid, "started": None})
    finally:
        zombie.wait()
    assert not identity.owner_dead({"host": me["host"] + "-elsewhere", "pid": zombie.pid, "started": None})
    assert not identity.owner_dead(None) and not identity.owner_dead({"host": me["host"], "pid": "1"})
