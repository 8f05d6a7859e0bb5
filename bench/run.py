"""`python -m bench.run`: compare methods on a task; record everything in MLflow.

    python -m bench.run --methods fedeq,fedrep
    python -m bench.run --methods all --dataset npz:my_split.npz --seeds 0,1,2 --set fedrep.head_epochs=5
"""
from __future__ import annotations

import sys

from fedeq_bench.bench import cli
from fedeq_bench.core.errors import BenchError

# CLI flag -> run key. Flags default to None so only what the user typed overrides a preset.
FLAGS = {
    "methods": ("comma list of methods, or 'all'", str),
    "dataset": ("synthetic, fmnist, cifar10, cifar100, shakespeare[:PATH], femnist[:DIR], or npz:PATH", str),
    "model": ("one model for every method (default: the dataset's pairing)", str),
    "rounds": ("communication rounds", str),
    "clients": ("number of clients (default: the dataset's)", str),
    "fraction": ("fraction of clients sampled per round", str),
    "local_epochs": ("local epochs per round", str),
    "batch_size": ("local mini-batch size", str),
    "lr": ("local learning rate", str),
    "seeds": ("comma list of seeds", str),
    "partition": ("dirichlet:ALPHA, shards:K or natural (default: the dataset's)", str),
    "frac_unseen": ("fraction of clients held out of training (acc/unseen)", str),
    "data_dir": ("directory searched first for dataset files", str),
    "eval_every": ("evaluate every N rounds (and always the last)", str),
    "backend": ("ray (default) or serial", str),
    "workers": ("Ray actors (default: what the machine or cluster fits)", str),
    "address": ("Ray cluster address, e.g. auto (default: start a local Ray)", str),
    "cpus_per_client": ("CPUs per actor, fractions allowed", str),
    "gpus_per_client": ("GPUs per actor, fractions allowed", str),
    "device": ("cpu or cuda (default: cuda when Ray gives the actor a GPU)", str),
    "experiment": ("MLflow experiment name", str),
    "tracking_uri": ("MLflow tracking URI (default sqlite:///mlflow.db)", str),
    "run_name": ("name of the parent MLflow run", str),
}


