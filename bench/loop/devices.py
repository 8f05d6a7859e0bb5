"""Simulated edge devices: profile sets, each client's device, and the simulated clock.

A profile set (`--devices`) is a TOML file of device tiers, each with a share of the clients and the
numbers the clock and the limits need: compute rate (FLOP/s), downlink and uplink bandwidth (bytes/s),
latency (s, once per round), the memory a training job may use (bytes; `inf`: unlimited) and
availability (the probability that the device can take part in a round it is sampled for). Two sets
are built in, beside this module in device_sets/ (their sources are in docs/devices.md): `uniform`,
every client the same device, nothing limiting (the default: a run's numbers are those of a run without
devices), and `mobile-mix`, phones of several tiers. `--devices FILE.toml` reads your own.

Each client's tier is drawn once, from the stream ("devices", cid); whether a sampled device is
available in a round, from ("availability", round, cid) when its availability is below 1. Both are
pure functions of the seed and the profile set, the same for every method and both backends.

The clock (docs/architecture.md, Simulated devices): a client's round takes
    down bytes / down_bytes_per_s + its local update's FLOPs / flops_per_s + up bytes / up_bytes_per_s + latency_s
with the FLOPs measured on the client's first update (bench/loop/flops.py, as compute/flops_update).
The engine (bench/loop/engine.py) applies the limits: an unavailable device is not sent anything; a
device whose memory is below the method's measured peak training memory of that client cannot train
(its work is discarded, nothing counted as sent); with `--round-deadline S`, an update that would
arrive after S seconds is dropped (its downlink was sent and counts; its upload does not arrive). A
round lasts as long as its slowest accepted participant, or the deadline when an update was late.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any

from bench.config import read_toml
from fedeq_bench.core import seeding
from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.files import SMALL_LIMIT, read_bytes

SETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "device_sets")
BUILT_IN = ("uniform", "mobile-mix")

# Each tier's keys: (lower bound, whether the bound is inclusive, whether inf is allowed).
TIER_KEYS: dict[str, tuple[float, bool, bool]] = {
    "share": (0.0, False, False),
    "flops_per_s": (0.0, False, False),
    "down_bytes_per_s": (0.0, False, False),
    "up_bytes_per_s": (0.0, False, False),
    "latency_s": (0.0, True, False),
    "memory_bytes": (0.0, False, True),
    "availability": (0.0, False, False),
}
UPPER = {"share": 1.0, "availability": 1.0}


@dataclass(frozen=True)
class Device:
    """One client's device (a tier of its profile set)."""

    tier: str
    flops_per_s: float
    down_bytes_per_s: float
    up_bytes_per_s: float
    latency_s: float
    memory_bytes: float
    availability: float

    def round_time(self, down_bytes: float, flops: float, up_bytes: float) -> float:
        """Seconds from the downlink's start to the uplink's arrival (the module doc's clock)."""
        return (down_bytes / self.down_bytes_per_s + flops / self.flops_per_s + up_bytes / self.up_bytes_per_s
                + self.latency_s)

    def fits(self, peak_train_bytes: float) -> bool:
        """Whether a local update of that peak memory can run on this device."""
        return peak_train_bytes <= self.memory_bytes


@dataclass(frozen=True)
class ProfileSet:
    name: str
    description: str
    sources: tuple[str, ...]
    tiers: tuple[tuple[float, Device], ...]
    """(share, device) per tier, in the file's order."""
    sha256: str
    """Digest of the file's bytes: recorded with every run, so an edited FILE.toml is told apart."""

    @property
    def label(self) -> str:
        """`mobile-mix`, or a file's name with its digest's first 12 hex digits (`my.toml@3f2a...`)."""
        return self.name if self.name in BUILT_IN else f"{self.name}@{self.sha256[:12]}"

    @property
    def unlimited(self) -> bool:
        """Nothing can drop a client: every tier always available with unlimited memory."""
        return all(d.availability >= 1 and math.isinf(d.memory_bytes) for _, d in self.tiers)

    def device(self, seed: int, cid: int) -> Device:
        """Client `cid`'s device: a tier drawn by share from ("devices", cid)."""
        if len(self.tiers) == 1:
            return self.tiers[0][1]
        u = seeding.numpy_rng(seed, "devices", cid).random()
        acc = 0.0
        for share, dev in self.tiers:
            acc += share
            if u < acc:
                return dev
        return self.tiers[-1][1]  # shares sum to 1 within rounding


