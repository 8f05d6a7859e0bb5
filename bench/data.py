"""`python -m bench.data`: look at a federated dataset before running on it.

    python -m bench.data describe --dataset fmnist --partition shards:2 --clients 50
    python -m bench.data describe --dataset cifar10 --data-dir ~/data --plot labels.png

`describe` loads the dataset exactly as `python -m bench.run` does (same flags, same --config and
--set keys, same partition cache) and prints each client's split sizes and label histograms;
`--plot FILE.png` also saves a clients x classes heat map of the label distribution.
"""
from __future__ import annotations

from bench import cli, commands
from bench.quick_exit import exit_now
from fedeq_bench.core.errors import BenchError

# The run keys (bench/config.py RunConfig) that shape a dataset; their flags are generated from
# RunConfig, spelled and documented as in bench.run.
DATA_KEYS = ("dataset", "clients", "partition", "val_frac", "frac_unseen", "unseen_pick", "data_dir")


def build_parser() -> tuple[cli.Parser, list[str]]:
    from bench.config import RunConfig

    p = cli.Parser(prog=commands.runnable("python -m bench.data"), description=__doc__.strip().splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("describe", help="per-client sizes and label histograms (and a plot)",
                       description="Per-client split sizes and label histograms of a federated dataset.")
    keys = cli.add_config_flags(d, RunConfig, DATA_KEYS)
    d.add_argument("--seed", default="0", help="seed the partition is drawn with (default 0)")
    cli.add_preset_args(d, "any run or dataset key, e.g. fmnist.download=false (repeatable)")
    d.add_argument("--plot", default=None, metavar="FILE.png", help="also save the clients x classes label heat map")
    d.add_argument("--force", action="store_true",
                   help="replace a file at --plot that is not a figure matplotlib saved (never a device, pipe or link)")
    return p, keys


def resolve(argv: list[str] | None = None):
    """(Config, seed, args) from argv, validated as bench.run validates it (raises BenchError)."""
    from bench import config as C
    from bench.experiment import validate

    parser, keys = build_parser()
    args = parser.parse_args(argv)
    cfg = C.from_cli(args.config, cli.config_flags(args, keys), args.set)
    try:
        seed = int(args.seed)
    except ValueError:
        raise BenchError(f"--seed expects an integer, got {args.seed!r}") from None
    return validate(cfg), seed, args


def main(argv: list[str] | None = None) -> int:
    def work() -> int:
        cfg, seed, args = resolve(argv)
        from bench.experiment import describe_data

        if args.plot:  # a plot path that cannot be written is one line before the data is loaded
            from fedeq_bench.datasets.describe import check_output_path

            check_output_path(args.plot, args.force)

        print(describe_data(cfg, seed, args.plot, args.force))
        return 0

    return cli.run_guarded(work)


if __name__ == "__main__":
    exit_now(main())
