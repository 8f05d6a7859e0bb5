"""Optuna sweeps: one study per method, every trial a child MLflow run, scored on validation only.

    cfg = experiment.validate(config.from_cli(None, {"methods": "fedeq", "backend": "serial"}, []))
    outcomes = study.sweep(cfg, study.SweepOptions(trials=20, params=("fedeq.rho",)))

What a sweep does, and why:

- **Storage and resume.** One Optuna study per method in an RDB storage (`sqlite:///optuna.db` by
  default), opened with `load_if_exists=True`: the same command resumes, and only the trials still
  missing are run (`trials` minus the COMPLETE and PRUNED ones already stored; FAIL ones are redone).
  The storage has Optuna's heartbeat on, so a trial whose process died (kill -9) is marked FAIL by
  `optuna.storages.fail_stale_trials` once its heartbeat is `GRACE_S` old (Optuna also calls it
  before each new trial); its MLflow runs, left RUNNING by the dead process, are ended FAILED
  (`end_orphans`). Optuna's own storage code does this; nothing here guesses which process is alive.
- **Objective: validation only.** Each trial applies `spaces.suggest(...)` with `config.apply`,
  runs the method for every seed with `experiment.run_one` (one MLflow child run per trial x seed,
  so every seed's curve is kept as `bench.run` keeps it) and returns the mean over seeds of the final
  `acc/val`. The engine's evaluation scores a client's test split too (methods/train.py
  `eval_metrics`), so a trial runs on `validation_view(dataset)`: the same clients whose test split
  IS their validation split. The real test arrays are never touched (tests/unit/test_study.py hands
  the sweep a dataset whose test split raises), and no engine or method changes. In a trial's MLflow
  run the test-named metrics (`acc/mean`, `acc/weighted`, `acc/bottom10`, `acc/unseen`) would then
  hold validation figures, so they are not logged there (`TEST_METRICS`).
- **Pruning.** Every evaluated round of the FIRST seed reports `acc/val` (`trial.report(v, rnd)`);
  when `trial.should_prune()`, `optuna.TrialPruned` is raised: `Tracker.run` ends that MLflow run
  KILLED with tag `pruned=true`, Optuna marks the trial PRUNED. Seeds run one after another, so a
  running mean over seeds at round r does not exist yet when round r of seed 0 is reported; pruning
  on seed 0's curve stops a bad trial before its other seeds cost anything.
- **Test, once.** After the study, the best trial's values are rerun on the real data for every
  seed (child runs tagged `kind=best-test`), and the mean final `acc/mean` is logged on the
  study's parent run as `best/test_acc` (never used to choose anything).
- **Equal budgets.** Several methods: one study each, with the same number of trials, sampler seed
  and pruner; `write_tuned` writes every method's best values as `[method]` tables of a preset that
  `python -m bench.run --config` loads as is.
- **Several objectives.** `objectives=("acc", "bytes"[, "memory"])`: NSGA-II (seeded) over validation
  accuracy (max), bytes sent over the run (min) and peak training memory (min), each a mean over
  seeds. Optuna cannot prune such trials, so the pruner is none (asking for one is refused). The
  Pareto front (`study.best_trials`) is printed and logged as pareto.md/.csv/.json and a figure; its
  most accurate trial is the one tested once and written to the tuned preset (`chosen_trial`). The
  default study name gets the objectives appended: a study's directions are fixed at creation.
- **Trials at once.** `n_jobs > 1` (Ray only): Optuna runs trials in `n_jobs` threads and each trial
  takes one part of `RayBackend.split(n_jobs)`, a disjoint share of the actors, for its whole run.
  Results equal one-at-a-time runs bit for bit: a run's numbers depend on its seed and values, not on
  how many actors serve it, and the driver-side code that touches torch's global generator holds
  `seeding.GLOBAL_RNG_LOCK`. The serial backend is refused (its worker seeds the global generator
  per job in the driver's own process). Which values TPE proposes does depend on n_jobs (it sees
  fewer finished trials; `constant_liar` keeps concurrent trials apart).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import sys
import tempfile
import tomllib
import warnings
from dataclasses import dataclass
from typing import Any

from bench import cli
from fedeq_bench.core.errors import BenchError, choices

PRUNERS = ("median", "hyperband", "none")
OBJECTIVES = {
    "acc": ("acc/val", "maximize"),
    "bytes": ("bytes/cumulative", "minimize"),
    "memory": ("mem/peak_train_bytes", "minimize"),
}
"""`--objective` names: (metric, direction). acc: final validation accuracy; bytes: every byte sent up
and down over the run; memory: the run's peak training memory of a local update. Each is the mean over
seeds."""
COLUMN = {"acc": "acc/val", "bytes": "MB sent", "memory": "peak train MB"}
"""How each objective is shown (Pareto table, figure): bytes and memory in MB (`shown`)."""


def shown(objective: str, value: float) -> float:
    """An objective's value as COLUMN shows it: bytes and memory in MB, accuracy as is."""
    return value / 1e6 if objective in ("bytes", "memory") else value
