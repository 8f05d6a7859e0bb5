"""`fedeq-bench COMMAND ...` (the console script) and `python -m bench COMMAND ...`.

    fedeq-bench run --methods fedeq,fedrep     # = python -m bench.run --methods fedeq,fedrep
    fedeq-bench data describe --dataset fmnist
    fedeq-bench perf
    fedeq-bench sweep --method fedeq --trials 40
    fedeq-bench report --experiment fedeq-bench
"""
from __future__ import annotations

import importlib
import sys

from bench.quick_exit import exit_now

COMMANDS = {
    "run": "compare methods on a task, recorded in MLflow",
    "data": "look at a federated dataset (describe)",
    "perf": "the harness's round time next to a plain PyTorch loop",
    "sweep": "tune a method's hyperparameters with Optuna (validation objective)",
    "report": "HTML and Markdown comparison report from the runs in MLflow",
}
MODULES = {"report": "report.__main__", "perf": "perf.__main__"}
"""Commands whose main is not in bench/<command>.py (a package's is in its __main__.py)."""


def main(argv: list[str] | None = None) -> int:
    """The command named first, with the rest of argv; its main runs its own guard (bench/cli.py
    `run_guarded`), and this one covers the help and the unknown command around it."""
    from bench import cli

    argv = sys.argv[1:] if argv is None else list(argv)

    def dispatch() -> int:
        if not argv or argv[0] in ("-h", "--help"):
            print(__doc__.strip().splitlines()[0])
            print("\ncommands:\n" + "\n".join(f"  {k:<6} {v}" for k, v in COMMANDS.items()))
            return 0 if argv else cli.EXIT_BAD_INPUT
        cmd, rest = argv[0], argv[1:]
        if cmd not in COMMANDS:
            cli.fail(f"unknown command {cmd!r}; choose from {', '.join(sorted(COMMANDS))}")
            return cli.EXIT_BAD_INPUT
        return importlib.import_module(f"bench.{MODULES.get(cmd, cmd)}").main(rest)

    return cli.run_guarded(dispatch)


if __name__ == "__main__":
    exit_now(main())
