"""`python -m bench.sweep`: tune a method's hyperparameters with Optuna, scored on validation only.

    python -m bench.sweep --method fedeq --trials 40 --params rho,tol
    python -m bench.sweep --methods all --trials 20 --dataset fmnist    # every method, same budget
    python -m bench.sweep --method fedeq --objective acc,bytes --trials 60   # Pareto front (NSGA-II)
    python -m bench.sweep --method fedeq --trials 20 --n-jobs 2         # two trials at once on Ray
    .venv/bin/optuna-dashboard sqlite:///optuna.db                     # watch it live

Every RunConfig flag of bench.run works here too (--config, --set as well). One Optuna study per
method, resumed by the same command; each trial is an MLflow child run of the study's parent run.
The best values go to configs/tuned/<dataset>.toml (`bench.run --config` loads it). The work is
bench/tuning/study.py's `sweep`.
"""
from __future__ import annotations

import shlex
import sys

from bench import cli, commands
from bench.quick_exit import exit_now
from fedeq_bench.core.errors import BenchError

PROG = "python -m bench.sweep"


def build_parser() -> tuple[cli.Parser, list[str]]:
    from bench.config import RunConfig
    from bench.tuning.storage import PRUNERS

    p = cli.Parser(prog=commands.runnable(PROG), description=__doc__.strip().splitlines()[0], epilog=cli.registered)
    p.add_argument("--method", default=None, help="the method to tune (or --methods a,b,c / all: one study each)")
    p.add_argument("--trials", type=int, required=True, help="trials per study (a resumed study runs the missing ones)")
    p.add_argument("--params", default=None, help="sweep only these keys of the space, e.g. rho,tol")
    p.add_argument("--space", default=None, help="search-space TOML (default: configs/sweeps/<method>.toml)")
    p.add_argument("--objective", default="acc",
                   help="acc (TPE), or acc with any of bytes, memory, time (simulated seconds on --devices), e.g. "
                        "acc,bytes: NSGA-II and a Pareto front (default: acc)")
    p.add_argument("--pruner", default=None,
                   help=f"{'|'.join(PRUNERS)} (default: median; none for several objectives)")
    p.add_argument("--n-jobs", type=int, default=1,
                   help="trials at once, each on its own share of the Ray actors (default: 1)")
    p.add_argument("--storage", default="sqlite:///optuna.db", help="Optuna RDB storage URL (default: sqlite:///optuna.db)")
    p.add_argument("--study-name", default=None, help="study name (default: METHOD-DATASET; NAME-METHOD with several)")
    p.add_argument("--sampler-seed", type=int, default=None, help="TPE sampler seed (default: the first --seeds)")
    p.add_argument("--tuned-out", default=None, help="tuned preset path (default: configs/tuned/DATASET.toml)")
    p.add_argument("--force", action="store_true",
                   help="replace a file at --tuned-out that is not a tuned preset (never a folder, device or link)")
    p.add_argument("--no-final-test", dest="final_test", action="store_false",
                   help="do not rerun the best trial on the test split")
    keys = cli.add_config_flags(p, RunConfig, defaults_shown={  # leaving both out is an error (`resolve`)
        "methods": "no default: give --method NAME or --methods a,b,c (or all); with --config, the preset's "
                   f"methods, else {','.join(RunConfig.methods)}"})
    cli.add_preset_args(p, "any run, method or dataset key, fixed for every trial (repeatable)")
    p.add_argument("--quiet", action="store_true", help="less Optuna logging")
    return p, keys


def resolve(argv: list[str]):
    """Parse argv into (validated Config, SweepOptions, args); raises BenchError on bad input."""
    from bench import config as C
    from bench.experiment import validate
    from bench.tuning.objectives import parse_objectives
    from bench.tuning.study import SweepOptions

    parser, keys = build_parser()
    args = parser.parse_args(argv)
    flags = cli.config_flags(args, keys)
    if args.method is not None:
        if flags["methods"] is not None:
            raise BenchError("give --method NAME or --methods a,b,c, not both")
        flags["methods"] = args.method
    elif flags["methods"] is None and args.config is None:
        raise BenchError("which method? give --method NAME, or --methods a,b,c (or all)")
    cfg = validate(C.from_cli(args.config, flags, args.set))
    params = tuple(p.strip() for p in args.params.split(",") if p.strip()) if args.params else None
    opts = SweepOptions(trials=args.trials, params=params, space=args.space, pruner=args.pruner,
                        storage=args.storage, study_name=args.study_name, sampler_seed=args.sampler_seed,
                        final_test=args.final_test, tuned_out=args.tuned_out, force=args.force,
                        objectives=parse_objectives(args.objective), n_jobs=args.n_jobs,
                        configs=tuple(args.config or ()))
    return cfg, opts, args


def dashboard(storage: str) -> str:
    """How to watch the study: optuna-dashboard by path (bench/commands.py's `program`), or how to get it."""
    exe = commands.program("optuna-dashboard", distribution="optuna-dashboard")
    if exe is None:
        return f"watch it with optuna-dashboard, which is not installed: {commands.python()} -m pip install optuna-dashboard"
    return f"watch: {exe} {shlex.quote(storage)}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def work() -> int:
        cfg, opts, args = resolve(argv)
        from bench import experiment
        from bench.tuning import presets, study

        outcomes, tuned = study.sweep(cfg, opts, command=shlex.join([*PROG.split(), *argv]), quiet=args.quiet)
        print(study.format_outcomes(outcomes))
        if tuned:
            print(f"\nbest values written to {tuned} (rerun on test: "
                  f"{commands.runnable('python -m bench.run')} {presets.rerun_configs(tuned, opts.configs)})")
        print(experiment.recorded_line(cfg, outcomes[-1].parent_run_id) if outcomes else "")
        print(f"Optuna storage: {opts.storage} ({dashboard(opts.storage)})")
        return 0

    return cli.run_guarded(work, "interrupted; finished trials are kept, and the same command resumes the study: "
                                 + commands.runnable(shlex.join([*PROG.split(), *argv])))


if __name__ == "__main__":
    exit_now(main())