TEST_METRICS = ("acc/mean", "acc/weighted", "acc/bottom10", "acc/unseen")
"""Metrics a trial does not log: on the validation view they would be validation figures."""
OBJECTIVE = "acc/val"
HEARTBEAT_S = 10
"""Seconds between a running trial's heartbeats in the Optuna storage."""
GRACE_S = 30
"""A RUNNING trial whose last heartbeat is older than this is taken for dead and marked FAIL."""


@dataclass(frozen=True)
class SweepOptions:
    trials: int
    """Trials each study should hold (COMPLETE + PRUNED); a resumed study runs only the missing ones."""
    params: tuple[str, ...] | None = None
    """Restrict the search space to these keys (`rho` or `fedeq.rho`); None: the whole space."""
    space: str | None = None
    """A search-space TOML file instead of configs/sweeps/<method>.toml."""
    pruner: Any = None
    """`median`, `hyperband` or `none` (Optuna's MedianPruner, HyperbandPruner, NopPruner), or an
    `optuna.pruners.BasePruner` from a library caller; None: median for one objective, none for
    several (Optuna cannot prune a multi-objective trial)."""
    objectives: tuple[str, ...] = ("acc",)
    """Names of OBJECTIVES. One: TPE maximizes accuracy. Several (`acc,bytes`, `acc,bytes,memory`):
    NSGA-II searches the Pareto front."""
    n_jobs: int = 1
    """Trials run at once, each on its own part of the Ray actor pool (`RayBackend.split`)."""
    sampler: Any = None
    """None: TPE for one objective, NSGA-II for several, seeded with `sampler_seed`; or an
    `optuna.samplers.BaseSampler` from a library caller."""
    storage: str = "sqlite:///optuna.db"
    """Optuna RDB storage URL."""
    study_name: str | None = None
    """Study name; None: `<method>-<dataset>`. With several methods: `<name>-<method>`."""
    sampler_seed: int | None = None
    """TPESampler seed; None: the run's first seed."""
    final_test: bool = True
    """Rerun the best trial's values once on the test split (best/test_acc)."""
    tuned_out: str | None = None
    """Where the tuned preset goes; None: configs/tuned/<dataset>.toml."""
    figures: bool = True
    """Optuna's matplotlib figures as artifacts of the parent run (skipped without matplotlib)."""


