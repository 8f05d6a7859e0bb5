"""Optuna sweeps: one study per method, every trial a child MLflow run, scored on validation only.

    cfg = experiment.validate(config.from_cli(None, {"methods": "fedeq", "backend": "serial"}, []))
    outcomes = study.sweep(cfg, study.SweepOptions(trials=20, params=("fedeq.rho",)))

What a sweep does, and why:

- **Storage and resume.** One Optuna study per method in an RDB storage (`sqlite:///optuna.db` by
  default), opened with `load_if_exists=True`: the same command resumes, and only the trials still
  missing are run (`trials` minus the COMPLETE and PRUNED ones already stored; FAIL ones are redone).
  The storage must be an Optuna study store or a new file (`storage.check_storage`). A study is its
  search space and fixed config, stored on it when it is created: a resume with another one is
  refused, naming each key that differs (bench/tuning/identity.py). Each trial records its owner
  process (host, pid, start time) when it starts; on resume a RUNNING trial whose owner on this host
  is gone (kill -9) is marked FAIL at once, and Optuna's heartbeat fails the rest of the dead ones
  (another host's, say) once their heartbeat is `GRACE_S` old (Optuna also checks that before each
  new trial); their MLflow runs, left RUNNING by the dead process, are ended FAILED (`end_orphans`).
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
  seed (child runs tagged `kind=best-test`), and the mean final `acc/weighted` and `acc/mean` are
  logged on the study's parent run as `best/test_acc_weighted` (the headline, as in every report)
  and `best/test_acc` (never used to choose anything).
- **Equal budgets.** Several methods: one study each, with the same number of trials, sampler seed
  and pruner; `presets.write` writes every method's best values as `[method]` tables of a preset that
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

import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bench import cli
from bench.tuning import identity, presets
from bench.tuning.objectives import (
    OBJECTIVE,
    OBJECTIVES,
    TEST_METRICS,
    objective_values,
    parse_objectives,
    validation_view,
)
from bench.tuning.pareto import log_figures, log_pareto, pareto_rows, pareto_table
from bench.tuning.storage import (
    _quiet_interrupts,
    best_values,
    chosen_trial,
    counted,
    end_orphans,
    make_pruner,
    make_storage,
    run_trials,
)
from fedeq_bench.core.errors import BenchError, choices

if TYPE_CHECKING:
    from bench.loop.backends import Backend
    from bench.loop.ray_backend import RayBackend


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
    """Rerun the best trial's values once on the test split (best/test_acc_weighted, best/test_acc)."""
    tuned_out: str | None = None
    """Where the tuned preset goes; None: configs/tuned/<dataset>.toml."""
    force: bool = False
    """Replace a file at `tuned_out` that is not a tuned preset (`--force`); never a folder, device or link."""
    figures: bool = True
    """Optuna's matplotlib figures as artifacts of the parent run (skipped without matplotlib)."""
    configs: tuple[str, ...] = ()
    """The `--config` files the sweep's fixed settings came from: the tuned preset's rerun command
    layers them first, so that it reruns the setting the values were tuned in."""


@dataclass
class StudyOutcome:
    method: str
    study_name: str
    parent_run_id: str
    best_value: float | None
    best_params: dict[str, Any]
    test_acc: float | None
    """The best values rerun on test: mean over seeds of the final acc/mean (best/test_acc)."""
    trials: int
    """Trials the study holds in COMPLETE or PRUNED state."""
    objectives: tuple[str, ...] = ("acc",)
    pareto: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Several objectives: the Pareto front, one row per trial (`pareto_rows`), most accurate first."""
    test_weighted: float | None = None
    """The same rerun's mean final acc/weighted (best/test_acc_weighted), the headline of every report."""


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


def study_name_for(opts: SweepOptions, method: str, dataset: str, several: bool) -> str:
    """`<method>-<dataset>` (`-acc-bytes` appended for several objectives: a study's directions are
    fixed when it is created), or `--study-name` (`<name>-<method>` with several methods)."""
    if opts.study_name is None:
        suffix = "" if opts.objectives == ("acc",) else "-" + "-".join(opts.objectives)
        return f"{method}-{dataset}{suffix}"
    return f"{opts.study_name}-{method}" if several else opts.study_name


def study_identity(cfg, method: str, opts: SweepOptions) -> tuple[dict[str, str], dict[str, dict]]:
    """(fixed config, search space) that define `method`'s study (bench/tuning/identity.py)."""
    from bench import config as C

    space = method_space(cfg, method, opts)
    flat = C.flatten(C.apply(cfg, {"methods": method}), [method], cfg.run.dataset.split(":")[0])
    return identity.fixed_config(flat, space, opts.objectives), identity.space_record(space)


def check_directions(study, opts: SweepOptions) -> None:
    """A study's directions are fixed when it is created: other objectives are refused in one line."""
    if [d.name.lower() for d in study.directions] != [OBJECTIVES[o][1] for o in opts.objectives]:
        raise BenchError(f"study {study.study_name!r} in {opts.storage} was created for other objectives "
                         f"({', '.join(d.name.lower() for d in study.directions)}); give another --study-name")


