"""Checkpoints: everything the round loop carries between rounds, written atomically, so that an
interrupted run continues (`python -m bench.run --resume PARENT_RUN_ID`) with the numbers an
uninterrupted run has, bit for bit.

What a checkpoint holds (`LoopState`): the round reached, the server state, every client state the
client store holds (a client that has not trained yet reads as the store's default, then as now), the
bytes so far (`cumulative`), the memory bookkeeping (`peak_of`: each metered client's peak;
`trained`: the clients in some cohort so far), the history of metrics per round, the ledger, the
final per-client rows (once the last round is done) and the wall-clock seconds spent. The schedule
is not stored: it is a pure function of (seed, round) (engine.cohort_at), so the round is its
position. Every random stream is derived from (seed, purpose, round, client) (core/seeding.py), so
nothing else carries over between rounds.

File format (`FQCK1`; integers little-endian; no pickle anywhere, so loading runs no code):

    b"FQCK1\\n"                      magic, 6 bytes
    u64 n, n bytes                  meta: JSON (utf-8) of every field above but the states; floats
                                    are written as repr, which JSON reads back exactly (NaN too)
    u64 n, n bytes                  server state, encoded with bench/loop/wire.py (the wire codec)
    u64 count                       number of client states
    count x (i64 cid, u64 n, n bytes)  each client's state, wire-encoded, in the store's order
    b"FQCK-END"                     trailer: a file without it is damaged, never half-read

The client states are streamed one at a time, on writing and on reading, so a client store that
spills to disk is never loaded whole. wire.decode gives fresh contiguous tensors with the same dtype,
shape and values.

Where it lives: `checkpoint/latest.fqck` among the artifacts of the child run (one per method x
seed). With a local artifact store (the default `sqlite:///mlflow.db` keeps artifacts under
./mlruns) the file is written in place: a temporary file in the same directory, flushed and fsynced,
then `os.replace`d over the previous checkpoint, so a crash at any moment leaves the previous
checkpoint or the new one, whole. With a remote artifact store (an `mlflow server`) it is written the
same way into a local temporary directory and then uploaded with `MlflowClient.log_artifact`; the
upload replaces the file as atomically as that server's store does.

Lifetime: a checkpoint is overwritten by the next and removed once the invocation has FINISHED
(experiment.drop_checkpoints): nothing resumes a finished invocation, and a checkpoint holds every
client state. Only bench.run's comparisons write them; a sweep resumes trial by trial (Optuna).

Why not `torch.save` of one dict: it needs every client state in memory at once (a spilling store
would be loaded whole) and its file is a pickle; the wire codec already encodes a State exactly.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

from bench.loop import wire
from fedeq_bench.core.errors import BenchError

MAGIC = b"FQCK1\n"
TRAILER = b"FQCK-END"
FORMAT = "fedeq-bench checkpoint 1"
ARTIFACT_DIR = "checkpoint"
ARTIFACT_NAME = "latest.fqck"
ARTIFACT_PATH = f"{ARTIFACT_DIR}/{ARTIFACT_NAME}"


def due(rnd: int, rounds: int, every: int) -> bool:
    """A checkpoint after round `rnd`: every `every` rounds and after the last; never with every=0."""
    return every > 0 and (rnd % every == 0 or rnd == rounds)


@dataclass
class LoopState:
    """What engine.run_method carries from one round to the next (see the module docstring)."""

    round: int
    server: dict
    store: Mapping
    """The client store, read only through items() (a dict, or a store that spills to disk)."""
    cumulative: int
    peak_of: dict[int, int]
    trained: set[int]
    history: list[dict[str, float]]
    ledger: wire.Ledger
    clients: list[dict] | None
    """engine.client_rows of the final evaluation; None before the last round."""
    wall_s: float
    identity: dict = field(default_factory=dict)
    """method, seed, rounds, dataset_fingerprint: what a resumed run must match."""
    flops_of: dict = field(default_factory=dict)
    """("train" | "eval" | "unseen", client) -> its metered FLOPs (bench/loop/flops.py)."""


# -- the file -------------------------------------------------------------------------------------


def _meta(state: LoopState) -> bytes:
    meta = {
        "format": FORMAT, **state.identity, "round": state.round, "cumulative": state.cumulative,
        "peak_of": {str(c): int(v) for c, v in sorted(state.peak_of.items())},
        "flops_of": {f"{k}:{c}": int(v) for (k, c), v in sorted(state.flops_of.items())},
        "trained": sorted(int(c) for c in state.trained), "history": state.history,
        "ledger_csv": state.ledger.to_csv(), "clients": state.clients, "wall_s": state.wall_s,
    }
    return json.dumps(meta).encode()  # insertion order kept: a restored history reads as it was written


def write(path: str, state: LoopState) -> None:
    """Write `state` to `path` atomically: temp file in the same directory, fsync, os.replace.

    A crash (kill -9, power loss) at any point leaves `path` as it was (or absent) or the new file,
    whole; at worst a stray `.latest.fqck.*.tmp` is left beside it, which nothing reads.
    """
    from fedeq_bench.core.outputs import atomic_write

    # Temp file beside it, fsync, os.replace, then the folder synced (the rename itself durable, POSIX).
    atomic_write(Path(path), lambda f: _write_records(f, state))


def _write_records(f, state: LoopState) -> None:
    def blob(b: bytes) -> None:
        f.write(struct.pack("<Q", len(b)))
        f.write(b)

    f.write(MAGIC)
    blob(_meta(state))
    blob(wire.encode(state.server))
    # The count first: a store knows its size without loading its states.
    f.write(struct.pack("<Q", len(state.store)))
    written = 0
    for cid, client_state in state.store.items():
        f.write(struct.pack("<q", int(cid)))
        blob(wire.encode(client_state))
        written += 1
    if written != len(state.store):
        raise RuntimeError(f"client store yielded {written} states but has {len(state.store)}")
    f.write(TRAILER)


class Checkpoint:
    """A checkpoint file, checked whole when opened; the states are decoded only when asked for."""

    downloads: tempfile.TemporaryDirectory[str]
    """Set only on a checkpoint downloaded from a remote artifact store (`RunCheckpoints.load`): the
    local copy's folder, removed once this object is."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                if f.read(len(MAGIC)) != MAGIC:
                    raise ValueError("not a fedeq-bench checkpoint (bad magic)")
                self.meta = json.loads(self._blob(f))
                self._server_at = f.tell()
                self._skip(f)
                (count,) = struct.unpack("<Q", self._exact(f, 8))
                self._clients_at = f.tell()
                for _ in range(count):
                    self._exact(f, 8)
                    self._skip(f)
                if f.read(len(TRAILER) + 1) != TRAILER:
                    raise ValueError("no end marker: the file is truncated or has trailing bytes")
        except FileNotFoundError:
            raise BenchError(f"checkpoint {path} not found") from None
        except (OSError, ValueError, struct.error) as e:  # json's errors are ValueErrors
            raise BenchError(f"checkpoint {path} is damaged ({e})") from None
        self.count = count
        if self.meta.get("format") != FORMAT:
            raise BenchError(f"checkpoint {path} has format {self.meta.get('format')!r}, not {FORMAT!r}")

    @staticmethod
    def _exact(f, n: int) -> bytes:
        b = f.read(n)
        if len(b) != n:
            raise ValueError("truncated")
        return b

    def _blob(self, f) -> bytes:
        (n,) = struct.unpack("<Q", self._exact(f, 8))
        return self._exact(f, n)

    def _skip(self, f) -> None:
        (n,) = struct.unpack("<Q", self._exact(f, 8))
        f.seek(n, os.SEEK_CUR)

    @property
    def round(self) -> int:
        return int(self.meta["round"])

    def server(self) -> dict:
        with open(self.path, "rb") as f:
            f.seek(self._server_at)
            return wire.decode(self._blob(f))

    def clients(self) -> Iterator[tuple[int, dict]]:
        """(cid, state) for every client, in the order they were written, one at a time."""
        with open(self.path, "rb") as f:
            f.seek(self._clients_at)
            for _ in range(self.count):
                (cid,) = struct.unpack("<q", self._exact(f, 8))
                yield cid, wire.decode(self._blob(f))

    def history(self) -> list[dict[str, float]]:
        return [{k: float(v) for k, v in h.items()} for h in self.meta["history"]]

    def ledger(self) -> wire.Ledger:
        return wire.Ledger(wire.from_csv(self.meta["ledger_csv"]))

    def check(self, **identity) -> None:
        """Refuse a checkpoint of another method, seed, horizon or dataset: one line naming the field."""
        for k, v in identity.items():
            if self.meta.get(k) != v:
                raise BenchError(f"checkpoint {self.path} is for {k}={self.meta.get(k)!r}, this run has {k}={v!r}")

    def restore(self, store: MutableMapping, result, train_ids, **identity) -> LoopState:
        """Put every checkpointed client state into `store` and the history, ledger and client rows
        into `result`; return the loop's state after the checkpointed round (`store` is the one given).

        Only the states the store held are in the file (a ClientStore keeps a client's state once it
        has trained); the others read as the store's default, as they did when it was written.
        """
        self.check(**identity)
        ids = set(train_ids)
        for cid, state in self.clients():
            if cid not in ids:
                raise BenchError(f"checkpoint {self.path} has client {cid}, which is not a training client here")
            store[cid] = state
        m = self.meta
        result.history = self.history()
        result.ledger = self.ledger()
        if m["clients"] is not None:
            result.clients = m["clients"]
        return LoopState(round=self.round, server=self.server(), store=store, cumulative=int(m["cumulative"]),
                         peak_of={int(c): int(v) for c, v in m["peak_of"].items()}, trained=set(m["trained"]),
                         history=result.history, ledger=result.ledger, clients=m["clients"],
                         wall_s=float(m["wall_s"]), identity=identity,
                         flops_of={(k, int(c)): int(v) for key, v in m.get("flops_of", {}).items()
                                   for k, _, c in [key.partition(":")]})