@dataclass
class StudyOutcome:
    method: str
    study_name: str
    parent_run_id: str
    best_value: float | None
    best_params: dict[str, Any]
    test_acc: float | None
    trials: int
    """Trials the study holds in COMPLETE or PRUNED state."""
    objectives: tuple[str, ...] = ("acc",)
    pareto: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Several objectives: the Pareto front, one row per trial (`pareto_rows`), most accurate first."""


# -- pieces ---------------------------------------------------------------------------------------


def parse_objectives(text: str) -> tuple[str, ...]:
    """`acc`, `acc,bytes`, `acc,bytes,memory`: names of OBJECTIVES, each once, accuracy among them."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in OBJECTIVES]
    if not names or bad:
        raise BenchError(f"unknown objective {', '.join(map(repr, bad)) or repr(text)}; "
                         f"give a comma list of {choices(OBJECTIVES)} (e.g. acc,bytes)")
    if len(set(names)) != len(names) or "acc" not in names:
        raise BenchError(f"--objective {text!r}: name each objective once, acc among them (e.g. acc,bytes)")
    return names


def make_pruner(name, rounds: int, objectives: int = 1):
    """Optuna's pruner by name (a library caller may pass a BasePruner); a bad name is bad input.
    None picks median for one objective and none for several: Optuna prunes only single-objective
    trials (`Trial.report` refuses a multi-objective one), so asking for a pruner there is refused."""
    import optuna

    if name is None:
        name = "median" if objectives == 1 else "none"
    if objectives > 1 and not (name == "none" or isinstance(name, optuna.pruners.NopPruner)):
        raise BenchError(f"--pruner {name}: Optuna cannot prune a multi-objective study; "
                         f"leave --pruner out or give --pruner none")
    if isinstance(name, optuna.pruners.BasePruner):
        return name
    if name == "median":
        # One completed trial is no median; warmup 0: prune from the first evaluated round on.
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, rounds))
    if name == "none":
        return optuna.pruners.NopPruner()
    raise BenchError(f"unknown pruner {name!r}; choose from {choices(PRUNERS)}")


def method_space(cfg, method: str, opts: SweepOptions) -> dict:
    """`spaces.load_space` for one method, kept to that method's keys: a `--space` file shared by
    `--methods a,b` holds every method's entries. A run key (`lr`) is tuned as the method's own
    field of that name (`fedeq.lr`), so each method's winner is its own; a dataset key is refused
    (the data is the same for every method of a fair comparison)."""
    from bench.tuning.spaces import load_space

    space = load_space(method, opts.space, list(opts.params) if opts.params else None)
    fields = {f.name for f in dataclasses.fields(cfg.methods[method])}
    out = {}
    for key, dist in space.items():
        section, _, field = key.rpartition(".")
        if section in ("", "run"):
            if field not in fields:
                raise BenchError(f"search space: run key {key!r} has no per-method field in {method}; "
                                 f"sweep one of {choices(f'{method}.{f}' for f in sorted(fields))}")
            out[f"{method}.{field}"] = dataclasses.replace(dist, key=f"{method}.{field}")
        elif section == method:
            out[key] = dist
        elif section in cfg.datasets:
            raise BenchError(f"search space: {key!r} is a dataset key; a sweep tunes methods on fixed data")
    if not out:
        raise BenchError(f"search space has no entry for {method} (keys: {choices(space)})")
    return out


def make_storage(url: str):
    """An Optuna RDB storage with heartbeats (so a dead process's trial is failed, not left RUNNING)."""
    import optuna

    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    except Exception as e:  # a bad URL, an unwritable file: bad input, not a bug
        raise BenchError(f"cannot use Optuna storage {url!r}: {str(e).splitlines()[0][:200]}") from None


def validation_view(dataset):
    """The same clients with each test split replaced by the validation split (module doc).

    Reads only train and validation arrays. The fingerprint differs from the real dataset's, because
    backends cache a dataset by fingerprint and the view must never be mistaken for the real data.
    """
    from fedeq_bench.datasets.base import ClientData

    view = copy.copy(dataset)
    view.clients = [ClientData(c.train_x, c.train_y, c.val_x, c.val_y, c.val_x, c.val_y) for c in dataset.clients]
    view.fingerprint = f"{dataset.fingerprint}-val"
    return view


