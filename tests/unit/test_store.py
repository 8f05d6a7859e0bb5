"""bench/loop/store.py: the client store keeps states in memory up to a byte budget, spills the least
recently used to disk and reads them back bit for bit; a run's every metric is the same with a budget
that forces spills as without one."""
import gc
import math
import os

import pytest
import torch

from bench.experiment import load_dataset
from bench.loop import engine
from bench.loop.backends import SerialBackend
from bench.loop.store import GB, ClientStore, budget_bytes, state_bytes
from tests.helpers import tiny_config, write_tiny_npz


def state(value: float, n: int = 25) -> dict:
    """A state of n float32 entries (4n bytes) and one int64 scalar (8 bytes)."""
    return {"w": torch.full((n,), value), "k": torch.tensor(int(value), dtype=torch.int64)}


def test_state_bytes_is_the_sum_of_tensor_nbytes():
    assert state_bytes(state(1.0)) == 25 * 4 + 8 == 108
    assert state_bytes({"a": torch.zeros(3, 2, dtype=torch.float64), "b": torch.zeros(0)}) == 3 * 2 * 8 + 0
    assert state_bytes({}) == 0
    assert budget_bytes(None) is None and budget_bytes(0.5) == GB // 2 == 500_000_000


def test_spilled_states_read_back_bit_for_bit():
    # Prepare: values whose bits a careless round trip loses (NaN payload, -0.0, subnormals, float64,
    # a grad flag, a non-contiguous view).
    weird = torch.tensor([float("nan"), -0.0, 1e-45, float("inf"), 1 / 3], dtype=torch.float32)
    s = {"f32": weird, "f64": torch.tensor([1 / 3, -0.0], dtype=torch.float64),
         "i": torch.arange(6, dtype=torch.int64).reshape(2, 3).t(), "g": torch.ones(2, requires_grad=True),
         "b": torch.tensor([True, False])}
    store = ClientStore(budget=0)  # every non-empty state goes to disk

    # Execute
    store[3] = s
    back = store[3]

    # Assert
    assert store.stats()["on_disk"] == 1 and store.stats()["in_memory"] == 0 and store.mem_bytes == 0
    assert back is not s and set(back) == set(s)
    for k in s:
        assert back[k].dtype == s[k].dtype and back[k].shape == s[k].shape and back[k].stride() == s[k].stride()
        assert back[k].requires_grad == s[k].requires_grad
        assert back[k].contiguous().numpy(force=True).tobytes() == s[k].contiguous().numpy(force=True).tobytes()
    store.close()


def test_least_recently_used_spills_first_and_a_read_refreshes():
    store = ClientStore(budget=2 * 108)  # room for two states of 108 bytes
    store[0], store[1] = state(0.0), state(1.0)
    assert store.stats() == {"in_memory": 2, "on_disk": 0, "mem_bytes": 216, "disk_bytes": 0, "spills": 0, "loads": 0}
    assert store.spill_dir is None  # nothing spilled: no directory made

    store[0]              # a read refreshes 0: 1 is now the least recently used ...
    store[2] = state(2.0)  # ... and goes to disk when 2 arrives
    assert sorted(os.listdir(store.spill_dir)) == ["1.pt"]
    assert store.mem_bytes == 216 and store.disk_bytes == 108 and store.spills == 1

    # Reading a spilled state loads a copy and leaves it on disk (an evaluation changes nothing) ...
    assert torch.equal(store[1]["w"], state(1.0)["w"]) and store.loads == 1
    assert sorted(os.listdir(store.spill_dir)) == ["1.pt"]
    # ... writing it replaces the disk copy, and the least recently used of the others (0) goes out.
    store[1] = state(10.0)
    assert sorted(os.listdir(store.spill_dir)) == ["0.pt"]
    assert torch.equal(store[1]["w"], state(10.0)["w"]) and torch.equal(store[0]["w"], state(0.0)["w"])
    assert (store.mem_bytes, store.disk_bytes) == (2 * 108, 108)
    store.close()


def test_a_state_over_the_budget_by_itself_goes_straight_to_disk():
    store = ClientStore(budget=100)
    store[5] = state(5.0)  # 108 > 100
    assert store.stats()["on_disk"] == 1 and store.mem_bytes == 0
    store[6] = {}          # 0 bytes fit any budget
    assert store.stats()["in_memory"] == 1 and 6 in store
    store.close()


