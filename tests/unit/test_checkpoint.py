"""bench/loop/checkpoint.py: the file round-trips every state and number, a kill mid-write leaves the
previous checkpoint whole, a damaged or foreign file is refused in one line, and every method resumed
from a checkpoint continues with the numbers of an uninterrupted run, bit for bit."""
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from bench.experiment import load_dataset
from bench.loop import checkpoint, engine, wire
from bench.loop.backends import SerialBackend
from fedeq_bench.core.errors import BenchError
from fedeq_bench.methods import METHODS
from tests.helpers import tiny_config, write_tiny_npz

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Metrics that measure the machine, not the algorithm: they differ between any two runs.
MACHINE_METRICS = {"time/round_s", "mem/peak_rss_bytes"}


def loop_state(rnd=2, store=None):
    g = torch.Generator().manual_seed(0)
    ledger = wire.Ledger()
    ledger.record(1, 0, "down", b"x" * 10, ["body.w"])
    ledger.record(1, 0, "up", b"x" * 12, ["body.w", "num_samples"])
    store = store if store is not None else {
        0: {"head.w": torch.randn(3, 4, generator=g), "dual": torch.randn(4, generator=g, dtype=torch.float64)},
        3: {},  # a method whose clients keep nothing (FedAvg)
        5: {"head.w": torch.randn(3, 4, generator=g).bfloat16(), "steps": torch.tensor(7)},
    }
    return checkpoint.LoopState(
        round=rnd, server={"body.w": torch.randn(4, 4, generator=g), "count": torch.tensor([1, 2], dtype=torch.int32)},
        store=store, cumulative=22, peak_of={0: 1000, 5: 1200}, trained={0, 5},
        history=[{"loss/train": 0.1 + 0.2, "acc/val": float("nan")}, {"loss/train": 1 / 3}],
        ledger=ledger, clients=None, wall_s=1.25,
        identity=checkpoint.identity("fedavg", 0, 6, "abc"))


def test_due_every_n_rounds_and_after_the_last_never_with_zero():
    assert [r for r in range(1, 6) if checkpoint.due(r, 5, 2)] == [2, 4, 5]   # 2, 4, and the last
    assert [r for r in range(1, 31) if checkpoint.due(r, 30, 10)] == [10, 20, 30]
    assert not any(checkpoint.due(r, 5, 0) for r in range(1, 6))


def test_write_then_read_gives_back_every_state_and_number(tmp_path):
    st = loop_state()
    path = str(tmp_path / "ck" / "latest.fqck")
    checkpoint.write(path, st)
    ck = checkpoint.Checkpoint(path)
    assert ck.round == 2 and ck.count == 3
    server = ck.server()
    assert set(server) == {"body.w", "count"}
    for k in server:
        assert server[k].dtype == st.server[k].dtype and torch.equal(server[k], st.server[k])
    got = dict(ck.clients())
    assert list(got) == [0, 3, 5] and got[3] == {}
    for cid, state in st.store.items():
        for k, t in state.items():
            assert got[cid][k].dtype == t.dtype and torch.equal(got[cid][k], t)
    h = ck.history()
    assert h[0]["loss/train"] == 0.1 + 0.2 and h[1]["loss/train"] == 1 / 3   # exact: floats written as repr
    assert math.isnan(h[0]["acc/val"])
    assert ck.ledger().entries == st.ledger.entries
    assert ck.meta["peak_of"] == {"0": 1000, "5": 1200} and ck.meta["trained"] == [0, 5]
    assert (ck.meta["cumulative"], ck.meta["wall_s"], ck.meta["method"]) == (22, 1.25, "fedavg")
    assert os.listdir(tmp_path / "ck") == ["latest.fqck"]  # no temporary file left behind


KILL_MID_WRITE = textwrap.dedent("""
    import os, signal, sys
    from collections.abc import Mapping
    import torch
    sys.path.insert(0, {root!r})
    from bench.loop import checkpoint
    from tests.unit.test_checkpoint import loop_state

    path = {path!r}
    checkpoint.write(path, loop_state(rnd=2))

    class DiesOnTheSecondClient(Mapping):
        # 1 MB for client 0 (past any write buffer: its bytes reach the temp file), then kill -9.
        def __len__(self):
            return 2
        def __iter__(self):
            return iter([0, 1])
        def __getitem__(self, cid):
            if cid == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return {{"w": torch.zeros(256 * 1024)}}

    checkpoint.write(path, loop_state(rnd=4, store=DiesOnTheSecondClient()))
""")


def test_a_kill_mid_write_leaves_the_previous_checkpoint_whole(tmp_path):
    path = str(tmp_path / "latest.fqck")
    script = KILL_MID_WRITE.format(root=ROOT, path=path)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # The round-4 write died half way: its temporary file is there, with the bytes written so far ...
    (tmp,) = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert os.path.getsize(tmp_path / tmp) > 256 * 1024 * 4
    with pytest.raises(BenchError, match="damaged"):
        checkpoint.Checkpoint(str(tmp_path / tmp))
    # ... and the checkpoint is still round 2's, whole.
    ck = checkpoint.Checkpoint(path)
    assert ck.round == 2 and [cid for cid, _ in ck.clients()] == [0, 3, 5]
    assert torch.equal(ck.server()["body.w"], loop_state().server["body.w"])