class _TrialTracker:
    """The sweep's Tracker as `run_one` sees it: runs named and tagged for their trial; the test-named
    metrics (validation figures on the validation view) left out. Everything else is the Tracker's."""

    def __init__(self, tracker, prefix: str, params: dict[str, str], tags: dict[str, str], drop=TEST_METRICS):
        self._t, self._prefix, self._params, self._tags, self._drop = tracker, prefix, params, tags, set(drop)

    def __getattr__(self, name):
        return getattr(self._t, name)

    def run(self, name, params, tags=None, parent=None):
        return self._t.run(f"{self._prefix}{name}", {**params, **self._params}, {**(tags or {}), **self._tags},
                           parent)

    def log_metrics(self, run_id, step, metrics):
        self._t.log_metrics(run_id, step, {k: v for k, v in metrics.items() if k not in self._drop})


def study_name_for(opts: SweepOptions, method: str, dataset: str, several: bool) -> str:
    """`<method>-<dataset>` (`-acc-bytes` appended for several objectives: a study's directions are
    fixed when it is created), or `--study-name` (`<name>-<method>` with several methods)."""
    if opts.study_name is None:
        suffix = "" if opts.objectives == ("acc",) else "-" + "-".join(opts.objectives)
        return f"{method}-{dataset}{suffix}"
    return f"{opts.study_name}-{method}" if several else opts.study_name


