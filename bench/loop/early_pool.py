"""Starting the actor pool before the driver imports torch: `bench.run`'s one start-up overlap.

An actor's process imports torch (about a second of CPU) when it is created, and starting a local Ray
takes seconds more. Started from the command's flags alone, first thing, in a `cluster.Background`
thread, that work runs while the driver imports torch and MLflow, reads its config and loads the
data; `bench.experiment.compare` then adopts the pool if the resolved config asks for the same one
(`pool_keys`), or stops it and starts the right one.

What it buys, measured 2026-12-06 on a 2-core x86_64 VM (farm-bench, paired runs, median of 7; the
whole-process workload of `python -m bench.perf --whole`: FedAvg, mlp, 20 clients x 480 samples, 30
rounds, `--workers 2`): attached to a running `ray start --head`, 0.91x the wall time without it;
starting its own Ray, 0.97x; on `make run` (about 100 s) under 2%. The attached case, the one
docs/performance.md recommends, passes this project's bar for start-up tricks (5% of one of the two
workloads), so it stays; tests/integration/test_early_pool.py covers adopting and replacing.
"""
from __future__ import annotations

from bench.loop import cluster
from bench.loop.actor import pool_keys, start_pool_for
from fedeq_bench.core.errors import BenchError


def early_pool(config_files: list[str] | None, flags: dict, sets: list[str]):
    """`start_pool` in a `cluster.Background` from the flags alone, or None.

    Only when no --config or --set is given (either could change the pool's keys, and reading them
    right needs every method's config, which imports torch) and the flags ask for Ray. The flags'
    values are checked by the same code as the config's; anything it refuses leaves the config's own
    resolution to say so. The Background's `keys` say what its pool is made from.
    """
    if config_files or sets:
        return None
    from bench import config as C

    try:
        run = C.apply(C.Config(run=C.RunConfig(**C.env_defaults())),
                      {k: v for k, v in flags.items() if v is not None}).run
    except (BenchError, KeyError, TypeError, ValueError):
        return None
    if run.backend != "ray":
        return None
    started = cluster.Background(lambda: start_pool_for(run), name="ray-start")
    started.keys = pool_keys(run)
    return started
