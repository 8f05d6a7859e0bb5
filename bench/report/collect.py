"""Read a comparison (or a sweep) back from MLflow into `ReportData`, with MLflow's client only.

    data = collect("sqlite:///mlflow.db", "fedeq-bench")                 # every comparison there
    data = collect("sqlite:///mlflow.db", "fedeq-bench", ["3f2a...", ...])  # these parent runs
    data = collect_sweep("sqlite:///mlflow.db", "fedeq-bench", "fedeq-synthetic")

What `bench.run` leaves in MLflow (bench/experiment/ `compare`): a parent run tagged
`kind=comparison` whose params are the resolved config, `command`, `git_commit` and `version.*`;
under it one child run per method x seed (tag `mlflow.parentRunId`) with its params, its metrics at
step = round, and a `clients.csv` artifact (the final evaluation per client). A sweep (bench/tuning/study.py)
leaves a parent tagged `kind=sweep` and `study=NAME`, trial child runs (`kind=trial`, `trial_number`)
and the best trial rerun on test (`kind=best-test`). Nothing here imports torch or the engine.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import io
import os
import re
import shlex
import tempfile

from bench.report.model import Group, Provenance, ReportData, RunRecord
from fedeq_bench.core.errors import BenchError, choices

PAGE = 1000  # runs per search_runs page (MLflow's default maximum)


def client_for(tracking_uri: str):
    """An MlflowClient on an existing store. A missing SQLite file is bad input: opening it would create
    an empty store (and a typo would leave `mlflow.db` files behind)."""
    from bench.tracking import open_client, sqlite_path
    from bench.tracking.stores import check_kind

    check_kind(tracking_uri)  # in memory, an option SQLite does not get, another program's database
    path = sqlite_path(tracking_uri)  # sqlite:///rel.db, sqlite:////abs/path.db; '' for other stores
    if path and not os.path.exists(path):
        raise BenchError(f"no MLflow store at {tracking_uri!r} ({path} does not exist); "
                         f"give the --tracking-uri that bench.run recorded to")
    try:
        return open_client(tracking_uri)
    except BenchError:  # said already (an in-memory store, another program's database: `check_kind`)
        raise
    except Exception as e:  # an unreachable server or an unusable store is bad input, not a bug
        raise BenchError(f"cannot read MLflow tracking store {tracking_uri!r}: {str(e).splitlines()[0][:200]}") \
            from None


def experiment_id(client, tracking_uri: str, experiment: str) -> str:
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = [e.name for e in client.search_experiments()]
    except Exception as e:  # an unreachable server or an unusable store is bad input, not a bug
        raise BenchError(f"cannot read MLflow tracking store {tracking_uri!r}: {str(e).splitlines()[0][:200]}") \
            from None
    if exp is None:
        raise BenchError(f"unknown MLflow experiment {experiment!r} in {tracking_uri}; "
                         f"experiments there: {choices(names) or 'none'}")
    return exp.experiment_id


def search(client, exp_id: str, filter_string: str) -> list:
    """Every run matching the filter, oldest first (all pages)."""
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string, max_results=PAGE,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def status_of(run) -> str:
    """MLflow's status, or PRUNED for a run that bench/tracking/ ended KILLED with `pruned=true`."""
    if run.info.status == "KILLED" and run.data.tags.get("pruned") == "true":
        return "PRUNED"
    return run.info.status


def history(client, run) -> dict[str, list[tuple[int, float]]]:
    """Every metric's full history, `[(round, value)]` sorted by round (the last value logged wins)."""
    out = {}
    for key in sorted(run.data.metrics):
        points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
        out[key] = sorted({m.step: m.value for m in points}.items())
    return out


@contextlib.contextmanager
def no_progress_bar():
    """MLflow draws a tqdm bar on stderr per download; a report reads one small file per run."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


def clients(client, run_id: str) -> list[dict] | None:
    """The rows of the run's clients.csv (bench/experiment/ `clients_csv`); None without one."""
    if not any(f.path == "clients.csv" for f in client.list_artifacts(run_id)):
        return None
    with tempfile.TemporaryDirectory() as tmp, no_progress_bar():
        with open(client.download_artifacts(run_id, "clients.csv", tmp)) as f:
            text = f.read()
    return [{k: (int(v) if k == "cid" else v if k == "group" else float(v)) for k, v in row.items()}
            for row in csv.DictReader(io.StringIO(text))]


_PER_SEED = re.compile(r",(?:seed=\d+|sha256=[0-9a-f]+)(?=[,)])")