def test_a_damaged_or_foreign_file_is_refused_in_one_line(tmp_path):
    path = str(tmp_path / "latest.fqck")
    checkpoint.write(path, loop_state())
    whole = open(path, "rb").read()
    for cut in (len(whole) - 1, len(whole) // 2, 10):
        with open(path, "wb") as f:
            f.write(whole[:cut])
        with pytest.raises(BenchError, match=r"is damaged \(") as e:
            checkpoint.Checkpoint(path)
        assert "\n" not in str(e.value)
    with open(path, "wb") as f:
        f.write(whole + b"x")
    with pytest.raises(BenchError, match="trailing bytes"):
        checkpoint.Checkpoint(path)
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04" + whole)
    with pytest.raises(BenchError, match="not a fedeq-bench checkpoint"):
        checkpoint.Checkpoint(path)
    with pytest.raises(BenchError, match="not found"):
        checkpoint.Checkpoint(str(tmp_path / "absent.fqck"))


def test_a_checkpoint_of_another_method_seed_or_dataset_is_refused(tmp_path):
    path = str(tmp_path / "latest.fqck")
    checkpoint.write(path, loop_state())
    ck = checkpoint.Checkpoint(path)
    ck.check(**checkpoint.identity("fedavg", 0, 6, "abc"))
    for other, field in ((("fedrep", 0, 6, "abc"), "method"), (("fedavg", 1, 6, "abc"), "seed"),
                         (("fedavg", 0, 8, "abc"), "rounds"), (("fedavg", 0, 6, "xyz"), "dataset_fingerprint")):
        with pytest.raises(BenchError, match=f"is for {field}="):
            ck.check(**checkpoint.identity(*other))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_npz(tmp_path_factory.mktemp("d") / "tiny.npz", clients=6)


def comparable(res):
    """What must be bit-identical between a resumed and an uninterrupted run."""
    history = [{k: v for k, v in h.items() if k not in MACHINE_METRICS} for h in res.history]
    return history, res.ledger.entries, res.clients


@pytest.mark.parametrize("method, budget", [(m, None) for m in METHODS.names()] +
                         [(m, 0.0) for m in ("ditto", "fedeq", "fedrep")])
def test_every_method_resumed_from_a_checkpoint_equals_the_uninterrupted_run(tiny, tmp_path, method, budget):
    # 3 rounds, half the clients per round (so some are never sampled before the end), a held-out
    # client, evaluation every 2 rounds: a checkpoint after each round, then resume from rounds 1 and 2.
    # budget 0: every client state lives on disk (bench/loop/store.py), is written from there and restored there.
    cfg = tiny_config(tiny, methods=method, rounds=3, fraction=0.5, frac_unseen=0.2, eval_every=2,
                      checkpoint_every=1, state_budget_gb=budget)
    ds = load_dataset(cfg, 0)
    paths = {}

    def save(state):
        paths[state.round] = str(tmp_path / f"round{state.round}.fqck")
        checkpoint.write(paths[state.round], state)

    whole = engine.run_method(cfg, method, 0, ds, SerialBackend(), on_checkpoint=save)
    assert sorted(paths) == [1, 2, 3]
    for k in (1, 2, 3):
        seen = []
        resumed = engine.run_method(cfg, method, 0, ds, SerialBackend(), resume=checkpoint.Checkpoint(paths[k]),
                                    on_round=lambda rnd, m, seen=seen: seen.append(rnd))
        assert seen == list(range(k + 1, 4))  # only the rounds after the checkpoint run again
        got, want = comparable(resumed), comparable(whole)
        # NaN != NaN: compare the reprs, which are equal exactly when the floats are.
        assert repr(got) == repr(want), (method, k)


def test_a_checkpoint_from_before_flops_were_counted_resumes_and_meters_again(tiny, tmp_path):
    """A checkpoint written before FLOPs were counted has memory peaks but no `flops_of` (as if
    written with an empty one): the resumed run meters its clients' next update again rather than
    failing, and logs compute/* from there on."""
    import dataclasses

    cfg = tiny_config(tiny, methods="fedavg", rounds=2, fraction=0.5, checkpoint_every=1)
    ds = load_dataset(cfg, 0)
    path = str(tmp_path / "old.fqck")
    engine.run_method(cfg, "fedavg", 0, ds, SerialBackend(), on_checkpoint=lambda s: s.round == 1 and checkpoint.write(
        path, dataclasses.replace(s, flops_of={})))
    resumed = engine.run_method(cfg, "fedavg", 0, ds, SerialBackend(), resume=checkpoint.Checkpoint(path))
    assert resumed.history[-1]["compute/flops_train"] > 0
