"""`python -m bench.perf`: the harness's steady-state round time next to a plain PyTorch loop.

The workload, and what the ratio measures, is described in bench/perf/workloads.py. Targets: 1 worker
within 1.3x of the plain loop; 2 workers on 2 cores faster than it.

`python -m bench.perf --whole`: also the whole-process table (bench/perf/workloads.py, whole_process_table):
each command timed from process start to exit, imports, Ray's start and MLflow's store included, next
to the plain loop as a script; Ray both starting its own instance and attached to a running
`ray start --head`. Targets: 1 worker within 1.5x of the plain loop, 2 workers below 1.2x.

`python -m bench.perf --method fedeq`: seconds per FeDEQ local update on deq_mlp and deq_resnet_s
(the reference's stopping rule and Anderson, and the earlier rel/torchdeq/no-cache form) next to a
FedRep update on the paired explicit model at equal epochs (bench/perf/workloads.py, fedeq_update_table).

`python -m bench.perf --adjoint`: the implicit backward's adjoint solvers (every registered b_solver, JFB,
phantom) on real Fashion-MNIST images: gradient cosine to an exact float64 solve, products, seconds and
peak memory of one SGD step (bench/perf/adjoint.py).

`python -m bench.perf --scale`: round time and memory of FedAvg and FeDEQ at 100, 1,000 and 10,000
clients, a fixed cohort per round and a sampled evaluation (bench/perf/scale.py says what each column is).

`python -m bench.perf --bytes-claim`: the FeDEQ paper's "up to 4 times" smaller communication, from each
paper preset's real encoded messages of round 1; `--memory-claim`: its "1.5 times" smaller training
memory, one metered local update per method on the paper's models and batch sizes, FeDEQ once per
adjoint solver in `--b-solvers` (bench/perf/claims.py says what each measures).
"""
from __future__ import annotations

from bench import cli, commands
from bench.quick_exit import exit_now
from fedeq_bench.core.ranges import Range

NUMBERS: dict[str, tuple[type, Range]] = {
    "rounds": (int, Range(ge=1)),
    "warmup": (int, Range(ge=0)),
    "lr": (float, Range(gt=0)),
    "batch_size": (int, Range(ge=1)),
    "workers": (tuple[int, ...], Range(ge=1)),
    "repeats": (int, Range(ge=1)),
    "steps": (int, Range(ge=1)),
    "clients": (tuple[int, ...], Range(ge=1)),
    "cohort": (int, Range(ge=1)),
    "eval_clients": (int, Range(ge=1)),
    "state_budget_gb": (float, Range(ge=0)),
}
"""Every numeric flag's type and valid range: typed and checked as bench.run's are (bench/config.py
`coerce`, core/ranges.py `check`), so a bad number is one line and exit 2 before anything runs."""


def typed_numbers(args) -> None:
    """Each flag of NUMBERS that was given (a string), typed and range-checked in place; a BenchError
    line, `--rounds must be an integer >= 1, got -1`, for the first that is not valid."""
    from bench.config import coerce
    from fedeq_bench.core.errors import BenchError
    from fedeq_bench.core.ranges import check

    for name, (tp, rng) in NUMBERS.items():
        value = getattr(args, name)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        typed = coerce(value, tp, flag)
        if typed == ():
            raise BenchError(f"{flag} expects a comma list of integers, got {value!r}")
        check(flag, typed, tp, rng)
        setattr(args, name, typed)


def main(argv=None) -> int:
    return cli.run_guarded(lambda: measure(argv))