def pooled(partition: str) -> str:
    """A partition's description without what each seed makes its own: a split drawn from the seed
    (`shards:2(clients=50,seed=1,sha256=40f8...)`, datasets/partition.py) differs per seed by design,
    as synthetic data does, so its seed and digest would put every seed of one comparison in a group
    of its own. What stays (`shards:2(clients=50)`) is the split's recipe; the data each run saw is
    its `dataset_fingerprint`."""
    return _PER_SEED.sub("", partition)


def record(client, run, method: str | None = None) -> RunRecord:
    """A child run as a report row's run. `method`: the row's name given (a sweep's trials); else the
    method, named `METHOD@FORMAT` when its messages travelled in another wire format than fp32, so
    formats are rows of one table side by side rather than comparisons apart."""
    p = run.data.params
    seed = p.get("seed", run.data.tags.get("seed", "-1"))
    base = p.get("method", run.data.tags.get("method", "?"))
    fmt = p.get("wire", "fp32")  # runs from before wire formats sent fp32
    return RunRecord(
        run_id=run.info.run_id, parent_id=run.data.tags.get("mlflow.parentRunId", ""), base=base,
        method=method or (base if fmt == "fp32" else f"{base}@{fmt}"), seed=int(seed),
        status=status_of(run), dataset=p.get("dataset", "?"), partition=pooled(p.get("partition", "?")),
        fingerprint=p.get("dataset_fingerprint", "?"), model=p.get("model", "?"), params=dict(p),
        history=history(client, run), clients=clients(client, run.info.run_id),
        start_ms=run.info.start_time, end_ms=run.info.end_time, diverged=run.data.tags.get("diverged", ""))


def provenance(run) -> Provenance:
    p = run.data.params
    return Provenance(
        run_id=run.info.run_id, name=run.info.run_name or run.data.tags.get("mlflow.runName", ""),
        status=status_of(run), command=p.get("command", ""), git_commit=p.get("git_commit", "unknown"),
        config=dict(p), versions={k[len("version."):]: v for k, v in sorted(p.items()) if k.startswith("version.")},
        start_ms=run.info.start_time, metrics=dict(run.data.metrics))


def grouped(records: list[RunRecord]) -> list[Group]:
    """Runs by (dataset, partition), in first-seen order; methods in first-seen order within each."""
    by_key: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        by_key.setdefault((r.dataset, r.partition), []).append(r)
    return [Group(dataset=d, partition=part, runs=rs, seeds=sorted({r.seed for r in rs}),
                  methods=list(dict.fromkeys(r.method for r in rs)))
            for (d, part), rs in by_key.items()]


NEUTRAL = frozenset({"methods", "seeds", "backend", "workers", "address", "cpus_per_client", "state_budget_gb",
                     "checkpoint_every", "experiment", "tracking_uri", "run_name", "data_dir", "keep_going"})
"""Run keys (bench/config.py RunConfig) that never change a run's numbers: which methods and seeds an
invocation ran, where and how it ran (Serial == Ray bit for bit; any state budget or worker count gives
the same numbers), where it is recorded, whether a diverged run stops the others. `data_dir` only says
where files are read from: equal data has equal `dataset_fingerprint` (compared through the dataset and
partition). Every other run key is compared."""


VARIANT = frozenset({"wire", "wire_rounding", "wire_topk", "wire_feedback"})
"""Run and method keys that name a row rather than a comparison: a method sent in another wire format
is its own row (`fedrep@int8`, `record`), so comparisons that differ only there are one group."""


@functools.cache
def run_defaults() -> dict[str, str]:
    """`{"run.rounds": "30", "run.clients": "None", ...}`: every run key at RunConfig's default, written as
    bench.run records a parent's params (config.flatten: `None`, a tuple as `a,b`, a float as str gives it)."""
    from bench import config as C

    return C.flatten(C.Config())  # no method or dataset sections: the run keys alone


