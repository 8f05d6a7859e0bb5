"""Will the run fit in memory? Estimate it before generating, reading or partitioning anything, and
refuse with one line when it cannot (a run the kernel kills at 24 GB leaves no message and, on a shared
machine, takes other jobs down with it).

What is counted, the terms that grow with the federation (the interpreter, torch and Ray's workers,
a few hundred MB, are not, so the check refuses only what cannot fit):

    data     every client's arrays (float32 x, int64 y) for every seed: `load_checked` holds all
             seeds' datasets at once. Before loading, a dataset's own `estimate` says it (synthetic:
             exact, from its sample counts; npz: from the archive's array headers); after loading,
             the arrays' nbytes.
    Ray      the Ray backend puts each dataset into the object store once (shared memory): one copy
             more of the data (not counted through Ray Client, `--address ray://...`, whose store is
             the cluster's).
    states   client states kept by the engine's client store (bench/loop/store.py): a client's state once
             it has trained, so min(training clients, rounds x cohort) + held-out clients, times the
             bytes one state holds (`state_bytes_per_client`), for the method keeping the most
             (methods run one after another); at most --state-budget-gb in memory, the rest on disk.
    model    MODEL_COPIES copies of that method's whole model (built on the meta device to size it).

The memory available is MemAvailable of /proc/meminfo (psutil's figure where psutil is installed),
capped by what this process's cgroup has left under its memory limit (a container, a batch slot);
where none of these exists the check is skipped.
"""
from __future__ import annotations

from fedeq_bench.core.errors import BenchError

GB = 10**9

SHARED_STATE_COPIES = {"fedeq": 2}
"""Copies of the model's SHARED part a client keeps, beyond its personal part (methods' docs):
FeDEQ keeps theta_i and the dual lambda_i, both shaped like the shared part, besides its head w_i.
Every other method keeps exactly its personal part (`param_split`'s second list): FedRep's head,
Ditto's v_i, APFL's v_i, FedAvg's nothing (tests/unit/test_sizing.py checks this against the states
the engine really keeps)."""


def available_bytes() -> int | None:
    """Memory the system can still give without swapping: psutil's `available`, else /proc/meminfo's
    MemAvailable, and no more than this process's cgroup (a container, a batch job's slot) has left
    under its limit; None where none of these can be read (the check is then skipped)."""
    system = None
    try:
        import psutil

        system = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        system = int(line.split()[1]) * 1024  # reported in kB (KiB)
        except (OSError, ValueError, IndexError):
            pass
    group = _cgroup_left()
    known = [v for v in (system, group) if v is not None]
    return min(known) if known else None


def _cgroup_left() -> int | None:
    """Bytes left under the memory limit of this process's cgroup (v2, else v1); None: no limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:  # v1 writes 2^63 - page for "none"
            return None
        return max(int(limit) - usage, 0)
    return None


def kept_states(run, n_clients: int) -> int:
    """Client states the store will hold by the end: every held-out client (personalized at each
    evaluation) and the training clients that trained, at most rounds x cohort (engine.cohort_at)."""
    n_unseen = int(round(run.frac_unseen * n_clients))
    n_train = max(n_clients - n_unseen, 0)
    cohort = max(1, int(round(run.fraction * n_train)))
    return min(n_train, run.rounds * cohort) + n_unseen


def state_bytes_per_client(cfg, method: str, default_models: dict[str, str], input_shape, num_classes: int) -> int:
    """Bytes one client's state holds for `method`: its personal part of the model, plus
    SHARED_STATE_COPIES shared parts. The model is built on torch's meta device: shapes, no memory."""
    return _method_bytes(cfg, method, default_models, input_shape, num_classes)[0]


def _method_bytes(cfg, method: str, default_models, input_shape, num_classes: int) -> tuple[int, int]:
    """(bytes of one client's state, bytes of the whole model) of `method` on this task."""
    import torch

    from bench.config import resolve_method
    from fedeq_bench.core import seeding
    from fedeq_bench.core.types import Task
    from fedeq_bench.methods import METHODS
    from fedeq_bench.methods.nets import build_model

    mcfg = resolve_method(cfg, method, default_models)
    shape, classes = tuple(int(d) for d in input_shape), int(num_classes)
    try:
        with seeding.GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]), torch.device("meta"):
            net = build_model(mcfg.model, shape, classes)
    except Exception:  # noqa: BLE001 - a model that does not fit this data: check_models says why
        return 0, 0
    algo = METHODS.get(method)(mcfg, Task(mcfg.model, shape, classes, "meta"), net=net)
    shared, personal = algo.param_split(net)
    sd = net.state_dict()
    size = lambda names: sum(sd[k].numel() * sd[k].element_size() for k in names)  # noqa: E731
    return size(personal) + SHARED_STATE_COPIES.get(method, 0) * size(shared), size(sd)


MODEL_COPIES = 6
"""Whole-model copies a run holds besides the client states: the initial model, the server state and
its initial copy (new clients start from it), the method's scratch network, and a local update's
gradients and messages. Negligible for the models shipped (resnet34: 6 x 31 MB); it is what refuses
a model made huge by its data (an npz whose labels are ids up to 10^9 gives 10^9 classes)."""