def measure(argv=None) -> int:
    p = cli.Parser(prog=commands.runnable("python -m bench.perf"), description=__doc__.splitlines()[0])
    p.add_argument("--rounds", default=None, help="rounds per measurement (default 30; --scale: 6)")
    p.add_argument("--warmup", default="5", help="first rounds left out of the median (default 5)")
    p.add_argument("--lr", default="0.05", help="local learning rate (default 0.05)")
    p.add_argument("--batch-size", default="32", help="local mini-batch size (default 32)")
    p.add_argument("--workers", default="1,2", help="comma list of Ray worker counts to measure")
    p.add_argument("--method", choices=("fedavg", "fedeq"), default="fedavg",
                   help="fedavg: the harness-overhead table (default); fedeq: seconds per FeDEQ local update")
    p.add_argument("--repeats", default=None,
                   help="timed repeats per row, the median shown (--method fedeq: updates; --whole: processes; "
                        "--adjoint: steps); default 3, --adjoint 1")
    p.add_argument("--whole", action="store_true",
                   help="also time whole processes (plain script, bench.run serial and Ray, Ray attached to a "
                        "running `ray start --head`), start to exit")
    p.add_argument("--scale", action="store_true",
                   help="round time and memory against the number of clients (bench/perf/scale.py)")
    p.add_argument("--adjoint", action="store_true",
                   help="adjoint solvers side by side on real Fashion-MNIST images (bench/perf/adjoint.py)")
    p.add_argument("--models", default=None,
                   help="--adjoint: comma list of DEQ models, or `all` (default deq_mlp,deq_resnet_s,deq_resnet_s_ref)")
    p.add_argument("--steps", default="3", help="--adjoint: SGD steps before the second measurement (default 3)")
    p.add_argument("--clients", default="100,1000,10000", help="--scale: comma list of federation sizes")
    p.add_argument("--cohort", default="10", help="--scale: clients trained per round (default 10)")
    p.add_argument("--eval-clients", default="20", help="--scale: clients per sampled evaluation (default 20)")
    p.add_argument("--state-budget-gb", default=None, help="--scale: client-state memory budget")
    p.add_argument("--bytes-claim", action="store_true",
                   help="bytes per client of every paper preset's methods against FeDEQ's (bench/perf/claims.py)")
    p.add_argument("--memory-claim", action="store_true",
                   help="peak training memory of one local update per paper method and model (bench/perf/claims.py)")
    p.add_argument("--datasets", default=None,
                   help="--bytes-claim, --memory-claim: comma list of paper datasets (default: femnist,cifar10,"
                        "cifar100,shakespeare)")
    p.add_argument("--b-solvers", default=None,
                   help="--memory-claim: comma list of FeDEQ adjoint solvers, `preset` for each paper preset's own "
                        "(the reference's) (default: preset,gmres, the reference's and the harness's)")
    p.add_argument("--claim-methods", default=None,
                   help="--memory-claim: comma list of the presets' methods to meter (default: fedeq,fedavg,fedrep,"
                        "ditto,knnper)")
    args = p.parse_args(argv)
    typed_numbers(args)
    if args.adjoint:
        from bench.perf import adjoint

        models = adjoint.DEFAULT_MODELS if args.models is None else (
            adjoint.MODELS if args.models == "all" else tuple(m for m in args.models.split(",") if m))
        bad = [m for m in models if m not in adjoint.MODELS]
        if bad or not models:
            p.error(f"--models: unknown {', '.join(bad) or 'empty list'}; choose from {', '.join(adjoint.MODELS)} or all")
        repeats = 1 if args.repeats is None else args.repeats
        print(adjoint.adjoint_table(models, steps=args.steps, repeats=repeats))
        return 0
    if args.bytes_claim or args.memory_claim:
        return claims_main(p, args)
    if args.scale:
        from bench.perf import scale

        print(scale.scale_table(args.clients, rounds=args.rounds or scale.ROUNDS, cohort=args.cohort,
                                eval_clients=args.eval_clients, state_budget_gb=args.state_budget_gb))
        return 0
    args.rounds = 30 if args.rounds is None else args.rounds
    args.repeats = 3 if args.repeats is None else args.repeats
    if args.method == "fedeq":
        from bench.perf.workloads import fedeq_update_table

        print(fedeq_update_table(repeats=args.repeats))
        return 0
    workers = args.workers
    if args.warmup >= args.rounds - 1:
        p.error(f"--warmup {args.warmup} leaves no steady-state round of --rounds {args.rounds}")
    from bench.perf.workloads import overhead_table

    print(overhead_table(args.rounds, args.warmup, args.lr, args.batch_size, workers))
    if args.whole:
        from bench.perf.workloads import whole_process_table

        print()
        print(whole_process_table(args.rounds, args.lr, args.batch_size, workers, repeats=args.repeats))
    return 0


def claims_main(p: cli.Parser, args) -> int:
    """--bytes-claim and --memory-claim: every name checked before anything is measured (one line, exit 2)."""
    from bench.perf import claims
    from fedeq_bench.core.errors import BenchError

    def names(value, default):
        return default if value is None else tuple(x.strip() for x in value.split(",") if x.strip())

    try:
        datasets = names(args.datasets, tuple(claims.DATASETS))
        for d in datasets:
            claims.paper_config(d)
        b_solvers = claims.check_b_solvers(names(args.b_solvers, claims.DEFAULT_B_SOLVERS))
        methods = claims.check_methods(datasets, names(args.claim_methods, claims.MEMORY_METHODS))
        if args.bytes_claim:
            print(claims.bytes_table(datasets))
        if args.memory_claim:
            if args.bytes_claim:
                print()
            print(claims.memory_table(datasets, b_solvers, methods))
    except BenchError as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    exit_now(main())
