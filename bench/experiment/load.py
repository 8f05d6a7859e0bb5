"""Check a config and load its data: everything bad a run's input can be is found here, before a
backend starts or anything is recorded (docs/reliability.md)."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from fedeq_bench.core.errors import BenchError

if TYPE_CHECKING:
    from bench.loop.backends import Backend


def validate(cfg):
    """Check names and ranges; expand `all`. Returns the config with concrete methods."""
    from bench.config import check_config
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
    # Ranges (finite floats, ints, bounds) are declared with each field; one rule checks them all.
    check_config(cfg)
    if not run.seeds:
        raise BenchError("seeds is empty; give e.g. --seeds 0,1,2")
    if len(set(run.seeds)) != len(run.seeds):  # a seed twice is one run counted twice: a std of 0 that means nothing
        raise BenchError(f"--seeds lists a seed twice: {','.join(map(str, run.seeds))}; give distinct seeds")
    if not run.experiment.strip():
        raise BenchError(f"--experiment {run.experiment!r} is empty; give a name (the default is fedeq-bench)")
    from bench.loop import devices

    devices.load(run.devices)  # the profile set's name, or its file's form and values
    if run.backend == "ray":  # --address and $RAY_ADDRESS: their form, and that a Ray answers there
        from bench.loop.addresses import target

        target(run.address)
    if run.device == "cuda":
        import torch

        if not torch.cuda.is_available() and run.address is None:
            raise BenchError("--device cuda but this machine has no CUDA device (torch.cuda.is_available() is False); "
                             "use --device cpu or install a CUDA build of torch (see README)")
    return dataclasses.replace(cfg, run=dataclasses.replace(run, methods=methods))


def load_dataset(cfg, seed: int, sized: bool = False):
    """The federated dataset of `cfg.run` at `seed` (the seed draws the partition and held-out clients).

    Refused with one line, before anything is generated or read, when the dataset's own size
    estimate exceeds the memory available (bench/experiment/sizing.py; `sized`: the caller has estimated it
    already, as `load_checked` does for every seed at once); `get_dataset` checks what the loader
    returns (labels, lengths, empty clients, finite features: datasets/base.py `check_dataset`)."""
    from bench.experiment import sizing
    from fedeq_bench.datasets.base import DataArgs, get_dataset, split_dataset_name

    run = cfg.run
    name, _ = split_dataset_name(run.dataset)
    if not sized:
        sizing.check_before_load(cfg, seeds=[seed], whole_run=False)
    args = DataArgs(seed=seed, clients=run.clients, partition=run.partition, val_frac=run.val_frac,
                    frac_unseen=run.frac_unseen, unseen_pick=run.unseen_pick, data_dir=run.data_dir)
    return get_dataset(run.dataset, cfg.datasets[name], args)


def check_models(cfg, dataset) -> None:
    """Build each method's model on the driver and run two real training samples through it
    (`nets.probe`), so a model that cannot take this data fails before anything is recorded."""
    import torch

    from bench.config import resolve_method
    from fedeq_bench.methods.nets import probe

    first = next(c for c in dataset.clients if len(c.train_y))
    x = torch.from_numpy(first.train_x[:2].copy())  # as a worker hands it to the model (datasets stay read-only)
    for model in dict.fromkeys(resolve_method(cfg, m, dataset.default_models).model for m in cfg.run.methods):
        probe(model, dataset.input_shape, dataset.num_classes, x)


def load_checked(cfg) -> dict:
    """`{seed: dataset}` for every seed, each checked against every method's model: all the bad
    input a run can meet in its data shows up here, before a backend starts or a run is recorded. So
    does a run too big for the memory of the machine running it (bench/experiment/sizing.py):
    estimated before any data is made (every seed's data, Ray's copy of it, the client states the
    methods keep), and again once it is loaded."""
    from bench.experiment import sizing

    sizing.check_before_load(cfg)  # every seed's data, more than each load_dataset would count
    datasets = {seed: load_dataset(cfg, seed, sized=True) for seed in cfg.run.seeds}
    sizing.check_after_load(cfg, datasets)  # before check_models builds a model that may not fit
    for ds in datasets.values():
        check_models(cfg, ds)
    return datasets


def describe_data(cfg, seed: int, plot: str | None = None, force: bool = False) -> str:
    """`bench.data describe`: per-client sizes and label histograms, and the heat map saved to `plot`
    (`force`: over a file there that is not a figure matplotlib saved)."""
    from fedeq_bench.datasets.describe import describe, plot_label_distribution

    ds = load_dataset(cfg, seed)
    text = describe(ds)
    if plot:
        try:
            path = plot_label_distribution(ds, plot, force)
        except (OSError, ValueError) as e:  # unwritable path, unknown image format
            raise BenchError(f"cannot save the plot to {plot!r}: {e}") from None
        text += f"\n\nlabel distribution plot saved to {path}"
    return text


def make_backend(run) -> Backend:
    """The backend for a RunConfig: Serial in this process, or Ray actors over a pool started now."""
    from bench.loop import cluster
    from bench.loop.backends import SerialBackend

    if run.backend == "serial":
        import torch

        device = run.device or ("cuda" if run.gpus_per_client > 0 and torch.cuda.is_available() else "cpu")
        return SerialBackend(cluster.threads_per_actor(run.cpus_per_client), device)
    from bench.loop.actor import start_pool_for
    from bench.loop.ray_backend import RayBackend

    return RayBackend(pool=start_pool_for(run))