def states_in_memory(cfg, n_clients: int, default_models, input_shape, num_classes) -> tuple[int, str, int, int]:
    """(bytes of client states in memory, the method needing most, bytes per client of its state,
    bytes of its model). "Most": states plus MODEL_COPIES models (methods run one after another)."""
    run = cfg.run
    kept = kept_states(run, n_clients)
    worst, worst_need = (0, "", 0, 0), -1
    for method in run.methods:
        per, model = _method_bytes(cfg, method, default_models, input_shape, num_classes)
        total = kept * per
        if run.state_budget_gb is not None:
            total = min(total, int(run.state_budget_gb * GB))
        if total + MODEL_COPIES * model > worst_need:
            worst, worst_need = (total, method, per, model), total + MODEL_COPIES * model
    return worst


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.05 * GB else f"{n / 1e6:.0f} MB"


def refuse_if_too_big(cfg, data: int, data_what: str, states: tuple[int, str, int, int], n_clients: int,
                      available: int | None, loaded: bool, ray: bool = True) -> None:
    """One BenchError line when data (+ Ray's copy, with `ray` and the Ray backend) + states exceed
    `available`: the estimate, what is available, and what to lower. `loaded`: the data is in memory
    already (and so no longer in `available`)."""
    if available is None:
        return
    run = cfg.run
    # Through Ray Client (ray://) the object store is the cluster's, not the driver machine's.
    local_store = run.backend == "ray" and not (run.address or "").startswith("ray://")
    ray_copy = data if ray and local_store else 0
    state_total, method, per, model = states
    need = (0 if loaded else data) + ray_copy + state_total + MODEL_COPIES * model
    if need <= available:
        return
    parts = [] if loaded else [f"data {_gb(data)} ({data_what})"]
    if ray_copy:
        parts.append(f"Ray object-store copy {_gb(ray_copy)}")
    if state_total:
        budget = "" if run.state_budget_gb is None else f", capped by --state-budget-gb {run.state_budget_gb}"
        parts.append(f"{method} client states {_gb(state_total)} ({kept_states(run, n_clients):,} clients x "
                     f"{per / 1e3:,.0f} kB{budget})")
    if MODEL_COPIES * model >= 0.05 * need:
        parts.append(f"{method}'s model {_gb(model)} x {MODEL_COPIES} copies")
    if MODEL_COPIES * model > need / 2:  # the model itself: the client count is not the problem
        raise BenchError(f"this run needs about {_gb(need)} {'more ' if loaded else ''}memory ({' + '.join(parts)}) "
                         f"but only {_gb(available)} is available (MemAvailable); to fit, choose a smaller --model, "
                         "or check the labels: the model has one output per class (labels 0..num_classes-1)")
    fixes = [f"lower --clients (now {n_clients:,})"]
    if state_total and (run.state_budget_gb is None or run.state_budget_gb * GB > available / 4):
        fixes.append("give --state-budget-gb N (client states past N GB go to disk)")
    if ray_copy:
        fixes.append("use --backend serial (no object-store copy)")
    if len(run.seeds) > 1:
        fixes.append(f"run fewer seeds at once (now {len(run.seeds)}, all loaded together)")
    more = "more " if loaded else ""
    raise BenchError(f"this run needs about {_gb(need)} {more}memory ({' + '.join(parts)}) but only "
                     f"{_gb(available)} is available (MemAvailable); to fit, {', or '.join(fixes)}")


def check_before_load(cfg, seeds=None, whole_run: bool = True, available: int | None = -1) -> None:
    """Refuse a run whose data (estimated by the dataset, without generating or reading it) and
    client states cannot fit in the memory available now. `seeds`: the datasets to count (default:
    every seed's, as `load_checked` holds them); `whole_run`: count Ray's copy and client states too
    (False: only loading the data, as `bench.data describe` does); `available`: bytes to compare
    with (-1: `available_bytes()` of the machine running the check, now). Datasets without an
    estimate are checked after loading (`check_after_load`)."""
    from fedeq_bench.datasets.base import DataArgs, estimate_dataset, split_dataset_name

    run = cfg.run
    seeds = list(run.seeds if seeds is None else seeds)
    name, _ = split_dataset_name(run.dataset)
    data, samples, est = 0, 0, None
    for seed in seeds:
        args = DataArgs(seed=seed, clients=run.clients, partition=run.partition, val_frac=run.val_frac,
                        frac_unseen=run.frac_unseen, data_dir=run.data_dir)
        est = estimate_dataset(run.dataset, cfg.datasets[name], args)
        if est is None:
            return
        data += est.bytes
        samples += est.samples
    if est is None:
        return
    states = (0, "", 0, 0)
    if (whole_run and est.input_shape is not None and est.num_classes is not None
            and est.default_models is not None):
        states = states_in_memory(cfg, est.clients, est.default_models, est.input_shape, est.num_classes)
    what = f"{samples:,} samples" + (f" over {len(seeds)} seeds, all held at once" if len(seeds) > 1 else "")
    refuse_if_too_big(cfg, data, what, states, est.clients, available_bytes() if available == -1 else available,
                      loaded=False, ray=whole_run)


def dataset_bytes(ds) -> int:
    return sum(a.nbytes for c in ds.clients for a in (c.train_x, c.train_y, c.val_x, c.val_y, c.test_x, c.test_y))


def check_after_load(cfg, datasets: dict, available: int | None = -1) -> None:
    """With every seed's dataset in memory: refuse when what the run adds (Ray's copy of the data, the
    client states of the real client count and model) exceeds the memory still available (`available`
    as in `check_before_load`)."""
    if not datasets:
        return
    data = sum(dataset_bytes(ds) for ds in datasets.values())
    ds = next(iter(datasets.values()))
    states = states_in_memory(cfg, len(ds.clients), ds.default_models, ds.input_shape, ds.num_classes)
    refuse_if_too_big(cfg, data, "loaded", states, len(ds.clients),
                      available_bytes() if available == -1 else available, loaded=True)