def counted(study) -> int:
    """Trials that count toward the budget: COMPLETE and PRUNED (FAIL ones are redone)."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def end_orphans(tracker, study, study_name: str) -> int:
    """End FAILED the MLflow runs of this study left RUNNING by a process that died: trial runs whose
    Optuna trial is no longer RUNNING, and parent runs when no trial of the study is RUNNING.
    Returns how many runs were ended."""
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    runs = tracker.client.search_runs([tracker.experiment_id],
                                      filter_string=f"tags.study = '{study_name}' and attributes.status = 'RUNNING'")
    ended = 0
    for r in runs:
        number = r.data.tags.get("trial_number")
        alive = (int(number) in running) if number is not None else bool(running)
        if not alive:
            tracker.end_quietly(r.info.run_id, "FAILED")
            ended += 1
    return ended


# -- one study ------------------------------------------------------------------------------------


def run_study(cfg, method: str, opts: SweepOptions, tracker, backend, views: dict, real: dict | None,
              several: bool = False, command: str = "", quiet: bool = True, storage=None) -> StudyOutcome:
    """One method's study: trials on `views` (validation views, by seed), the best rerun on `real`.

    `backend`: one backend, or a list of `opts.n_jobs` (`RayBackend.split`); a running trial holds
    one of them, so trials that run at once never share an actor pool."""
    import queue

    import optuna

    from bench import config as C
    from bench import experiment
    from bench.tracking import git_commit, package_versions
    from bench.tuning.spaces import suggest

    run = cfg.run
    optuna.logging.set_verbosity(optuna.logging.WARNING if quiet else optuna.logging.INFO)
    _quiet_interrupts(optuna.logging.get_logger("optuna"))
    space = method_space(cfg, method, opts)
    objectives = tuple(opts.objectives)
    multi = len(objectives) > 1
    directions = [OBJECTIVES[o][1] for o in objectives]
    pruner = make_pruner(opts.pruner, run.rounds, len(objectives))
    seed = run.seeds[0] if opts.sampler_seed is None else opts.sampler_seed
    name = study_name_for(opts, method, run.dataset.split(":")[0], several)
    storage = make_storage(opts.storage) if storage is None else storage
    if opts.sampler is not None:
        sampler, sampler_name = opts.sampler, type(opts.sampler).__name__
    elif multi:
        sampler, sampler_name = optuna.samplers.NSGAIISampler(seed=seed), "nsga2"
    else:
        # constant_liar: trials running at once do not all draw the same point (no effect one at a time).
        sampler, sampler_name = optuna.samplers.TPESampler(seed=seed, constant_liar=opts.n_jobs > 1), "tpe"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(study_name=name, storage=storage, directions=directions,
                                    load_if_exists=True, sampler=sampler, pruner=pruner)
    if [d.name.lower() for d in study.directions] != directions:
        raise BenchError(f"study {name!r} in {opts.storage} was created for other objectives "
                         f"({', '.join(d.name.lower() for d in study.directions)}); give another --study-name")
    end_orphans(tracker, study, name)
    base = C.apply(cfg, {"methods": method})
    backends = queue.SimpleQueue()
    for b in (backend if isinstance(backend, list) else [backend]):
        backends.put(b)

    params = C.flatten(base, [method], run.dataset.split(":")[0])
    params.update({"git_commit": git_commit(), "command": command, **package_versions(), "study": name,
                   "storage": opts.storage,
                   "trials": str(opts.trials), "pruner": str(opts.pruner or ("median", "none")[multi]),
                   "sampler": sampler_name, "sampler_seed": str(seed), "space": ",".join(sorted(space)),
                   "objective": ",".join(OBJECTIVES[o][0] for o in objectives), "n_jobs": str(opts.n_jobs)})
    tags = {"kind": "sweep", "study": name, "method": method}
    with tracker.run(run.run_name or f"sweep {method} on {run.dataset}", params, tags=tags) as parent:

        def objective(trial):
            values = suggest(trial, space)
            tcfg = C.apply(base, values)
            trial_tags = {"kind": "trial", "study": name, "trial_number": str(trial.number)}
            trial_params = {"trial_number": str(trial.number), **{f"trial.{k}": str(v) for k, v in values.items()}}
            b = backends.get()
            try:
                return seeds_score(trial, tcfg, trial_params, trial_tags, b)
            except BenchError as e:
                # A trial's own values can make training fail (a diverging solver at a large rho):
                # an outcome of the search, not bad input. Its MLflow run is already FAILED; Optuna
                # marks a nan value FAIL, the study goes on, and a resume redraws it.
                trial.set_user_attr("error", str(e))
                sys.stderr.write(f"trial {trial.number} failed: {e}\n")
                return tuple(float("nan") for _ in objectives) if multi else float("nan")
            finally:
                backends.put(b)

        def seeds_score(trial, tcfg, trial_params, trial_tags, b):
            results = []
            for i, s in enumerate(run.seeds):
                def on_round(rnd, metrics, first=(i == 0)):
                    if not multi and first and OBJECTIVE in metrics and not math.isnan(metrics[OBJECTIVE]):
                        trial.report(metrics[OBJECTIVE], step=rnd)
                        if trial.should_prune():
                            raise optuna.TrialPruned(f"pruned at round {rnd}")

                tt = _TrialTracker(tracker, f"trial {trial.number} ", trial_params, trial_tags)
                results.append(experiment.run_one(tcfg, tt, parent, b, method, s, views[s], quiet=True,
                                                  on_round=on_round))
            scores = objective_values(results, objectives)
            if math.isnan(scores[0]):
                raise BenchError(f"{OBJECTIVE} is nan (no client has a validation split; raise --val-frac)")
            return tuple(scores) if multi else scores[0]

        run_trials(study, objective, opts.trials, opts.n_jobs)
        end_orphans(tracker, study, name)

        best_value, best_params, test_acc, pareto = None, {}, None, []
        best = chosen_trial(study, multi)
        if multi:
            pareto = pareto_rows(study, objectives, space)
            if pareto:
                log_pareto(tracker, parent, pareto, objectives)
        if best is not None:
            best_value, best_params = float(best.values[0]), best_values(best, space)
            tracker.log_params(parent, {f"best.{k}": str(v) for k, v in best_params.items()}
                               | {"best.trial_number": str(best.number)})
            tracker.log_metrics(parent, 0, {"best/value": best_value}
                                | ({f"best/{o}": float(v) for o, v in zip(objectives, best.values)} if multi else {}))
            if opts.final_test and real is not None:
                bcfg = C.apply(base, best_params)
                bt = _TrialTracker(tracker, "best ", {"trial_number": str(best.number)},
                                   {"kind": "best-test", "study": name}, drop=())
                b = backends.get()
                try:
                    accs = [experiment.run_one(bcfg, bt, parent, b, method, s, real[s], quiet=True)
                            .final["acc/mean"] for s in run.seeds]
                finally:
                    backends.put(b)
                test_acc = sum(accs) / len(accs)
                tracker.log_metrics(parent, 0, {"best/test_acc": test_acc})
        if opts.figures:
            log_figures(tracker, parent, study, objectives)
    return StudyOutcome(method, name, parent, best_value, best_params, test_acc, counted(study), objectives,
                        pareto)


def objective_values(results, objectives) -> list[float]:
    """Each objective's mean over the seeds' results: final acc/val and bytes/cumulative, and the
    run's peak of mem/peak_train_bytes (a client is metered on its first update, so the last round
    alone may have metered nobody new)."""
    out = []
    for o in objectives:
        metric = OBJECTIVES[o][0]
        vals = [r.peak(metric) if o == "memory" else r.final[metric] for r in results]
        out.append(sum(vals) / len(vals))
    return out


def run_trials(study, objective, trials: int, n_jobs: int = 1) -> None:
    """Run trials until the study holds `trials` counted ones, `n_jobs` at a time.

    Each `optimize` call asks for exactly the missing number, so trials running at once never
    overshoot the budget; failed trials do not count and are redrawn by the next call, up to as many
    failures as the budget was missing (so a space that always fails ends)."""
    import optuna

    missing = max(0, trials - counted(study))
    failures_left = missing
    while missing > 0:
        before = counted(study)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # catch=(): a bug stops the study with its traceback (a trial's BenchError is a FAIL, above).
            study.optimize(objective, n_trials=missing, n_jobs=n_jobs, catch=())
        done = counted(study) - before
        failures_left -= missing - done
        missing = max(0, trials - counted(study))
        if failures_left <= 0:
            break


def chosen_trial(study, multi: bool):
    """The trial whose values go to the tuned preset: the best one, or with several objectives the
    most accurate trial of the Pareto front (fewest bytes, then least memory, among equals). None when
    no trial completed."""
    from optuna.trial import TrialState

    if not multi:
        try:
            return study.best_trial
        except ValueError:  # no COMPLETE trial (all pruned or failed)
            return None
    front = [t for t in study.best_trials if t.state == TrialState.COMPLETE]
    if not front:
        return None
    return min(front, key=lambda t: (-t.values[0], *t.values[1:], t.number))


def pareto_rows(study, objectives, space) -> list[dict[str, Any]]:
    """The Pareto front as rows: trial number, each objective's value (bytes and memory in MB), the
    trial's values of the space; most accurate first."""
    rows = []
    for t in study.best_trials:
        row: dict[str, Any] = {"trial": t.number}
        for o, v in zip(objectives, t.values):
            row[COLUMN[o]] = shown(o, v)
        row.update(best_values(t, space))
        rows.append(row)
    rows.sort(key=lambda r: (-r[COLUMN["acc"]], r["trial"]))
    return rows



