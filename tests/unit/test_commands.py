"""The commands a CLI prints are built to run as shown (bench/cli.py: python, runnable, program,
without_keys; bench/experiment/runs.py: Progress), and `--help` says what the commands really do.
The printed commands are run back in tests/integration/test_printed_commands.py."""
from __future__ import annotations

import os
import shlex
import stat
import sys

import pytest

from bench import commands
from bench import run as bench_run
from bench import sweep as bench_sweep
from bench.experiment import Progress
from fedeq_bench.core.errors import BenchError
from fedeq_bench.datasets.base import DATASETS
from fedeq_bench.methods import METHODS


def executable(path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_the_interpreter_is_named_by_path_relative_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", executable(tmp_path / "proj" / ".venv" / "bin" / "python"))
    monkeypatch.chdir(tmp_path / "proj")
    assert commands.python() == ".venv/bin/python"  # a word with a slash: the shell does not look it up on PATH
    assert commands.runnable("python -m bench.run --resume abc") == ".venv/bin/python -m bench.run --resume abc"
    assert commands.runnable("fedeq-bench run") == "fedeq-bench run"  # not a `python ...` line: unchanged
    monkeypatch.chdir(tmp_path / "proj" / ".venv" / "bin")
    assert commands.python() == "./python"  # a bare `python` would be PATH's
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert commands.python() == str(tmp_path / "proj" / ".venv" / "bin" / "python")
    monkeypatch.setattr(sys, "executable", executable(tmp_path / "my env" / "bin" / "python"))
    assert shlex.split(commands.python()) == [str(tmp_path / "my env" / "bin" / "python")]  # quoted for the shell


def test_a_venv_python_is_not_resolved_to_the_base_interpreter_it_links_to(tmp_path, monkeypatch):
    base = executable(tmp_path / "base" / "python3.11")
    os.makedirs(tmp_path / "proj" / ".venv" / "bin")
    os.symlink(base, tmp_path / "proj" / ".venv" / "bin" / "python")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "proj" / ".venv" / "bin" / "python"))
    monkeypatch.chdir(tmp_path / "proj")
    assert commands.python() == ".venv/bin/python"


def test_a_console_script_is_found_beside_the_interpreter_else_as_python_m_else_on_path(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", executable(tmp_path / "venv" / "bin" / "python"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    assert commands.program("mlflow", "mlflow") == f"{commands.python()} -m mlflow"  # no script beside it
    assert commands.program("nothing-like-this") is None
    executable(tmp_path / "path" / "nothing-like-this")
    assert commands.program("nothing-like-this") == "path/nothing-like-this"
    executable(tmp_path / "venv" / "bin" / "mlflow")
    assert commands.program("mlflow", "mlflow") == "venv/bin/mlflow"


def test_the_installed_mlflow_script_is_found_from_its_distribution():
    exe = commands.program("mlflow", distribution="mlflow")  # this environment's, wherever pip put it
    assert exe is not None and os.access(shlex.split(exe)[0], os.X_OK)


@pytest.mark.parametrize("recorded, expected", [
    # The case: the parent's --seeds and --methods gone, then the run's own, once each.
    ("python -m bench.run --seeds 0,1,2 --methods fedrep --rounds 2", "python -m bench.run --rounds 2"),
    ("python -m bench.run --methods=fedeq,fedrep --seeds=0 --clients 6", "python -m bench.run --clients 6"),
    # argparse's abbreviations (unambiguous, since the command was parsed), and --set of those keys.
    ("python -m bench.run --meth fedrep --see 0 --set seeds=1 --set=run.methods=fedavg --set fedrep.head_epochs=2",
     "python -m bench.run --set fedrep.head_epochs=2"),
    ("python -m bench.run --config 'my presets/a.toml' --model mlp", "python -m bench.run --config 'my presets/a.toml' "
                                                                     "--model mlp"),
])
def test_without_keys_leaves_each_flag_to_be_given_once(recorded, expected):
    assert commands.without_keys(recorded, ("methods", "seeds")) == expected


def test_run_help_lists_the_registered_methods_and_datasets():
    text = bench_run.build_parser()[0].format_help()
    shown = " ".join(text.split())  # argparse wraps lines
    assert f"Methods: {', '.join(METHODS.names())} (or all)." in shown
    assert "Datasets: " + ", ".join(f"{n}:PATH" if n == "npz" else n for n in DATASETS.names()) in shown
    assert "fedeq" in METHODS.names() and "npz:PATH" in shown


def test_sweep_help_shows_no_default_method_because_there_is_none():
    parser, _ = bench_sweep.build_parser()
    shown = " ".join(parser.format_help().split())
    methods = shown[shown.index("--methods NAME,... "):shown.index("--dataset DATASET ")]
    assert "default: fedavg,fedrep" not in methods and "no default: give --method NAME" in methods
    with pytest.raises(BenchError, match="which method"):  # what the help says: leaving it out is an error
        bench_sweep.resolve(["--trials", "1"])


def test_the_interrupt_line_says_what_is_killed_what_stays_finished_and_how_to_continue():
    p = Progress(command="py -m bench.run --methods a,b --seeds 0,1")
    assert p.interrupted() == "interrupted before anything was recorded; start again with: " + p.command
    p.parent, p.resume = "P1", "py -m bench.run --resume P1"
    p.pairs = ["a seed 0", "b seed 0", "a seed 1", "b seed 1"]
    p.finished, p.running = ["a seed 0"], "b seed 0"
    assert p.interrupted() == (
        "interrupted; KILLED: the parent run P1, b seed 0 (its rounds so far are kept); FINISHED (kept as they "
        "are): a seed 0; not started: a seed 1, b seed 1; continue with: py -m bench.run --resume P1")
    p.finished, p.running = ["a seed 0", "b seed 0", "a seed 1", "b seed 1"], None
    assert p.interrupted() == ("interrupted; KILLED: the parent run P1; FINISHED (kept as they are): a seed 0, "
                               "b seed 0, a seed 1, b seed 1; continue with: py -m bench.run --resume P1")
    p.done, p.report = True, "py -m bench.report --runs P1"
    assert p.interrupted() == ("interrupted after every run had FINISHED (parent run P1); the report was not "
                               "finished; write it with: py -m bench.report --runs P1")


def test_the_resume_command_names_a_store_other_than_the_default(monkeypatch):
    from bench import config as C
    from bench.experiment.resume import resume_command

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = C.default_config()
    assert resume_command(cfg, "P1", ("--quiet",)) == commands.runnable("python -m bench.run --resume P1 --quiet")
    other = C.apply(cfg, {"tracking_uri": "sqlite:///runs/m.db"})
    assert resume_command(other, "P1") == commands.runnable(
        "python -m bench.run --resume P1 --tracking-uri sqlite:///runs/m.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/m.db")  # --resume's default store then
    assert resume_command(other, "P1") == commands.runnable("python -m bench.run --resume P1")