def test_mapping_semantics_and_defaults_that_are_never_kept():
    made = []

    def default(cid):
        made.append(cid)
        return state(-1.0)

    store = ClientStore(budget=108, default=default)
    store[4], store[2] = state(4.0), state(2.0)  # 4 spills
    assert list(store) == [2, 4] and len(store) == 2  # client-id order, memory and disk alike
    assert 4 in store and 2 in store and 9 not in store
    # A client not in the store reads as default(cid), made afresh each time and not kept.
    assert torch.equal(store[9]["w"], state(-1.0)["w"]) and store[9] is not store[9]
    assert made == [9, 9, 9] and 9 not in store and len(store) == 2
    del store[4]
    assert list(store) == [2] and store.disk_bytes == 0 and os.listdir(store.spill_dir) == []
    with pytest.raises(KeyError):
        del store[4]
    with pytest.raises(KeyError):
        ClientStore()[1]
    assert dict(store.items()).keys() == {2}
    with pytest.raises(ValueError, match="bytes >= 0"):
        ClientStore(budget=-1)
    store.close()


def test_spill_directory_is_removed_on_close_and_when_dropped(tmp_path):
    store = ClientStore(budget=0, spill_dir=str(tmp_path))
    store[1] = state(1.0)
    d = store.spill_dir
    assert os.path.dirname(d) == str(tmp_path) and os.path.isfile(os.path.join(d, "1.pt"))
    store.close()
    assert not os.path.exists(d) and len(store) == 0 and store.spill_dir is None
    store[2] = state(2.0)  # usable after close, with a new directory
    d2 = store.spill_dir
    assert os.path.isfile(os.path.join(d2, "2.pt"))
    del store
    gc.collect()
    assert not os.path.exists(d2)  # a run that fails leaves nothing behind


# -- the engine -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_npz(tmp_path_factory.mktemp("d") / "tiny.npz", clients=6)


# Process-wide or wall-clock measurements, which differ between any two runs.
UNSTABLE = ("time/round_s", "mem/peak_rss_bytes")


def comparable(history):
    return [{k: v for k, v in h.items() if k not in UNSTABLE} for h in history]


def same(a, b):
    """Equal metrics, NaN equal to NaN (acc/val of a client with no validation split)."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


# Methods whose clients keep state (personal heads, duals, personal models, mixtures): FedAvg's is empty.
@pytest.mark.parametrize("method", ["fedeq", "ditto", "apfl", "fedrep"])
def test_a_budget_that_forces_spills_changes_no_metric(tiny, method, monkeypatch):
    # Prepare: record every store the engine makes, and its statistics when it is closed.
    seen = []

    class Recording(ClientStore):
        def close(self):
            seen.append((self.budget, self.stats()))
            super().close()

    monkeypatch.setattr(engine, "ClientStore", Recording)
    ds = load_dataset(tiny_config(tiny), 0)

    def run(**kw):
        cfg = tiny_config(tiny, methods=method, rounds=3, fraction=0.5, **kw)
        return engine.run_method(cfg, method, 0, ds, SerialBackend())

    # Execute: no budget, then a budget of ~one state (every other state on disk).
    plain = run()
    spilled = run(state_budget_gb=1e-9)  # 1 byte

    # Assert: spills and loads happened, and every metric of every round and the ledger are the same.
    (b0, s0), (b1, s1) = seen
    assert b0 is None and s0["spills"] == 0
    assert b1 == 1 and s1["spills"] > 0 and s1["loads"] > 0 and s1["in_memory"] == 0
    assert len(plain.history) == len(spilled.history) == 3
    for a, b in zip(comparable(plain.history), comparable(spilled.history), strict=True):
        assert same(a, b)
    assert plain.ledger.entries == spilled.ledger.entries
    assert plain.clients == spilled.clients


def test_the_scale_benchmark_counts_the_states_of_trained_clients_only():
    # A smoke run of bench/perf/scale.py's measurement (`python -m bench.perf --scale`), in this process.
    from bench.perf import scale

    r = scale.measure("fedrep", 40, cohort=4, rounds=3, eval_every=2, eval_clients=5)
    # Rounds 1..3 of 4 clients each: at most 12 clients trained, so at most 12 states of 40 clients.
    assert 4 <= r["states"] <= 3 * 4 and r["states_mb"] > 0 and r["on_disk"] == 0
    assert r["train_s"] > 0 and r["eval_s"] > 0 and r["engine_ms"] >= 0 and r["samples"] > 0
    assert engine.ClientStore is ClientStore  # the measurement hook is put back
    assert scale.fmt_row(r)[:2] == ["fedrep", "40"]