# -- in MLflow ------------------------------------------------------------------------------------


class RunCheckpoints:
    """The checkpoint of one MLflow run: `checkpoint/latest.fqck` among its artifacts."""

    def __init__(self, client, run_id: str):
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
        from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

        self.client, self.run_id = client, run_id
        repo = get_artifact_repository(client.get_run(run_id).info.artifact_uri, tracking_uri=client.tracking_uri)
        # A local artifact store: write in place (atomically). Anything else: stage, then upload.
        self.local = repo.artifact_dir if isinstance(repo, LocalArtifactRepository) else None

    def save(self, state: LoopState) -> None:
        if self.local is not None:
            write(os.path.join(self.local, ARTIFACT_DIR, ARTIFACT_NAME), state)
            return
        with tempfile.TemporaryDirectory(prefix="fedeq-ckpt-") as d:
            path = os.path.join(d, ARTIFACT_NAME)
            write(path, state)
            self.client.log_artifact(self.run_id, path, ARTIFACT_DIR)

    def remove(self) -> None:
        """Delete the run's checkpoint (a store that cannot delete artifacts keeps it)."""
        if self.local is not None:
            folder = os.path.join(self.local, ARTIFACT_DIR)
            for name in os.listdir(folder) if os.path.isdir(folder) else ():
                if name == ARTIFACT_NAME or (name.startswith(f".{ARTIFACT_NAME}.") and name.endswith(".tmp")):
                    os.remove(os.path.join(folder, name))
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
            return
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        try:
            get_artifact_repository(self.client.get_run(self.run_id).info.artifact_uri,
                                    tracking_uri=self.client.tracking_uri).delete_artifacts(ARTIFACT_DIR)
        except Exception:  # noqa: BLE001 - many artifact stores cannot delete; the file is only dead weight
            pass

    def load(self) -> Checkpoint | None:
        """The run's checkpoint, or None if it has none (stopped before its first one)."""
        if self.local is not None:
            path = os.path.join(self.local, ARTIFACT_DIR, ARTIFACT_NAME)
            return Checkpoint(path) if os.path.exists(path) else None
        if ARTIFACT_PATH not in {a.path for a in self.client.list_artifacts(self.run_id, ARTIFACT_DIR)}:
            return None
        downloads = tempfile.TemporaryDirectory(prefix="fedeq-ckpt-")
        ck = Checkpoint(self.client.download_artifacts(self.run_id, ARTIFACT_PATH, downloads.name))
        ck.downloads = downloads  # the local copy lives (and is removed) with the Checkpoint that reads it
        return ck


def identity(method: str, seed: int, rounds: int, fingerprint: str) -> dict:
    """The fields a checkpoint and the run resuming from it must agree on."""
    return {"method": method, "seed": int(seed), "rounds": int(rounds), "dataset_fingerprint": fingerprint}