def pareto_table(rows) -> str:
    """The Pareto rows as a Markdown table."""
    if not rows:
        return "(empty Pareto front: no trial completed)"
    head = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    body = [[fmt(r.get(h, "")) for h in head] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def log_pareto(tracker, run_id: str, rows, objectives) -> None:
    """The front as pareto.md, pareto.csv and pareto.json artifacts, and its size as a metric."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    tracker.log_text(run_id, buf.getvalue(), "pareto.csv")
    tracker.log_text(run_id, pareto_table(rows) + "\n", "pareto.md")
    tracker.log_json(run_id, rows, "pareto.json")
    tracker.log_metrics(run_id, 0, {"pareto/size": float(len(rows))})


def best_values(trial, space) -> dict[str, Any]:
    """The best trial's values keyed by --set keys, read back from its stored params.

    `spaces.suggest` names each Optuna param by its --set key, so trial.params is already that."""
    return {k: trial.params[k] for k in space if k in trial.params} or dict(trial.params)


def log_figures(tracker, run_id: str, study, objectives=("acc",)) -> None:
    """Optuna's matplotlib figures as artifacts: optimization history, parameter importances and slice
    plots (of accuracy), and with several objectives the Pareto front. Skipped without matplotlib;
    a figure that cannot be drawn (importances need two completed trials) is left out."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as vis
    except Exception:
        return
    multi = len(objectives) > 1
    # Several objectives: history, importances and slices need one target; accuracy is the first.
    target = {"target": lambda t: t.values[0], "target_name": OBJECTIVE} if multi else {}
    plots = [("optimization_history", vis.plot_optimization_history, target),
             ("param_importances", vis.plot_param_importances, target),
             ("slice", vis.plot_slice, target)]
    if multi:
        plots.append(("pareto_front", vis.plot_pareto_front,
                      {"target_names": [COLUMN[o] for o in objectives],
                       "targets": lambda t: tuple(shown(o, v) for o, v in zip(objectives, t.values))}))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fname, plot, kwargs in plots:
            try:
                ax = plot(study, **kwargs)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                path = os.path.join(tmp, f"{fname}.png")
                fig.savefig(path, dpi=80, bbox_inches="tight")
                plt.close(fig)
                tracker.client.log_artifact(run_id, path, "figures")
            except Exception:  # too few trials for a figure, no params: nothing to draw
                plt.close("all")


class _DropInterrupts:
    """A logging filter: Optuna logs a trial stopped by Ctrl-C or SIGTERM as failed, with the
    KeyboardInterrupt's traceback; the CLI says it was interrupted in one line instead."""

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, KeyboardInterrupt) or cli.interrupt_requested():
            return False
        return True