def build_parser() -> cli.Parser:
    p = cli.Parser(prog="python -m bench.run", description=__doc__.strip().splitlines()[0])
    for key, (help_, _) in FLAGS.items():
        p.add_argument("--" + key.replace("_", "-"), dest=key, default=None, help=help_)
    p.add_argument("--config", default=None, help="preset TOML file (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any run, method or dataset key, e.g. fedrep.head_epochs=10 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def resolve_config(argv: list[str] | None = None):
    """Parse argv into a validated Config (no side effects; raises BenchError on bad input)."""
    from fedeq_bench.bench import config as C

    args = build_parser().parse_args(argv)
    cfg = validate(C.from_cli(args.config, {k: getattr(args, k) for k in FLAGS}, args.set))
    return cfg, args


def validate(cfg):
    """Check names and ranges; expand `all`. Returns the config with concrete methods."""
    import dataclasses

    from fedeq_bench.core.errors import unknown
    from fedeq_bench.datasets.base import DATASETS, split_dataset_name
    from fedeq_bench.methods import METHODS
    from fedeq_bench.methods.nets import MODELS

    run = cfg.run
    methods = run.methods
    if methods == ("all",):
        methods = tuple(METHODS.names())
    if not methods:
        raise BenchError(f"--methods is empty; choose from {', '.join(METHODS.names())} or all")
    for m in methods:
        if m not in METHODS:
            raise unknown("method", m, METHODS.names())
    if len(set(methods)) != len(methods):
        raise BenchError(f"--methods lists a method twice: {','.join(methods)}")
    name, _ = split_dataset_name(run.dataset)
    if name not in DATASETS:
        raise BenchError(f"unknown dataset {run.dataset!r}; choose from {', '.join(DATASETS.names())} or npz:PATH")
    models = [run.model] + [cfg.methods[m].model for m in methods]
    for mod in models:
        if mod and mod not in MODELS:
            raise unknown("model", mod, MODELS.names())
    checks = [
        (run.rounds >= 1, f"rounds must be >= 1, got {run.rounds}"),
        (0 < run.fraction <= 1, f"fraction must be in (0, 1], got {run.fraction}"),
        (run.clients is None or run.clients >= 1, f"clients must be >= 1, got {run.clients}"),
        (run.local_epochs >= 0, f"local_epochs must be >= 0, got {run.local_epochs}"),
        (run.batch_size >= 1, f"batch_size must be >= 1, got {run.batch_size}"),
        (run.lr > 0, f"lr must be > 0, got {run.lr}"),
        (run.eval_every >= 1, f"eval_every must be >= 1, got {run.eval_every}"),
        (len(run.seeds) >= 1, "seeds is empty; give e.g. --seeds 0,1,2"),
        (run.workers is None or run.workers >= 1, f"workers must be >= 1, got {run.workers}"),
        (run.cpus_per_client >= 0 and run.gpus_per_client >= 0, "cpus/gpus per client must be >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise BenchError(msg)
    if run.device == "cuda":
        import torch

        if not torch.cuda.is_available() and run.address is None:
            raise BenchError("--device cuda but this machine has no CUDA device (torch.cuda.is_available() is False); "
                             "use --device cpu or install a CUDA build of torch (see README)")
    return dataclasses.replace(cfg, run=dataclasses.replace(run, methods=methods))


def load_dataset(cfg, seed: int):
    from fedeq_bench.datasets.base import DataArgs, get_dataset, split_dataset_name

    run = cfg.run
    name, _ = split_dataset_name(run.dataset)
    args = DataArgs(seed=seed, clients=run.clients, partition=run.partition, val_frac=run.val_frac,
                    frac_unseen=run.frac_unseen, data_dir=run.data_dir)
    return get_dataset(run.dataset, cfg.datasets[name], args)


def check_models(cfg, dataset) -> None:
    """Build each method's model once on the driver so a mismatch fails before anything is recorded."""
    from fedeq_bench.bench.config import resolve_method
    from fedeq_bench.methods.nets import build_model

    for m in cfg.run.methods:
        build_model(resolve_method(cfg, m, dataset.default_models).model, dataset.input_shape, dataset.num_classes)


def summarize(results) -> list[dict]:
    """One row per method: final metrics, mean and std over seeds."""
    import numpy as np

    rows = []
    for method in dict.fromkeys(r.method for r in results):
        rs = [r for r in results if r.method == method]

        def stat(f):
            v = np.array([f(r) for r in rs], dtype=np.float64)
            return float(v.mean()), float(v.std()) if len(v) > 1 else 0.0

        rows.append({
            "method": method,
            "model": rs[0].model,
            "seeds": len(rs),
            "acc/mean": stat(lambda r: r.final["acc/mean"]),
            "acc/weighted": stat(lambda r: r.final["acc/weighted"]),
            "acc/bottom10": stat(lambda r: r.final["acc/bottom10"]),
            "mb_up": stat(lambda r: r.ledger.total("up") / 1e6),
            "mb_down": stat(lambda r: r.ledger.total("down") / 1e6),
            "peak_train_mb": stat(lambda r: r.peak("mem/peak_train_bytes") / 1e6),
            "wall_s": stat(lambda r: r.wall_s),
        })
    return rows


def format_table(rows) -> str:
    def cell(v, fmt):
        m, s = v
        return f"{m:{fmt}}" + (f" ± {s:{fmt}}" if s else "")

    head = ["method", "model", "acc/mean", "acc/weighted", "acc/bottom10", "MB up", "MB down", "peak train MB", "wall s"]
    body = [[r["method"], r["model"], cell(r["acc/mean"], ".4f"), cell(r["acc/weighted"], ".4f"),
             cell(r["acc/bottom10"], ".4f"), cell(r["mb_up"], ".2f"), cell(r["mb_down"], ".2f"),
             cell(r["peak_train_mb"], ".3f"), cell(r["wall_s"], ".1f")] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def main(argv: list[str] | None = None) -> int:
    cli.sigterm_as_interrupt()
    tracker = parent = None
    try:
        cfg, args = resolve_config(argv)
        run = cfg.run
        from fedeq_bench.bench import config as C
        from fedeq_bench.bench.backends import make_backend
        from fedeq_bench.bench.tracking import Tracker, git_commit

        datasets = {}
        for seed in run.seeds:  # load (and check) all data before anything is recorded
            datasets[seed] = load_dataset(cfg, seed)
            check_models(cfg, datasets[seed])
        backend = make_backend(run)  # a bad --address or resource request fails before anything is recorded
        try:
            tracker = Tracker(run.tracking_uri, run.experiment)
            name = run.run_name or f"{'+'.join(run.methods)} on {run.dataset}"
            params = C.flatten(cfg, list(run.methods), run.dataset.split(":")[0])
            params["git_commit"] = git_commit()
            params["command"] = "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv)
            parent = tracker.start(name, params, tags={"kind": "comparison"})
            results = []
            for seed in run.seeds:
                ds = datasets[seed]
                for method in run.methods:
                    results.append(run_one(cfg, tracker, parent, backend, method, seed, ds, args.quiet))
        finally:
            backend.close()
        rows = summarize(results)
        table = format_table(rows)
        tracker.log_text(parent, table + "\n", "summary.md")
        tracker.log_json(parent, rows, "summary.json")
        tracker.end(parent, "FINISHED")
        print(table)
        print(f"\nrecorded in {run.tracking_uri} (experiment {run.experiment!r}, parent run {parent}); "
              f"browse with: mlflow ui --backend-store-uri {run.tracking_uri}")
        return 0
    except BenchError as e:
        _end(tracker, parent, "FAILED")
        cli.fail(str(e))
        return cli.EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _end(tracker, parent, "KILLED")
        cli.fail("interrupted; runs so far are kept and marked KILLED")
        return cli.EXIT_INTERRUPTED
    except BaseException:
        _end(tracker, parent, "FAILED")
        raise


def _end(tracker, run_id, status):
    if tracker is not None and run_id is not None:
        try:
            tracker.end(run_id, status)
        except Exception:  # never mask the original error
            pass


def run_one(cfg, tracker, parent, backend, method, seed, dataset, quiet):
    """One child run: method x seed, logged round by round."""
    from fedeq_bench.bench import config as C
    from fedeq_bench.bench.engine import run_method

    model = C.resolve_method(cfg, method, dataset.default_models).model
    params = C.flatten(cfg, [method], None)
    params = {k: v for k, v in params.items() if k.startswith(f"{method}.")}
    params.update({
        "method": method, "seed": str(seed), "model": model, "dataset": cfg.run.dataset,
        "dataset_fingerprint": dataset.fingerprint, "partition": dataset.partition,
        "backend": backend.name, "workers": str(backend.workers),
    })
    child = tracker.start(f"{method} seed={seed}", params, tags={"method": method, "seed": str(seed)}, parent=parent)
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=cfg.run.rounds, desc=f"{method:>8} seed {seed}", unit="round", file=sys.stderr,
                   leave=True, dynamic_ncols=True)

    def on_round(rnd, metrics):
        tracker.log_metrics(child, rnd, metrics)
        if bar is not None:
            post = {"MB": f"{metrics['bytes/cumulative'] / 1e6:.2f}"}
            if "acc/mean" in metrics:
                post["acc"] = f"{metrics['acc/mean']:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)

    try:
        result = run_method(cfg, method, seed, dataset, backend, on_round)
    except KeyboardInterrupt:
        tracker.end(child, "KILLED")
        raise
    except BaseException:
        tracker.end(child, "FAILED")
        raise
    finally:
        if bar is not None:
            bar.close()
    tracker.log_params(child, {"params/shared": str(result.params_shared),
                               "params/personal": str(result.params_personal)})
    tracker.log_text(child, ledger_csv(result.ledger), "ledger.csv")
    tracker.end(child, "FINISHED")
    return result


def ledger_csv(ledger) -> str:
    lines = ["round,client,direction,bytes,keys"]
    lines += [f"{r},{c},{d},{n},{' '.join(k)}" for r, c, d, n, k in ledger.entries]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
