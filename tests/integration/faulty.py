"""Real commands with a fault injected at a known moment, for the tests that cannot time one from outside.

    python -m tests.integration.faulty kill-after METHOD:SEED:ROUND -- BENCH_RUN_ARGS...
        `python -m bench.run ARGS`, SIGKILLed right after that round of that method x seed is logged
        (through `bench.run.main`'s `on_round` callable): a `kill -9` at a known point.
    python -m tests.integration.faulty sigint-after METHOD:SEED:ROUND -- BENCH_RUN_ARGS...
        `python -m bench.run ARGS`, sending itself SIGINT right after that round is logged: a Ctrl-C
        at a known point (earlier runs FINISHED, this one part-way).
    python -m tests.integration.faulty sigint-in-write ARTIFACT -- BENCH_RUN_ARGS...
        `python -m bench.run ARGS`, sending itself SIGINT just as the artifact ARTIFACT's write starts
        (inside the tracker's deferred-signal block, where MLflow's client is called): the Ctrl-C a
        user cannot time by hand. The write must still complete and the run end KILLED.

Nothing here is product code: the command under test is the real one, with the real store.
"""
from __future__ import annotations

import os
import signal
import sys


def kill_after(at: str, sig: int = signal.SIGKILL):
    def on_round(method, seed, rnd, metrics):
        if f"{method}:{seed}:{rnd}" == at:
            os.kill(os.getpid(), sig)
    return on_round


def sigint_in_write(artifact: str) -> None:
    from mlflow.tracking import MlflowClient

    write = MlflowClient.log_text

    def log_text(self, run_id, text, artifact_file):
        if artifact_file == artifact:
            os.kill(os.getpid(), signal.SIGINT)
        return write(self, run_id, text, artifact_file)

    MlflowClient.log_text = log_text


def main(argv: list[str]) -> int:
    from bench import run as bench_run
    from bench.quick_exit import exit_now

    what, arg, sep, *rest = argv
    assert sep == "--", "usage: faulty WHAT ARG -- ARGS"
    if what == "kill-after":
        code = bench_run.main(rest, on_round=kill_after(arg))
    elif what == "sigint-after":
        code = bench_run.main(rest, on_round=kill_after(arg, signal.SIGINT))
    elif what == "sigint-in-write":
        sigint_in_write(arg)
        code = bench_run.main(rest)
    else:
        raise SystemExit(f"unknown fault {what!r}")
    exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
