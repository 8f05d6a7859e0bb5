"""Simulated edge devices (bench/loop/devices.py and the engine's use of them): the clock's arithmetic
by hand, drops by deadline, memory and availability on hand-made profile sets, the built-in sets, and
an unlimited set giving exactly the numbers of a run before devices existed."""
import math

import pytest

from bench import config as C
from bench.loop import devices
from bench.loop.backends import Kind, SerialBackend
from bench.loop.engine import run_method
from fedeq_bench.core import seeding
from fedeq_bench.core.errors import BenchError
from fedeq_bench.datasets import DataArgs, get_dataset
from tests.unit.test_wire_formats import GOLDEN


def profile(path, *tiers) -> str:
    """A profile set file with `tiers` (dicts of tier keys; a tier's unset keys: share 1 / len(tiers),
    1e9 FLOP/s, 1e6 B/s down, 5e5 B/s up, 0.25 s latency, unlimited memory, always available)."""
    base = {"flops_per_s": 1e9, "down_bytes_per_s": 1e6, "up_bytes_per_s": 5e5, "latency_s": 0.25,
            "memory_bytes": math.inf, "availability": 1.0}
    lines = ['name = "hand-made"']
    for i, t in enumerate(tiers):
        lines += ["[[tier]]", f'name = "t{i}"', f"share = {1 / len(tiers)!r}"]
        lines += [f"{k} = {'inf' if v == math.inf else repr(float(v))}" for k, v in {**base, **t}.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


class Recording(SerialBackend):
    """The Serial backend, remembering each metered training job's FLOPs (what the clock reads)."""

    def __init__(self):
        super().__init__()
        self.flops: dict[int, int] = {}

    def run(self, kind, spec, jobs, seed, rnd, measure=frozenset()):
        for res in super().run(kind, spec, jobs, seed, rnd, measure):
            if kind is Kind.TRAIN and res.cid in measure:
                self.flops[res.cid] = res.flops
            yield res


def run(method="fedavg", rounds=1, fraction=0.5, backend=None, **keys):
    """`method` on synthetic, 6 clients, seed 0, serial (tests/helpers.py synthetic_run's task)."""
    cfg = C.apply(C.default_config(), {"dataset": "synthetic", "clients": 6, "rounds": rounds, "backend": "serial",
                                       "fraction": fraction, **keys})
    ds = get_dataset("synthetic", cfg.datasets["synthetic"],
                     DataArgs(seed=0, clients=6, partition=None, val_frac=0.1, frac_unseen=0.0, data_dir=None))
    return run_method(cfg, method, 0, ds, backend or SerialBackend())


def rows(result, direction):
    return {e.client: e.bytes for e in result.ledger.entries if e.direction == direction}


def test_a_three_client_round_lasts_as_long_as_its_slowest_client_by_hand(tmp_path):
    # One device for all: 1e9 FLOP/s, 1e6 B/s down, 5e5 B/s up, 0.25 s latency. Client c's round:
    # down_c / 1e6 + F_c / 1e9 + up_c / 5e5 + 0.25, with its bytes from the ledger and F_c the FLOPs
    # of its local update. FedAvg's cohort is clients 1, 2, 4; each gets 217,824 bytes and sends 217,855;
    # their updates take 1.38e7, 5.88e7 and 5.13e7 FLOPs (their data sizes differ), so client 2 is the
    # slowest: 0.217824 + 0.0588 + 0.43571 + 0.25 = 0.962334 s, the round's time.
    backend = Recording()
    r = run(backend=backend, devices=profile(tmp_path / "one.toml", {}))
    down, up = rows(r, "down"), rows(r, "up")
    assert len(down) == len(up) == 3 and sorted(backend.flops) == sorted(down)  # fraction 0.5 of 6
    t = {c: down[c] / 1e6 + backend.flops[c] / 1e9 + up[c] / 5e5 + 0.25 for c in down}
    m = r.history[0]
    assert m["sim/time_s"] == pytest.approx(max(t.values()), rel=1e-12) == pytest.approx(0.962334, rel=1e-12)
    assert m["sim/time_cumulative_s"] == m["sim/time_s"]
    assert (m["clients/participated"], m["clients/dropped_deadline"], m["clients/dropped_memory"],
            m["clients/dropped_unavailable"], m["clients/excluded_memory"]) == (3, 0, 0, 0, 0)
    assert len(set(t.values())) == 3  # the clients' FLOPs differ (their data sizes do): max picks one

    # A deadline between the fastest and the slowest: the late updates are dropped, the round lasts
    # the deadline, their downlinks count and their uplinks do not arrive.
    slow, mid, fast = sorted(t, key=t.get, reverse=True)
    deadline = (t[mid] + t[fast]) / 2
    d = run(devices=profile(tmp_path / "one.toml", {}), round_deadline=deadline)
    m = d.history[0]
    assert (m["clients/participated"], m["clients/dropped_deadline"]) == (1, 2)
    assert m["sim/time_s"] == deadline
    assert rows(d, "down") == down and rows(d, "up") == {fast: up[fast]}
    assert m["bytes/up"] == up[fast] and m["bytes/down"] == sum(down.values())
    assert m["clients/never_trained"] == 5  # only the fast client's update was aggregated
    assert m["compute/flops_train"] == sum(backend.flops.values())  # the late clients did compute


def test_a_device_without_the_memory_of_a_local_update_never_trains_and_is_scored_as_untrained(tmp_path):
    # Half the clients (drawn by share from stream `devices`) have a 1-byte device: no update fits.
    path = profile(tmp_path / "mem.toml", {"memory_bytes": 1.0}, {})
    small = {c for c in range(6) if devices.load(path).device(0, c).tier == "t0"}
    assert 0 < len(small) < 6  # the draw puts clients in both tiers at seed 0
    r = run(rounds=2, fraction=1.0, devices=path)
    for m in r.history:
        assert (m["clients/dropped_memory"], m["clients/participated"]) == (len(small), 6 - len(small))
        assert m["clients/excluded_memory"] == len(small)
        assert m["clients/never_trained"] == len(small)
    assert not {e.client for e in r.ledger.entries} & small  # nothing sent to or from them
    # At the final evaluation they take the protocol's path for a client that never trained.
    assert {row["cid"] for row in r.clients if row["group"] == "never_trained"} == small


def test_an_unavailable_device_is_sent_nothing_drawn_per_round_from_the_availability_stream(tmp_path):
    r = run(rounds=3, fraction=1.0, devices=profile(tmp_path / "away.toml", {"availability": 0.5}))
    for rnd, m in enumerate(r.history, 1):
        # By hand: client c is away in round rnd when its draw from ("availability", rnd, c) is >= 0.5.
        away = {c for c in range(6) if seeding.numpy_rng(0, "availability", rnd, c).random() >= 0.5}
        assert m["clients/dropped_unavailable"] == len(away)
        assert m["clients/participated"] == 6 - len(away)
        assert {e.client for e in r.ledger.entries if e.round == rnd} == set(range(6)) - away
    assert any(m["clients/dropped_unavailable"] for m in r.history)


@pytest.mark.parametrize("method", sorted(GOLDEN))
def test_an_unlimited_profile_set_gives_the_numbers_from_before_devices(method, tmp_path):
    # GOLDEN: recorded at commit 501c30e (tests/unit/test_wire_formats.py). `uniform` is the default;
    # a set of three unlimited, always available tiers of other speeds changes only the clock.
    unlimited = profile(tmp_path / "fast.toml", {"flops_per_s": 1e12}, {}, {"down_bytes_per_s": 1e3, "latency_s": 0})
    for keys in ({"devices": "uniform"}, {"devices": unlimited}):
        r = run(method, rounds=2, **keys)
        assert (r.final["acc/weighted"], r.final["loss/train"], r.ledger.total("up"),
                r.ledger.total("down")) == GOLDEN[method]
        assert r.final["sim/time_cumulative_s"] == pytest.approx(sum(m["sim/time_s"] for m in r.history))
        assert all(m["sim/time_s"] > 0 for m in r.history)


def test_the_built_in_sets_load_and_uniform_limits_nothing():
    uniform, mix = devices.load("uniform"), devices.load("mobile-mix")
    assert uniform.unlimited and len(uniform.tiers) == 1 and not mix.unlimited
    assert math.isclose(sum(s for s, _ in mix.tiers), 1.0) and mix.sources
    # uniform is mobile-mix's mid tier, unlimited (docs/devices.md)
    mid = next(d for _, d in mix.tiers if d.tier == "mid-range phone")
    u = uniform.tiers[0][1]
    assert (u.flops_per_s, u.down_bytes_per_s, u.up_bytes_per_s, u.latency_s) == \
           (mid.flops_per_s, mid.down_bytes_per_s, mid.up_bytes_per_s, mid.latency_s)
    # Tiers are drawn by share: over 3,000 clients each tier's count is within 4 standard deviations.
    n = 3000
    counts = {d.tier: 0 for _, d in mix.tiers}
    for c in range(n):
        counts[mix.device(0, c).tier] += 1
    for share, d in mix.tiers:
        assert abs(counts[d.tier] - n * share) < 4 * math.sqrt(n * share * (1 - share))


@pytest.mark.parametrize("text, says", [
    ('name = "x"\n', "needs at least one [[tier]]"),
    ('[[tier]]\nshare = 1.0\n', "missing 'flops_per_s'"),
    ("[[tier]]\nshare = 0.5\nflops_per_s = 1e9\ndown_bytes_per_s = 1e6\nup_bytes_per_s = 1e6\nlatency_s = 0\n"
     "memory_bytes = 1e9\navailability = 1.0\n", "shares sum to 0.5"),
    ("[[tier]]\nshare = 1.0\nflops_per_s = inf\ndown_bytes_per_s = 1e6\nup_bytes_per_s = 1e6\nlatency_s = 0\n"
     "memory_bytes = 1e9\navailability = 1.0\n", "flops_per_s must be > 0, finite, got inf"),
    ("[[tier]]\nshare = 1.0\nflops_per_s = 1e9\ndown_bytes_per_s = 1e6\nup_bytes_per_s = 1e6\nlatency_s = 0\n"
     "memory_bytes = 1e9\navailability = 1.5\n", "availability must be > 0 and <= 1, finite, got 1.5"),
    ("[[tier]]\nshare = 1.0\nflops_per_s = 1e9\ndown_bytes_per_s = 1e6\nup_bytes_per_s = 1e6\nlatency_s = 0\n"
     "memory_bytes = 1e9\navailability = 1.0\nram = 3\n", "unknown key 'ram'"),
    ("[[tier]]\nshare = 1.0\nflops_per_s = '1e9'\n", "flops_per_s must be a number, got '1e9'"),
    ('colour = "red"\n', "unknown key 'colour'"),
])
def test_a_bad_profile_file_is_one_line_naming_the_tier_and_key(tmp_path, text, says):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(BenchError) as e:
        devices.load(str(path))
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_files_label_carries_its_digest_so_an_edited_file_is_told_apart(tmp_path):
    a = devices.load(profile(tmp_path / "my.toml", {}))
    b = devices.load(profile(tmp_path / "my.toml", {"latency_s": 1.0}))
    assert a.label.startswith("my.toml@") and a.label != b.label
    assert devices.load("mobile-mix").label == "mobile-mix"


def test_a_round_whose_every_device_is_away_sends_nothing_and_keeps_the_server(tmp_path):
    # Availability 1e-9: no draw from ("availability", rnd, cid) falls below it (a uniform draw is
    # below 1e-9 with probability 1e-9), so no sampled client takes part in any round.
    r = run(rounds=2, devices=profile(tmp_path / "gone.toml", {"availability": 1e-9}))
    for m in r.history:
        assert (m["clients/participated"], m["clients/dropped_unavailable"], m["bytes/up"], m["bytes/down"],
                m["sim/time_s"], m["compute/flops_train"]) == (0, 3, 0, 0, 0, 0)
        assert math.isnan(m["loss/train"])
        # No update was metered: a peak or a per-update count of none is not logged (not a NaN or a 0
        # that a run's maximum or mean would take in).
        assert "mem/peak_train_bytes" not in m and "compute/flops_update" not in m
    assert r.ledger.entries == [] and r.final["clients/never_trained"] == 6
    # Every client is scored as one that never trained: from the (initial) server, personalized.
    assert {row["group"] for row in r.clients} == {"never_trained"} and math.isfinite(r.final["acc/weighted"])


def test_resuming_a_comparison_whose_profile_file_changed_is_refused(tmp_path):
    """A comparison records its set's label (a file's name and digest) on each child run; resuming it
    after the file changed would run the rest on other devices, so the plan refuses, naming both."""
    from bench import experiment
    from bench.experiment.resume import resume_plan
    from bench.tracking import open_client
    from tests.helpers import new_store

    uri = new_store(tmp_path / "mlflow.db")
    path = profile(tmp_path / "fleet.toml", {})
    cfg = experiment.validate(C.apply(C.default_config(), {
        "methods": "fedavg", "dataset": "synthetic", "clients": 6, "rounds": 1, "backend": "serial",
        "devices": path, "tracking_uri": uri, "checkpoint_every": 1}))
    _, parent = experiment.compare(cfg, quiet=True)
    client = open_client(uri)
    (child,) = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    client.set_terminated(child.info.run_id, "KILLED")  # as an interrupted invocation leaves it
    assert resume_plan(client, parent, cfg) == {("fedavg", 0): child.info.run_id}  # the same file: it continues
    before = devices.load(path).label
    profile(tmp_path / "fleet.toml", {"latency_s": 2.0})
    with pytest.raises(BenchError) as e:
        resume_plan(client, parent, cfg)
    assert f"ran on the device profile set {before}, and --devices {path} is now {devices.load(path).label}" \
        in str(e.value)
