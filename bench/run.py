"""`python -m bench.run`: compare methods on a task; record everything in MLflow.

    python -m bench.run --methods fedeq,fedrep
    python -m bench.run --methods all --dataset npz:my_split.npz --seeds 0,1,2 --set fedrep.head_epochs=5
    python -m bench.run --resume PARENT_RUN_ID     # continue an interrupted invocation

Every flag is a run key of bench/config.py's RunConfig (its help is the field's docstring); --set
reaches any run, method or dataset key. Precedence: defaults < environment (MLFLOW_TRACKING_URI,
MLFLOW_EXPERIMENT_NAME) < --config FILE < flags < --set. The work is bench/experiment/'s `compare`.

--resume takes the config recorded on the parent run (its params), so it combines only with flags
that do not change results (experiment.RESUME_KEYS: --tracking-uri to find the run, --backend,
--workers, --address, --state-budget-gb, --checkpoint-every) and --quiet, --report-dir, --no-report.
"""
from __future__ import annotations

import shlex
import sys
import typing

from bench import cli, commands
from bench.loop.actor import Pool
from bench.loop.early_pool import early_pool
from bench.quick_exit import exit_now
from fedeq_bench.core.errors import BenchError, Diverged

if typing.TYPE_CHECKING:
    from bench.experiment import Progress

PROG = "python -m bench.run"


def build_parser() -> tuple[cli.Parser, list[str]]:
    """The parser, and the run keys it has flags for (every RunConfig field)."""
    from bench.config import RunConfig

    p = cli.Parser(prog=commands.runnable(PROG), description=__doc__.strip().splitlines()[0],
                   epilog=lambda: cli.registered() + " Precedence: defaults < MLFLOW_TRACKING_URI, "
                                                     "MLFLOW_EXPERIMENT_NAME < --config < flags < --set.")
    keys = cli.add_config_flags(p, RunConfig)
    cli.add_preset_args(p, "any run, method or dataset key, e.g. fedrep.head_epochs=10 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--report-dir", default="reports",
                   help="where the comparison report goes: DIR/<experiment>-<parent run id>/ (default: reports)")
    p.add_argument("--no-report", dest="report", action="store_false", help="do not build the report")
    p.add_argument("--resume", metavar="PARENT_RUN_ID", default=None,
                   help="continue an interrupted invocation (its parent run id): the same MLflow runs, the config "
                        "recorded on it, finished method x seed pairs kept, the others continued from their last "
                        "checkpoint (--checkpoint-every)")
    return p, keys


def resolve_config(argv: list[str] | None = None):
    """Parse argv into a validated Config (no side effects; raises BenchError on bad input)."""
    from bench import config as C
    from bench.experiment import validate

    parser, keys = build_parser()
    args = parser.parse_args(argv)
    return validate(C.from_cli(args.config, cli.config_flags(args, keys), args.set)), args


def resume_config(argv: list[str]):
    """`--resume PARENT`: the config recorded on that parent run, with the few flags allowed beside it
    (raises BenchError, one line, for anything else or a run that cannot be resumed)."""
    from bench import config as C
    from bench.experiment import recorded_config

    parser, keys = build_parser()
    args = parser.parse_args(argv)
    typed = {k: v for k, v in cli.config_flags(args, keys).items() if v is not None}
    if args.config or args.set:
        raise BenchError(f"--resume continues run {args.resume} with the config recorded on it; "
                         f"{'--config' if args.config else '--set'} would change its results")
    uri = typed.pop("tracking_uri", None) or C.default_config().run.tracking_uri
    return recorded_config(uri, args.resume, typed), args


def main(argv: list[str] | None = None, on_round=None) -> int:
    """The command; `on_round(method, seed, round, metrics)` is `experiment.compare`'s (tests use it to
    inject a fault at a known round of a real command)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = commands.runnable(shlex.join([*PROG.split(), *argv]))  # this invocation, as it runs here
    progress: Progress | None = None  # once the work has got that far
    resuming: str | None = None

    def interrupted() -> str:
        """What the interrupt left (which runs are KILLED, which stay FINISHED) and how to go on."""
        if progress is not None and progress.parent is not None:
            return progress.interrupted()
        if resuming is not None:
            return f"interrupted before run {resuming} was reopened (it is as it was); continue with: {command}"
        return f"interrupted before anything was recorded; start again with: {command}"

    def work() -> int:
        nonlocal progress, resuming
        parser, keys = build_parser()
        first = parser.parse_args(argv)
        resuming = first.resume
        # Ray and its actors start now, from the flags, while torch, the config and the data load
        # (bench/loop/early_pool.py); compare adopts the pool or stops it.
        early = None if resuming is not None else early_pool(first.config, cli.config_flags(first, keys), first.set)
        try:
            cfg, args = resume_config(argv) if resuming is not None else resolve_config(argv)
            if args.report:  # before the run, not after it: a file named like the folder is one line now
                from fedeq_bench.core.files import require_output_dir
                require_output_dir(args.report_dir, "--report-dir")
            from bench import experiment

            if early is not None:  # said at once, not after the early Ray has started and stopped
                from bench.tracking import check_store

                check_store(cfg.run.tracking_uri)
        except BaseException as e:
            if early is None:
                raise
            if isinstance(e, BenchError):  # said now; the exit waits for the Ray started early to stop
                cli.fail(str(e))
            with cli.deferred_signals():  # a second Ctrl-C must not leave the starting Ray behind
                early.discard(Pool.close)
            if isinstance(e, BenchError):
                return cli.EXIT_BAD_INPUT
            raise
        flags = ((["--quiet"] if args.quiet else []) + ([] if args.report else ["--no-report"])
                 + (["--report-dir", args.report_dir] if args.report and args.report_dir != "reports" else []))
        progress = experiment.Progress(command=command, resume_flags=tuple(flags))
        try:
            rows, parent = experiment.compare(cfg, command=shlex.join([*PROG.split(), *argv]), quiet=args.quiet,
                                              resume=args.resume, early=early, on_round=on_round, progress=progress)
        except Diverged as e:  # say how to record it and run the rest (the runs so far are kept)
            if progress.parent is None or not progress.resume:
                raise
            raise Diverged(f"{e}; to record it as diverged and run the rest: {progress.resume} --keep-going") from None
        print(experiment.format_table(rows, progress.diverged))
        print("\n" + experiment.recorded_line(cfg, parent))
        if args.report:
            progress.report = experiment.report_command(cfg, parent, args.report_dir)
            paths = experiment.report(cfg, parent, args.report_dir)
            print(f"report: {paths.html} (also {paths.markdown}, and in MLflow under the parent run's report/)")
        return 0

    return cli.run_guarded(work, interrupted)


if __name__ == "__main__":
    exit_now(main())