def _quiet_interrupts(logger) -> None:
    """On the handlers of Optuna's library logger: records of its child loggers (where Optuna logs a
    failed trial) pass the handlers, not the parent logger's own filters."""
    for h in logger.handlers:
        if not any(isinstance(f, _DropInterrupts) for f in h.filters):
            h.addFilter(_DropInterrupts())


# -- several studies ------------------------------------------------------------------------------


def sweep(cfg, opts: SweepOptions, command: str = "", quiet: bool = True, datasets: dict | None = None,
          ) -> tuple[list[StudyOutcome], str | None]:
    """A study per method of the validated `cfg` (same trials, sampler seed, pruner), then the tuned
    preset. `datasets`: `{seed: FederatedDataset}` to use instead of loading (tests). Returns
    (outcomes, path of the tuned preset or None). Raises BenchError on bad input, every run ended."""
    from bench import experiment
    from bench.loop.backends import make_backend
    from bench.tracking import Tracker, check_store

    run = cfg.run
    if opts.trials < 1:
        raise BenchError(f"--trials must be >= 1, got {opts.trials}")
    if not run.val_frac > 0:
        raise BenchError(f"a sweep scores the validation split: --val-frac must be > 0, got {run.val_frac}")
    # Every check that needs no data or store comes first: nothing is recorded for bad input.
    parse_objectives(",".join(opts.objectives))
    make_pruner(opts.pruner, run.rounds, len(opts.objectives))
    for m in run.methods:
        method_space(cfg, m, opts)
    if opts.n_jobs < 1:
        raise BenchError(f"--n-jobs must be >= 1, got {opts.n_jobs}")
    if opts.n_jobs > 1 and run.backend != "ray":
        raise BenchError(f"--n-jobs {opts.n_jobs} runs trials at once on Ray actors; give --backend ray "
                         f"(the serial backend runs one trial at a time)")
    check_store(run.tracking_uri)  # an unreachable or read-only MLflow store: refused before any work
    storage = make_storage(opts.storage)
    real = experiment.load_checked(cfg) if datasets is None else datasets
    views = {s: validation_view(ds) for s, ds in real.items()}
    tracker = Tracker(run.tracking_uri, run.experiment)
    with cli.handlers_kept():  # ray.init on the main thread replaces SIGTERM's handler (exit 130, KILLED)
        backend = make_backend(run)
    outcomes = []
    try:
        parts = backend.split(opts.n_jobs) if opts.n_jobs > 1 else backend
        several = len(run.methods) > 1
        for m in run.methods:
            outcomes.append(run_study(cfg, m, opts, tracker, parts, views, real if opts.final_test else None,
                                      several, command, quiet, storage))
    finally:
        with cli.deferred_signals():  # a Ctrl-C inside ray.shutdown would leave Ray's processes behind
            backend.close()
    path = write_tuned(cfg, outcomes, opts.tuned_out)
    return outcomes, path


