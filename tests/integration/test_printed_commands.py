"""Every command bench.run prints, run back as printed (a shell, PATH without the virtual environment,
as for a user who has not activated it): the report's rerun command (its flags once each; the same
numbers), `browse with: ... ui`, and the `--resume` command of the interrupt line; and a run leaves no
file that the project's .gitignore misses."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

from mlflow.tracking import MlflowClient

from tests.integration.conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BARE_PATH = "/usr/bin:/bin"
"""PATH of a shell where the virtual environment is not active (its bin/ is not on it)."""


def env(**extra):
    """The tests' environment less MLflow's and Ray's address variables (each test says where its runs
    go) and less an active virtual environment; plus `extra`."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS")) and k != "VIRTUAL_ENV"}
    return {**out, "PATH": BARE_PATH, "PYTHONPATH": ROOT, **extra}


def typed(argv, cwd, timeout=300, **extra):
    """The command a user types first: this interpreter, by path."""
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env(**extra), capture_output=True, text=True,
                          timeout=timeout)


def shell(command: str, cwd, timeout=300, **extra):
    """A printed command, run as printed by a shell."""
    return subprocess.run(command, shell=True, cwd=cwd, env=env(**extra), capture_output=True, text=True,
                          timeout=timeout)


def children(client, parent_id):
    exp = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {(r.data.params["method"], int(r.data.params["seed"])): r for r in runs}


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_a_run_leaves_git_clean_and_its_rerun_and_browse_commands_run_as_printed(tmp_path):
    """On the Serial backend: what a run leaves in its folder is the store's and the report's (a Ray's
    files go to its temp dir, test_signals checks that none of its processes is left)."""
    repo = tmp_path / "checkout"
    repo.mkdir()
    shutil.copy(os.path.join(ROOT, ".gitignore"), repo / ".gitignore")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for argv in (["init", "-q"], ["add", ".gitignore"], ["commit", "-qm", "ignore"]):
        subprocess.run([*git, *argv], cwd=repo, check=True)
    # A small run on the default store, its flags given as a user gives them: --seeds and --methods on
    # the command line, which the rerun command must replace, not repeat.
    proc = typed(["-m", "bench.run", "--seeds", "0", "--methods", "fedavg,fedrep", "--rounds", "2",
                  "--fraction", "0.2", "--backend", "serial", "--quiet"], repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout == ""  # mlflow.db.lock was left untracked before *.db.lock

    parent = re.search(r"parent run ([0-9a-f]{32})\)", proc.stdout).group(1)
    md = (repo / "reports" / f"fedeq-bench-{parent[:8]}" / "report.md").read_text()
    rerun = re.search(r"\| (\S+ -m bench\.run [^|]*?--methods fedrep --seeds 0) +\|", md).group(1)
    words = rerun.split()
    flags = [w for w in words if w.startswith("--")]
    assert len(flags) == len(set(flags)), rerun  # each flag once
    assert words[0] == sys.executable and words[1:3] == ["-m", "bench.run"], rerun
    again = shell(rerun, repo)
    assert again.returncode == 0, again.stderr[-3000:]
    # The rerun is that one run again: its own parent, the same params and the same numbers.
    parent2 = re.search(r"parent run ([0-9a-f]{32})\)", again.stdout).group(1)
    client = MlflowClient(tracking_uri=f"sqlite:///{repo}/mlflow.db")
    first, second = children(client, parent)[("fedrep", 0)], children(client, parent2)
    assert list(second) == [("fedrep", 0)]
    assert second[("fedrep", 0)].data.params == first.data.params
    for key in ("acc/mean", "acc/weighted", "bytes/cumulative", "loss/train"):
        assert history(client, second[("fedrep", 0)].info.run_id, key) == history(client, first.info.run_id, key)

    # `browse with: ...`: the printed command starts MLflow's UI on this store (a free port added).
    browse = re.search(r"browse with: (.+)$", proc.stdout, re.M).group(1)
    assert browse.split()[1:] == ["ui", "--backend-store-uri", "sqlite:///mlflow.db"], browse
    port = free_port()
    ui = subprocess.Popen(f"exec {browse} --host 127.0.0.1 --port {port}", shell=True, cwd=repo, env=env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert ui.poll() is None, f"`{browse}` ended with {ui.returncode}"
                assert time.time() < deadline, f"`{browse}` did not serve within 120 s"
                time.sleep(0.5)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout == ""


def test_the_interrupt_line_names_killed_and_finished_runs_and_its_resume_command_continues(tmp_path):
    args = ["--methods", "fedavg,fedrep", "--rounds", "2", "--clients", "6", "--backend", "serial",
            "--checkpoint-every", "1", "--quiet", "--no-report"]
    # Ctrl-C right after fedrep's first round: fedavg seed 0 has FINISHED, fedrep seed 0 is part-way.
    proc = typed(["-m", "tests.integration.faulty", "sigint-after", "fedrep:0:1", "--", *args], tmp_path)
    assert proc.returncode == 130, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    parent = re.search(r"the parent run ([0-9a-f]{32})", line).group(1)
    resume = f"{sys.executable} -m bench.run --resume {parent} --quiet --no-report"
    assert line == (f"error: interrupted; KILLED: the parent run {parent}, fedrep seed 0 (its rounds so far are "
                    f"kept); FINISHED (kept as they are): fedavg seed 0; continue with: {resume}")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = children(client, parent)
    assert client.get_run(parent).info.status == "KILLED"
    assert {k: r.info.status for k, r in runs.items()} == {("fedavg", 0): "FINISHED", ("fedrep", 0): "KILLED"}

    # Interrupted again while resuming (fedrep's round 2): fedavg, finished by the first invocation, is
    # still said to be FINISHED, and the same command continues.
    proc = typed(["-m", "tests.integration.faulty", "sigint-after", "fedrep:0:2", "--", "--resume", parent, "--quiet",
                  "--no-report"], tmp_path)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == line
    assert client.get_run(parent).info.status == "KILLED"

    again = shell(resume, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert client.get_run(parent).info.status == "FINISHED"
    assert {k: r.info.status for k, r in children(client, parent).items()} == {
        ("fedavg", 0): "FINISHED", ("fedrep", 0): "FINISHED"}