def available(device: Device, seed: int, rnd: int, cid: int) -> bool:
    """Whether `device` (client `cid`'s) can take part in round `rnd`: drawn from ("availability", rnd, cid)
    when its availability is below 1."""
    return device.availability >= 1 or bool(seeding.numpy_rng(seed, "availability", rnd, cid).random()
                                            < device.availability)


def path_of(spec: str) -> str:
    """The file of a built-in set's name, or `spec` itself (a path)."""
    return os.path.join(SETS_DIR, f"{spec}.toml") if spec in BUILT_IN else spec


def load(spec: str) -> ProfileSet:
    """The profile set named `spec` (`uniform`, `mobile-mix`) or read from the TOML file `spec`.

    Every problem is one BenchError line naming the file, the tier and the key."""
    path = path_of(spec)
    if spec not in BUILT_IN and not spec.endswith(".toml"):
        raise BenchError(f"--devices {spec!r}: give a built-in profile set ({', '.join(BUILT_IN)}) or a .toml file")
    doc = read_toml(path, what="device profile set", where=f"built-in sets: {', '.join(BUILT_IN)}; see docs/devices.md")
    digest = hashlib.sha256(read_bytes(path, "device profile set", "a .toml file", SMALL_LIMIT)).hexdigest()
    where = f"device profile set {path}"
    unknown = sorted(set(doc) - {"name", "description", "sources", "tier"})
    if unknown:
        raise BenchError(f"{where}: unknown key {unknown[0]!r}; valid: name, description, sources, [[tier]]")
    tiers = doc.get("tier")
    if not isinstance(tiers, list) or not tiers or not all(isinstance(t, dict) for t in tiers):
        raise BenchError(f"{where}: needs at least one [[tier]] table with keys {', '.join(TIER_KEYS)}")
    parsed = tuple(_tier(where, i, t) for i, t in enumerate(tiers, 1))
    total = sum(s for s, _ in parsed)
    if abs(total - 1) > 1e-6:
        raise BenchError(f"{where}: the tiers' shares sum to {total:g}; they must sum to 1")
    name = spec if spec in BUILT_IN else os.path.basename(path)
    sources = doc.get("sources", [])
    return ProfileSet(name=name, description=str(doc.get("description", "")),
                      sources=tuple(map(str, sources)) if isinstance(sources, list) else (str(sources),),
                      tiers=parsed, sha256=digest)


def _tier(where: str, i: int, t: dict[str, Any]) -> tuple[float, Device]:
    name = str(t.get("name", f"tier {i}"))
    at = f"{where}, tier {i} ({name!r})"
    extra = sorted(set(t) - set(TIER_KEYS) - {"name"})
    if extra:
        raise BenchError(f"{at}: unknown key {extra[0]!r}; valid: name, {', '.join(TIER_KEYS)}")
    vals = {}
    for key, (low, inclusive, inf_ok) in TIER_KEYS.items():
        if key not in t:
            raise BenchError(f"{at}: missing {key!r} (every tier gives {', '.join(TIER_KEYS)})")
        v = t[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
            raise BenchError(f"{at}: {key} must be a number, got {v!r}")
        v = float(v)
        high = UPPER.get(key, math.inf)
        ok = (v >= low if inclusive else v > low) and v <= high and (inf_ok or math.isfinite(v))
        if not ok:
            rule = f"{'>=' if inclusive else '>'} {low:g}" + (f" and <= {high:g}" if math.isfinite(high) else "")
            rule += " (inf: unlimited)" if inf_ok else ", finite"
            raise BenchError(f"{at}: {key} must be {rule}, got {v:g}")
        vals[key] = v
    share = vals.pop("share")
    return share, Device(tier=name, **vals)


class Fleet:
    """Every client's device under one profile set and seed, each drawn when first asked for."""

    def __init__(self, profile: ProfileSet, seed: int):
        self.profile, self.seed = profile, seed
        self._devices: dict[int, Device] = {}

    def __getitem__(self, cid: int) -> Device:
        dev = self._devices.get(cid)
        if dev is None:
            dev = self._devices[cid] = self.profile.device(self.seed, cid)
        return dev

    def available(self, rnd: int, cid: int) -> bool:
        return available(self[cid], self.seed, rnd, cid)