def tuned_path(dataset: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset.replace("npz:", "npz_").rsplit("/", 1)[-1])
    return os.path.join("configs", "tuned", f"{name}.toml")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def tuned_tables(outcomes) -> dict[str, dict[str, Any]]:
    """`{method: {field: best value}}`; `method_space` keeps every key under its method."""
    tables: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        table = tables.setdefault(o.method, {})
        for key, value in o.best_params.items():
            table[key.rpartition(".")[2]] = value
    return tables


def write_tuned(cfg, outcomes, path: str | None = None) -> str | None:
    """Write (or update) the tuned preset: `[run]` methods and dataset, one `[method]` table of best
    values per method. Tables of methods not swept this time are kept. None if no study has a best."""
    done = [o for o in outcomes if o.best_params]
    if not done:
        return None
    path = path or tuned_path(cfg.run.dataset)
    tables: dict[str, dict[str, Any]] = {}
    if os.path.exists(path):
        with open(path, "rb") as f:
            try:
                tables = {k: v for k, v in tomllib.load(f).items() if isinstance(v, dict)}
            except tomllib.TOMLDecodeError:
                tables = {}
    old_methods = list(tables.get("run", {}).get("methods", []))
    tables.update(tuned_tables(done))
    methods = list(dict.fromkeys(old_methods + [o.method for o in done]))
    tables["run"] = {**tables.get("run", {}), "methods": methods, "dataset": cfg.run.dataset}
    multi = any(len(o.objectives) > 1 for o in done)
    lines = ["# Best values of Optuna sweeps (python -m bench.sweep), objective acc/val (validation)"
             + ("; a multi-objective study gives its Pareto front's most accurate trial." if multi else "."),
             f"# Found with rounds={cfg.run.rounds}, clients={cfg.run.clients}, seeds="
             f"{','.join(map(str, cfg.run.seeds))}. Rerun on test: python -m bench.run --config {path}", ""]
    for section in ["run", *sorted(k for k in tables if k != "run")]:
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in tables[section].items()]
        lines.append("")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def format_outcomes(outcomes) -> str:
    rows = []
    for o in outcomes:
        best = "none completed" if o.best_value is None else f"{OBJECTIVE}={o.best_value:.4f}"
        test = "" if o.test_acc is None else f"  test acc/mean={o.test_acc:.4f}"
        vals = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in o.best_params.items())
        what = "most accurate on the Pareto front" if len(o.objectives) > 1 else "best"
        rows.append(f"{o.method}: study {o.study_name!r}, {o.trials} trials; {what} {best}{test}  [{vals}]")
        if len(o.objectives) > 1:
            rows += [f"Pareto front of {o.method} ({', '.join(o.objectives)}; validation, mean over seeds):",
                     pareto_table(o.pareto), ""]
    return "\n".join(rows)