def comparable_config(r: RunRecord, parent_config: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(task keys, method keys) of run `r`: what changes its results, seed aside. Task keys are the
    parent's `run.*` params but NEUTRAL and VARIANT ones and its dataset's table (`synthetic.*`); method
    keys are the child's own `<method>.*` params but VARIANT ones (a method key left unset reads `None`:
    the run's value). A run key the parent did not record (an option added since it ran) reads as its
    default (`run_defaults`): a new option's default keeps the numbers runs made before it had, so those
    runs pool with runs made since at the default. Dataset keys are compared as recorded (their defaults
    live with the datasets, which import torch)."""
    dataset = r.dataset.split(":")[0]
    task = {k: v for k, v in {**run_defaults(), **parent_config}.items()
            if (k.startswith("run.") and k[len("run."):] not in NEUTRAL | VARIANT) or k.startswith(f"{dataset}.")}
    method = {k: v for k, v in r.params.items()
              if k.startswith(f"{r.registered}.") and k.removeprefix(f"{r.registered}.") not in VARIANT}
    return task, method


def config_file(command: str) -> str | None:
    """The `--config FILE` of a recorded command line (a preset such as configs/tuned/synthetic.toml);
    several, layered, as `A + B`."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    files = []
    for i, w in enumerate(words):
        if w == "--config" and i + 1 < len(words):
            files.append(words[i + 1])
        elif w.startswith("--config="):
            files.append(w[len("--config="):])
    return " + ".join(files) or None


LABEL_KEYS = 6
"""A group's label names at most this many differing keys (then `+N more`: the provenance has them all)."""


def comparable_groups(records: list[RunRecord], parents: list[Provenance]) -> list[Group]:
    """Runs grouped so that a group pools only comparable runs: one dataset and partition, equal task
    keys, and for each method equal method keys (`comparable_config`). An invocation (a parent run)
    joins the first group it agrees with on every key of every method it ran, else starts a new one;
    so a `--rounds 2` run or a tuned preset's rerun is its own group, never another seed of a row.
    Groups sharing a dataset and partition are labelled by the keys whose values differ between them."""
    config = {p.run_id: p.config for p in parents}
    command = {p.run_id: p.command for p in parents}
    # (dataset, partition, task keys, parent) -> runs, in first-seen order
    buckets: dict[tuple, list[RunRecord]] = {}
    for r in records:
        task, _ = comparable_config(r, config.get(r.parent_id, {}))
        buckets.setdefault((r.dataset, r.partition, tuple(sorted(task.items())), r.parent_id), []).append(r)
    found: list[dict] = []  # {"key": (dataset, partition, task), "methods": {method: method keys}, "runs", "files"}
    for (dataset, partition, task, parent), runs in buckets.items():
        keys = {r.method: comparable_config(r, config.get(parent, {}))[1] for r in runs}
        home = next((f for f in found if f["key"] == (dataset, partition, task)
                     and all(f["methods"].get(m, k) == k for m, k in keys.items())), None)
        if home is None:
            home = {"key": (dataset, partition, task), "methods": {}, "runs": [], "files": set()}
            found.append(home)
        home["methods"].update(keys)
        home["runs"] += runs
        home["files"].add(config_file(command.get(parent, "")) or "")
    groups = []
    for f in found:
        (dataset, partition, task), rs = f["key"], f["runs"]
        cfg = dict(task)
        for keys in f["methods"].values():
            cfg.update(keys)
        groups.append(Group(dataset=dataset, partition=partition, runs=rs, seeds=sorted({r.seed for r in rs}),
                            methods=list(dict.fromkeys(r.method for r in rs)), config=cfg))
    for i, g in enumerate(groups):
        g.label = label(g, [o for o in groups if (o.dataset, o.partition) == (g.dataset, g.partition) and o is not g],
                        found[i]["files"] - {""})
    return groups


def label(group: Group, others: list[Group], files: set[str]) -> str:
    """`config FILE; key=value, ...`: the keys whose values differ between `group` and `others` (its
    dataset and partition's other groups; `unrecorded` where a run did not record one); empty alone."""
    if not others:
        return ""
    task = ("run.", group.dataset.split(":")[0] + ".")

    def differs(k: str) -> bool:
        if k.startswith(task):  # the task: compared with every other group
            return any(o.config.get(k) != group.config.get(k) for o in others)
        # a method's key: compared with the groups that ran that method
        return k in group.config and any(k in o.config and o.config[k] != group.config[k] for o in others)

    differ = sorted((k for k in set(group.config).union(*(o.config for o in others)) if differs(k)),
                    key=lambda k: (not k.startswith(task), k))  # the task's keys first
    shown = [f"{k.removeprefix('run.')}={group.config.get(k, 'unrecorded')}" for k in differ[:LABEL_KEYS]]
    if len(differ) > LABEL_KEYS:
        shown.append(f"+{len(differ) - LABEL_KEYS} more (see the provenance)")
    text = ", ".join(shown) or "an equal config, another invocation"
    return "; ".join([*(f"config {f}" for f in sorted(files)), text])


def children(client, exp_id: str, parent_id: str) -> list:
    return search(client, exp_id, f"tags.`mlflow.parentRunId` = '{parent_id}'")


def collect(tracking_uri: str, experiment: str, parent_ids=None) -> ReportData:
    """The comparisons (parent runs tagged kind=comparison) of `experiment`, or only `parent_ids`."""
    client = client_for(tracking_uri)
    exp_id = experiment_id(client, tracking_uri, experiment)
    comparisons = search(client, exp_id, "tags.kind = 'comparison'")
    if not comparisons:
        kinds = sorted({r.data.tags.get("kind", "untagged") for r in search(client, exp_id, "")})
        found = f"its runs are of kind {', '.join(kinds)}" if kinds else "it has no runs"
        raise BenchError(f"experiment {experiment!r} in {tracking_uri} has no comparison runs (tag kind=comparison, "
                         f"written by python -m bench.run); {found}" + ("; for a sweep give --sweep STUDY"
                                                                        if "sweep" in kinds else ""))
    if parent_ids:
        known = {r.info.run_id: r for r in comparisons}
        bad = [i for i in parent_ids if i not in known]
        if bad:
            listed = ", ".join(f"{r.info.run_id} ({r.info.run_name})" for r in comparisons[-10:])
            raise BenchError(f"no comparison run {', '.join(map(repr, bad))} in experiment {experiment!r}; "
                             f"comparison runs there (newest 10): {listed}")
        parents = [known[i] for i in dict.fromkeys(parent_ids)]
    else:
        parents = comparisons
    records = [record(client, c) for p in parents for c in children(client, exp_id, p.info.run_id)]
    provs = [provenance(p) for p in parents]
    return ReportData(name=experiment, experiment=experiment, tracking_uri=tracking_uri,
                      parents=provs, groups=comparable_groups(records, provs))


def trial_label(number: int | str) -> str:
    return f"trial {number}"


def best_label(number: int | str) -> str:
    return f"best (trial {number}) on test"


def collect_sweep(tracking_uri: str, experiment: str, study: str) -> ReportData:
    """A study's parent runs (kind=sweep, study=STUDY; one per invocation, a resume adds one) with its
    trial runs as methods `trial N` (one series per trial) and the best trial's test reruns as
    `best (trial N) on test`, sorted by trial number."""
    client = client_for(tracking_uri)
    exp_id = experiment_id(client, tracking_uri, experiment)
    sweeps = search(client, exp_id, "tags.kind = 'sweep'")
    parents = [r for r in sweeps if r.data.tags.get("study") == study]
    if not parents:
        studies = sorted({r.data.tags.get("study", "?") for r in sweeps})
        raise BenchError(f"unknown study {study!r} in experiment {experiment!r} of {tracking_uri}; "
                         f"studies there: {', '.join(studies) or 'none (no bench.sweep runs)'}")
    records = []
    for p in parents:
        for c in children(client, exp_id, p.info.run_id):
            kind, number = c.data.tags.get("kind"), c.data.params.get("trial_number", "?")
            if kind == "trial":
                records.append(record(client, c, trial_label(number)))
            elif kind == "best-test":
                records.append(record(client, c, best_label(number)))
    # Trials in number order (a resumed study's trials come from several parents), then the test reruns.
    number = lambda r: int(r.params["trial_number"]) if r.params.get("trial_number", "").isdigit() else -1  # noqa: E731
    records.sort(key=lambda r: (r.method.startswith("best"), number(r), r.seed))
    return ReportData(name=study, experiment=experiment, tracking_uri=tracking_uri,
                      parents=[provenance(p) for p in parents], groups=grouped(records),
                      images=optuna_figures(client, [p.info.run_id for p in parents]))


def optuna_figures(client, parent_ids: list[str]) -> dict[str, bytes]:
    """Optuna's figures as a sweep logged them on its parent run (`figures/<name>.png`, bench/tuning/
    pareto.py `log_figures`), name -> PNG bytes, from the newest parent that logged any: a resumed
    study's newest invocation drew them over every trial so far. {} when none did."""
    for run_id in reversed(parent_ids):  # oldest first: the newest is last
        pngs = [f.path for f in client.list_artifacts(run_id, "figures") if f.path.endswith(".png")]
        if pngs:
            out = {}
            with tempfile.TemporaryDirectory() as tmp, no_progress_bar():
                for path in sorted(pngs):
                    with open(client.download_artifacts(run_id, path, tmp), "rb") as f:
                        out[os.path.basename(path)[:-len(".png")]] = f.read()
            return out
    return {}
