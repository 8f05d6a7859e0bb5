"""What a report is made of: the runs read back from MLflow, and the tables and figures built from them.

This module is the contract between the report's parts: `collect` fills `ReportData` from an MLflow
store (its client only: no torch, no engine), `tables` turns it into `Table`s, `figures` into figure
specs, and `markdown` / `html` write them out. Nothing here reads MLflow or draws anything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunRecord:
    """One child run (one method x seed), as MLflow holds it."""

    run_id: str
    parent_id: str
    method: str
    seed: int
    status: str
    """FINISHED, FAILED, KILLED, RUNNING, or PRUNED (KILLED with the tag `pruned=true`)."""
    dataset: str
    """The `dataset` param (`synthetic`, `fmnist`, `npz:/path/file.npz`)."""
    partition: str
    """The dataset's partition description (the `partition` param)."""
    fingerprint: str
    """The `dataset_fingerprint` param: equal fingerprints, identical client data."""
    model: str
    params: dict[str, str]
    """Every param of the child run (the method's resolved config, params/shared, params/personal...)."""
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """metric name -> [(round, value)], sorted by round (MLflow step = round)."""
    clients: list[dict[str, Any]] | None = None
    """The final evaluation per client, from the run's `clients.csv` artifact: dicts with `cid` (int),
    `group` (`train`, `never_trained` or `unseen`), `test_acc`, `test_n`, `val_acc`, `val_n`
    (numbers). None when the run has no such artifact (an older or unfinished run)."""
    start_ms: int | None = None
    end_ms: int | None = None
    diverged: str = ""
    """Why the run diverged (its `diverged` tag: a FAILED run `--keep-going` went past); "" otherwise."""
    base: str = ""
    """The registered method (`fedrep`); `method` is the row's name, `fedrep@int8` when the run's
    messages travelled in another wire format than fp32 (its `wire` param). Empty: `method`."""

    @property
    def registered(self) -> str:
        return self.base or self.method

    def final(self, name: str) -> float:
        """The metric's value at its last logged round; nan when never logged."""
        h = self.history.get(name)
        return h[-1][1] if h else math.nan

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """(rounds, values) of a metric; empty lists when never logged."""
        h = self.history.get(name, [])
        return [r for r, _ in h], [v for _, v in h]


@dataclass
class Provenance:
    """One parent run (one `bench.run` invocation): what produced the numbers under it."""

    run_id: str
    name: str
    status: str
    command: str
    """The exact command line recorded by the invocation (the `command` param)."""
    git_commit: str
    config: dict[str, str]
    """The resolved config: every param of the parent run."""
    versions: dict[str, str]
    """Package versions (`version.*` params: python, torch, numpy, mlflow, ray, optuna, fedeq-bench)."""
    start_ms: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """The parent run's metrics, latest values (a sweep's `best/value`, `best/test_acc`; none for a comparison)."""


@dataclass
class Group:
    """The runs of one dataset and partition: what one comparison table covers."""

    dataset: str
    partition: str
    runs: list[RunRecord]
    seeds: list[int]
    """Every seed some run of this group used (a method missing one of them is said to)."""
    methods: list[str]
    """Methods in first-seen order."""
    label: str = ""
    """What sets this group apart from the other groups of its dataset and partition (`rounds=2`,
    `config configs/tuned/synthetic.toml; fedrep.lr=0.01`); empty when it is the only one."""
    config: dict[str, str] = field(default_factory=dict)
    """The comparable config its runs share (collect.comparable_config: everything that changes results,
    seed aside): run and dataset keys, and each method's own keys."""
    verdict: str = ""
    """The answer at a glance (verdict.verdict), shown above the tables; empty for a sweep."""

    @property
    def title(self) -> str:
        """`dataset / partition`, with the label in brackets when there is one."""
        return f"{self.dataset} / {self.partition}" + (f" [{self.label}]" if self.label else "")


@dataclass
class ReportData:
    name: str
    experiment: str
    tracking_uri: str
    parents: list[Provenance]
    groups: list[Group]
    images: dict[str, bytes] = field(default_factory=dict)
    """A sweep: Optuna's figures as its parent run logged them (`figures/<name>.png`), name -> PNG
    bytes, from the newest parent run that logged any; empty for a comparison."""


@dataclass
class Image:
    """A picture drawn elsewhere and shown as it is (a sweep's Optuna figures, PNG), or, with no
    picture, the sentence saying why it is absent. Figures the report draws itself are `figures.Figure`."""

    name: str
    """File-name stem and HTML id part (optimization_history, param_importances, slice, pareto_front)."""
    title: str
    png: bytes | None = None
    note: str = ""
    """Without a picture: why it is absent (one sentence)."""


@dataclass
class Cell:
    """One table cell: its text, the number behind it (None for text cells), whether it is the best
    value of its column."""

    text: str
    value: float | None = None
    best: bool = False


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)
    """Footnotes: what mean +- std means, which seeds are missing, which runs failed."""
