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

`python -m bench.perf --scale`: round time and memory of FedAvg and FeDEQ at 100, 1,000 and 10,000
clients, a fixed cohort per round and a sampled evaluation (bench/perf/scale.py says what each column is).
"""
from __future__ import annotations

import sys

from bench import cli


def main(argv=None) -> int:
    p = cli.Parser(prog=cli.runnable("python -m bench.perf"), description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="rounds per measurement (default 30; --scale: 6)")
    p.add_argument("--warmup", type=int, default=5, help="first rounds left out of the median (default 5)")
    p.add_argument("--lr", type=float, default=0.05, help="local learning rate (default 0.05)")
    p.add_argument("--batch-size", type=int, default=32, help="local mini-batch size (default 32)")
    p.add_argument("--workers", default="1,2", help="comma list of Ray worker counts to measure")
    p.add_argument("--method", choices=("fedavg", "fedeq"), default="fedavg",
                   help="fedavg: the harness-overhead table (default); fedeq: seconds per FeDEQ local update")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed repeats per row, the median shown (--method fedeq: updates; --whole: processes)")
    p.add_argument("--whole", action="store_true",
                   help="also time whole processes (plain script, bench.run serial and Ray, Ray attached to a "
                        "running `ray start --head`), start to exit")
    p.add_argument("--scale", action="store_true",
                   help="round time and memory against the number of clients (bench/perf/scale.py)")
    p.add_argument("--clients", default="100,1000,10000", help="--scale: comma list of federation sizes")
    p.add_argument("--cohort", type=int, default=10, help="--scale: clients trained per round (default 10)")
    p.add_argument("--eval-clients", type=int, default=20, help="--scale: clients per sampled evaluation (default 20)")
    p.add_argument("--state-budget-gb", type=float, default=None, help="--scale: client-state memory budget")
    args = p.parse_args(argv)
    if args.scale:
        from bench.perf import scale

        try:
            sizes = tuple(int(x) for x in args.clients.split(",") if x)
        except ValueError:
            p.error(f"--clients expects a comma list of integers, got {args.clients!r}")
        print(scale.scale_table(sizes, rounds=args.rounds or scale.ROUNDS, cohort=args.cohort,
                                eval_clients=args.eval_clients, state_budget_gb=args.state_budget_gb))
        return 0
    args.rounds = 30 if args.rounds is None else args.rounds
    if args.method == "fedeq":
        from bench.perf.workloads import fedeq_update_table

        print(fedeq_update_table(repeats=args.repeats))
        return 0
    try:
        workers = tuple(int(x) for x in args.workers.split(",") if x)
    except ValueError:
        p.error(f"--workers expects a comma list of integers, got {args.workers!r}")
    if args.warmup >= args.rounds - 1:
        p.error(f"--warmup {args.warmup} leaves no steady-state round of --rounds {args.rounds}")
    from bench.perf.workloads import overhead_table

    try:
        print(overhead_table(args.rounds, args.warmup, args.lr, args.batch_size, workers))
        if args.whole:
            from bench.perf.workloads import whole_process_table

            print()
            print(whole_process_table(args.rounds, args.lr, args.batch_size, workers, repeats=args.repeats))
    except KeyboardInterrupt:
        cli.fail("interrupted")
        return cli.EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