def check_resumable(cfg, opts: SweepOptions, storage) -> None:
    """Before any work: refuse, in one line, to resume a study of any method that was made with another
    search space or fixed config (`identity.check_or_record` checks again, and records, when it runs)."""
    import optuna

    for m in cfg.run.methods:
        name = study_name_for(opts, m, cfg.run.dataset.split(":")[0], len(cfg.run.methods) > 1)
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:  # a new study
            continue
        check_directions(study, opts)
        diffs = identity.mismatch(study, *study_identity(cfg, m, opts))
        if diffs:
            raise identity.refusal(study, diffs, opts.storage)


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
    storage = make_storage(opts.storage, tracking_uri=run.tracking_uri) if storage is None else storage
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
    check_directions(study, opts)
    identity.check_or_record(study, *study_identity(cfg, method, opts), opts.storage)
    end_orphans(tracker, study, name)
    base = C.apply(cfg, {"methods": method})
    backends: queue.SimpleQueue[Backend] = queue.SimpleQueue()
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
            identity.record_owner(trial)  # so a resume fails this trial at once if this process dies
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

                # On the validation view the test-named metrics would be validation figures: not logged.
                tt = tracker.scoped(f"trial {trial.number} ", trial_params, trial_tags, drop=TEST_METRICS)
                results.append(experiment.run_one(tcfg, tt, parent, b, method, s, views[s], quiet=True,
                                                  on_round=on_round))
            scores = objective_values(results, objectives)
            if math.isnan(scores[0]):
                raise BenchError(f"{OBJECTIVE} is nan (no client has a validation split; raise --val-frac)")
            return tuple(scores) if multi else scores[0]

        run_trials(study, objective, opts.trials, opts.n_jobs)
        end_orphans(tracker, study, name)

        best_value, best_params, test_acc, test_weighted, pareto = None, {}, None, None, []
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
                                | ({f"best/{o}": float(v) for o, v in zip(objectives, best.values, strict=True)} if multi else {}))
            if opts.final_test and real is not None:
                bcfg = C.apply(base, best_params)
                bt = tracker.scoped("best ", {"trial_number": str(best.number)}, {"kind": "best-test", "study": name})
                b = backends.get()
                try:
                    finals = [experiment.run_one(bcfg, bt, parent, b, method, s, real[s], quiet=True).final
                              for s in run.seeds]
                finally:
                    backends.put(b)
                test_acc = sum(f["acc/mean"] for f in finals) / len(finals)
                test_weighted = sum(f["acc/weighted"] for f in finals) / len(finals)
                tracker.log_metrics(parent, 0, {"best/test_acc": test_acc, "best/test_acc_weighted": test_weighted})
        if opts.figures:
            log_figures(tracker, parent, study, objectives)
    return StudyOutcome(method, name, parent, best_value, best_params, test_acc, counted(study), objectives,
                        pareto, test_weighted)


def sweep(cfg, opts: SweepOptions, command: str = "", quiet: bool = True, datasets: dict | None = None,
          ) -> tuple[list[StudyOutcome], str | None]:
    """A study per method of the validated `cfg` (same trials, sampler seed, pruner), then the tuned
    preset. `datasets`: `{seed: FederatedDataset}` to use instead of loading (tests). Returns
    (outcomes, path of the tuned preset or None). Raises BenchError on bad input, every run ended."""
    from bench import experiment
    from bench.experiment.load import make_backend
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
    presets.check_out(opts.tuned_out or presets.default_path(run.dataset), opts.force)  # before any trial
    storage = make_storage(opts.storage, tracking_uri=run.tracking_uri)  # an Optuna store or a new file
    check_resumable(cfg, opts, storage)  # a study made with other settings: refused before any data or run
    real = experiment.load_checked(cfg) if datasets is None else datasets
    views = {s: validation_view(ds) for s, ds in real.items()}
    tracker = Tracker(run.tracking_uri, run.experiment)
    with cli.handlers_kept():  # ray.init on the main thread replaces SIGTERM's handler (exit 130, KILLED)
        backend = make_backend(run)
    outcomes = []
    try:
        parts: Backend | list[RayBackend] = backend
        if opts.n_jobs > 1:
            from bench.loop.ray_backend import RayBackend

            assert isinstance(backend, RayBackend)  # --n-jobs > 1 needs --backend ray (checked above)
            parts = backend.split(opts.n_jobs)
        several = len(run.methods) > 1
        for m in run.methods:
            outcomes.append(run_study(cfg, m, opts, tracker, parts, views, real if opts.final_test else None,
                                      several, command, quiet, storage))
    finally:
        with cli.deferred_signals():  # a Ctrl-C inside ray.shutdown would leave Ray's processes behind
            backend.close()
    path = presets.write(cfg, outcomes, opts.tuned_out, opts.force, opts.configs)
    return outcomes, path


def format_outcomes(outcomes) -> str:
    rows = []
    for o in outcomes:
        best = "none completed" if o.best_value is None else f"{OBJECTIVE}={o.best_value:.4f}"
        test = "" if o.test_acc is None else f"  test acc/weighted={o.test_weighted:.4f} acc/mean={o.test_acc:.4f}"
        vals = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in o.best_params.items())
        what = "most accurate on the Pareto front" if len(o.objectives) > 1 else "best"
        rows.append(f"{o.method}: study {o.study_name!r}, {o.trials} trials; {what} {best}{test}  [{vals}]")
        if len(o.objectives) > 1:
            rows += [f"Pareto front of {o.method} ({', '.join(o.objectives)}; validation, mean over seeds):",
                     pareto_table(o.pareto), ""]
    return "\n".join(rows)
