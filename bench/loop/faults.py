"""What a Ray pool does when a worker goes wrong: an actor that dies, a node that runs other code.

An actor dies mid-call when it is killed (`ray.kill`, kill -9 of its process, the kernel's or Ray's
out-of-memory killer) or its node goes away. RayBackend (bench/loop/backends.py) then starts a fresh
actor (same resources, same dataset) and redoes the lost chunk's jobs. A job carries everything a
client needs (the encoded downlink and the state the engine owns), so the redo gives the same bits
as an undisturbed run. A chunk of several clients that kills its actor is redone one client per
call, so a client whose own work keeps killing its actor is named: after MAX_ACTOR_RETRIES redos the
run fails with `fedavg: round 2, client 3: its local update killed its Ray actor 4 times (out of memory?)`.

An actor can also die while the pool starts, before it answers its first call (killed, or out of
memory while it imports torch): `greet` replaces it the same way, and names the place after
MAX_ACTOR_RETRIES deaths there.

Every actor also says which fedeq-bench it runs when it starts (`project_version`); a worker whose
version differs from the driver's is refused with one line. A stale node would otherwise break
Serial == Ray silently: the driver's and the workers' code would disagree on what a client does.
"""
from __future__ import annotations

import os
from collections import Counter

from fedeq_bench.core.errors import BenchError

MAX_ACTOR_RETRIES = 3
"""How many times one client's work is redone on a fresh actor after a call holding it killed its
actor; one more death fails the run. Raising it survives flakier nodes, at the cost of starting that
many more actors (a second or more each) before a client that always runs out of memory is named."""

ACTOR_START_TIMEOUT_S = 120.0
"""How long a replacement actor may take to start (schedule, import, load the dataset). On a cluster
that lost a node it may never fit: the pool then goes on with the actors it still has."""

VERSION_ENV = "FEDEQ_BENCH_VERSION"
"""When set, the version this process reports instead of its git commit: for an install without
`.git` (a container image built from a copy of the checkout) that still wants to name its commit."""


def actor_deaths() -> tuple[type[BaseException], ...]:
    """The exceptions `ray.get` raises for a call whose actor died (or stopped answering) mid-call.

    RayActorError covers ActorDiedError and ActorUnavailableError; WorkerCrashedError and
    OutOfMemoryError are what Ray raises when the process running the call was lost.
    """
    import ray.exceptions as rx

    return (rx.RayActorError, rx.WorkerCrashedError, rx.OutOfMemoryError)


def project_version() -> str:
    """Which fedeq-bench this process runs: $FEDEQ_BENCH_VERSION when set, else the git commit of the
    checkout it was imported from (`-dirty` with uncommitted changes), else the installed version."""
    if os.environ.get(VERSION_ENV):
        return os.environ[VERSION_ENV]
    from bench.tracking import git_commit

    commit = git_commit()
    if commit != "unknown":
        return commit
    from importlib import metadata

    try:
        return metadata.version("fedeq-bench")
    except metadata.PackageNotFoundError:
        return "unknown"


def check_version(driver: str, report: dict) -> None:
    """Refuse a worker (its `Worker.hello()` report) that runs another fedeq-bench than the driver."""
    if report["version"] != driver:
        raise BenchError(f"Ray worker on node {report['node']} runs fedeq-bench {report['version']}, the driver "
                         f"{driver}; install the same commit on every node")


def killed(what: str, deaths: int) -> str:
    """A client's error when its work killed its actor once more than MAX_ACTOR_RETRIES allows."""
    return f"its {what} killed its Ray actor {deaths} times (out of memory?)"


def greet(actors: list, spawn) -> tuple[list, list[dict]]:
    """(actors, their `hello()` reports) of a starting pool, in the order given. An actor that dies
    before it answers is killed for good and replaced by `spawn()`; one more death than
    MAX_ACTOR_RETRIES at the same place fails the start with one line, every actor stopped."""
    import ray

    actors = list(actors)
    reports: list = [None] * len(actors)
    deaths: Counter[int] = Counter()
    pending = {actor.hello.remote(): i for i, actor in enumerate(actors)}
    try:
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ref)
            try:
                reports[i] = ray.get(ref)
                continue
            except actor_deaths():
                deaths[i] += 1
            ray.kill(actors[i])  # an unavailable actor might come back; it must not serve anyone
            if deaths[i] > MAX_ACTOR_RETRIES:
                raise BenchError(f"a Ray actor died {deaths[i]} times before it could start (killed, or out of "
                                 f"memory while importing torch?); see the worker logs (`ray logs`)")
            actors[i] = spawn()
            pending[actors[i].hello.remote()] = i
    except BaseException:
        for actor in actors:
            ray.kill(actor)
        raise
    return actors, reports
