"""`python -m bench.report`: a comparison report (HTML and Markdown) from the runs in MLflow.

    python -m bench.report --experiment fedeq-bench                  # every bench.run comparison there
    python -m bench.report --experiment fedeq-bench --runs ID1,ID2   # only these parent runs
    python -m bench.report --sweep fedeq-synthetic                   # a study's trials (bench.sweep)

Writes reports/<name>/index.html (one self-contained page) and reports/<name>/report.md with its
figures beside it. The work is bench/report/__init__.py's `build`.
"""
from __future__ import annotations

import sys

from bench import cli, commands
from bench.quick_exit import exit_now

PROG = "python -m bench.report"


def build_parser() -> cli.Parser:
    from bench import config as C

    env = C.env_defaults()
    uri = env.get("tracking_uri", C.RunConfig.tracking_uri)
    experiment = env.get("experiment", C.RunConfig.experiment)
    p = cli.Parser(prog=commands.runnable(PROG), description=__doc__.strip().splitlines()[0])
    p.add_argument("--experiment", default=experiment,
                   help=f"MLflow experiment (default: {experiment}, from $MLFLOW_EXPERIMENT_NAME when set)")
    p.add_argument("--runs", default=None, metavar="ID,...",
                   help="only these parent runs (ids of bench.run invocations; default: every comparison)")
    p.add_argument("--sweep", default=None, metavar="STUDY", help="report a bench.sweep study instead")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: reports/<experiment or study>)")
    p.add_argument("--force", action="store_true",
                   help="replace files in --out that no report wrote (never a folder, device, pipe or link)")
    p.add_argument("--tracking-uri", default=uri,
                   help=f"MLflow tracking store (default: {uri}, from $MLFLOW_TRACKING_URI when set)")
    p.add_argument("--target", type=float, default=0.95,
                   help="MB-to-target column: this fraction of the best method's mean last-k acc/weighted "
                        "(default: 0.95)")
    p.add_argument("--last-k", type=int, default=None, metavar="K",
                   help="headline accuracy: the mean acc/weighted of the last K evaluated rounds (default: a tenth "
                        "of the evaluated rounds, at least 1)")
    p.add_argument("--shared-plotly", action="store_true",
                   help="index.html loads plotly.js from ../plotly.min.js, written there once for all the report "
                        "folders beside this one (default: inside each page)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def work() -> int:
        from bench import report

        args = build_parser().parse_args(argv)
        runs = [r.strip() for r in args.runs.split(",") if r.strip()] if args.runs else None
        paths = report.build(args.tracking_uri, args.experiment, runs=runs, out=args.out, sweep=args.sweep,
                             target=args.target, last_k=args.last_k, force=args.force,
                             shared_plotly=args.shared_plotly)
        print(f"report: {paths.html}")
        print(f"markdown: {paths.markdown}")
        return 0

    return cli.run_guarded(work)


if __name__ == "__main__":
    exit_now(main())
