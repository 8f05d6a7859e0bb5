"""`python -m bench.data`: look at a federated dataset before running on it.

    python -m bench.data describe --dataset fmnist --partition shards:2 --clients 50
    python -m bench.data describe --dataset cifar10 --data-dir ~/data --plot labels.png

`describe` loads the dataset exactly as `python -m bench.run` does (same flags, same --config and
--set keys, same partition cache) and prints each client's split sizes and label histograms;
`--plot FILE.png` also saves a clients x classes heat map of the label distribution.
"""
from __future__ import annotations

import sys

from fedeq_bench.bench import cli
from fedeq_bench.core.errors import BenchError

# CLI flag -> run key (bench/config.py RunConfig), spelled as in bench/run.py.
FLAGS = {
    "dataset": "dataset name, or npz:PATH",
    "clients": "number of clients (default: the dataset's)",
    "partition": "dirichlet:ALPHA, shards:K or natural (default: the dataset's)",
    "frac_unseen": "fraction of clients held out of training (marked * in the table)",
    "data_dir": "directory searched first for dataset files",
}


def build_parser() -> cli.Parser:
    p = cli.Parser(prog="python -m bench.data", description=__doc__.strip().splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("describe", help="per-client sizes and label histograms (and a plot)",
                       description="Per-client split sizes and label histograms of a federated dataset.")
    for key, help_ in FLAGS.items():
        d.add_argument("--" + key.replace("_", "-"), dest=key, default=None, help=help_)
    d.add_argument("--seed", default="0", help="seed the partition is drawn with (default 0)")
    d.add_argument("--config", default=None, help="preset TOML file (see configs/)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any run or dataset key, e.g. fmnist.download=false (repeatable)")
    d.add_argument("--plot", default=None, metavar="FILE.png", help="also save the clients x classes label heat map")
    return p


def resolve(argv: list[str] | None = None):
    """(Config, seed, args) from argv, validated as bench.run validates it (raises BenchError)."""
    from fedeq_bench.bench import config as C
    from fedeq_bench.bench.run import validate

    args = build_parser().parse_args(argv)
    cfg = C.from_cli(args.config, {k: getattr(args, k) for k in FLAGS}, args.set)
    try:
        seed = int(args.seed)
    except ValueError:
        raise BenchError(f"--seed expects an integer, got {args.seed!r}") from None
    return validate(cfg), seed, args


def main(argv: list[str] | None = None) -> int:
    cli.sigterm_as_interrupt()
    try:
        cfg, seed, args = resolve(argv)
        from fedeq_bench.bench.run import load_dataset
        from fedeq_bench.datasets.describe import describe, plot_label_distribution

        ds = load_dataset(cfg, seed)
        print(describe(ds))
        if args.plot:
            try:
                path = plot_label_distribution(ds, args.plot)
            except (OSError, ValueError) as e:  # unwritable path, unknown image format
                raise BenchError(f"cannot save the plot to {args.plot!r}: {e}") from None
            print(f"\nlabel distribution plot saved to {path}")
        return 0
    except BenchError as e:
        cli.fail(str(e))
        return cli.EXIT_BAD_INPUT
    except KeyboardInterrupt:
        cli.fail("interrupted")
        return cli.EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
