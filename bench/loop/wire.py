"""The only serializer for what crosses the (simulated) network, and the ledger of its bytes.

A Message is a flat `dict[str, Tensor]`. Its encoding is deterministic (keys sorted, little-endian,
no pickle), so the same message always has the same bytes and `bytes/up`, `bytes/down` are simply
`len(encode(msg))`. The receiver always gets `decode(encode(msg))`: a method cannot use what it
did not send.

Layout (all integers little-endian):
    b"FQW1"                      magic, 4 bytes
    u32 count                    number of tensors
    per tensor, in sorted key order:
        u16 len(name), name (utf-8)
        u8  dtype code            (see _DTYPES)
        u8  ndim, u32 * ndim shape
        u64 nbytes, raw data      (C order)
So a tensor named `name` with shape s costs 2 + len(name) + 1 + 1 + 4 * len(s) + 8 + numel * itemsize
bytes, on top of 8 bytes for the header. An empty message is not sent at all: it encodes to zero
bytes (a method that communicates nothing, like `local`, costs nothing).

Wire formats (`Codec`, `--wire`, per method `--set fedrep.wire=int8`): how a message's float32
tensors travel, in both directions. `fp32` sends them as they are (the encoding above, bit for bit).
`fp16` and `bf16` send each as 16-bit floats (round to nearest even), 2 bytes an entry. `int8` sends
each as int8 entries q and a float32 scale s = max|x| / 127 under `NAME#scale`: x -> q = round(x / s)
(or, with stochastic rounding, floor(x / s + u), u uniform in [0, 1): unbiased), clipped to
[-127, 127]. Every other tensor (counts, integer buffers) is sent as it is. The receiver gets the
decoded float32 tensors (q * s for int8), so accuracy reflects the loss, and the bytes counted are
the compressed message's, scales included.

`topk` (fraction F = `wire_topk`) sparsifies uplinks: a client sends, per float32 tensor it
received (the same name and shape in its downlink), the k = max(1, ceil(F * numel)) entries of
largest magnitude of its change from it, as int32 flat indices `NAME#idx` (ascending) and float32
values `NAME#val`; the server adds them to what it sent. Other tensors are sent as they are. With
error feedback (`wire_feedback`) the client keeps what it did not send (its residual, in its state
under `wire#ef/NAME`, never sent) and adds it to the next round's change before choosing (Stich et
al., NeurIPS 2018; Karimireddy et al., ICML 2019). Downlinks travel as fp32 under topk: a sparse change
needs a reference the receiver holds, and a client sampled now and then does not hold last round's
broadcast.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from fedeq_bench.core.errors import BenchError

MAGIC = b"FQW1"
HEADER_BYTES = 8

_DTYPES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float64: 2,
    torch.float16: 3,
    torch.bfloat16: 4,
    torch.int64: 5,
    torch.int32: 6,
    torch.int16: 7,
    torch.int8: 8,
    torch.uint8: 9,
    torch.bool: 10,
}
_CODES = {v: k for k, v in _DTYPES.items()}


def encode(msg: dict[str, torch.Tensor]) -> bytes:
    if not msg:
        return b""
    parts = [MAGIC, struct.pack("<I", len(msg))]
    for name in sorted(msg):
        t = msg[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"message entry {name!r} is {type(t).__name__}, not a Tensor")
        if t.dtype not in _DTYPES:
            raise TypeError(f"message entry {name!r} has unsupported dtype {t.dtype}")
        t = t.detach().to("cpu").contiguous()
        key = name.encode()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the raw 16-bit words
            data = t.view(torch.int16).numpy().tobytes()
        else:
            data = t.numpy().tobytes()
        parts.append(struct.pack("<H", len(key)) + key)
        parts.append(struct.pack("<BB", _DTYPES[t.dtype], t.dim()))
        parts.append(struct.pack(f"<{t.dim()}I", *t.shape))
        parts.append(struct.pack("<Q", len(data)))
        parts.append(data)
    return b"".join(parts)


def decode(buf: bytes | np.ndarray) -> dict[str, torch.Tensor]:
    """Inverse of `encode`; the tensors own fresh (writable) memory. `buf`: the bytes, or a uint8 array
    over them (a TRAIN `Result.up`)."""
    mv = memoryview(buf)  # type: ignore[arg-type]  # numpy's stubs declare ndarray.__buffer__ only for 3.12+
    if len(mv) == 0:
        return {}
    if bytes(mv[:4]) != MAGIC:
        raise BenchError("wire: not a fedeq-bench message (bad magic)")
    try:
        (count,) = struct.unpack_from("<I", mv, 4)
        off = HEADER_BYTES
        out: dict[str, torch.Tensor] = {}
        for _ in range(count):
            (klen,) = struct.unpack_from("<H", mv, off)
            off += 2
            name = bytes(mv[off : off + klen]).decode()
            off += klen
            code, ndim = struct.unpack_from("<BB", mv, off)
            off += 2
            shape = struct.unpack_from(f"<{ndim}I", mv, off)
            off += 4 * ndim
            (nbytes,) = struct.unpack_from("<Q", mv, off)
            off += 8
            dtype = _CODES[code]
            raw = mv[off : off + nbytes]
            if len(raw) != nbytes:
                raise ValueError("truncated")
            off += nbytes
            if dtype == torch.bfloat16:
                arr = np.frombuffer(raw, dtype=np.int16).copy()
                out[name] = torch.from_numpy(arr).view(torch.bfloat16).reshape(shape)
            else:
                np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
                arr = np.frombuffer(raw, dtype=np_dtype).copy()
                out[name] = torch.from_numpy(arr).reshape(shape)
        if off != len(mv):
            raise ValueError("trailing bytes")
        return out
    except (struct.error, KeyError, ValueError) as e:
        raise BenchError(f"wire: corrupt message ({e})") from None


FORMATS = ("fp32", "fp16", "bf16", "int8", "topk")
"""The wire formats (`Codec.fmt`)."""
SCALE, INDEX, VALUE = "#scale", "#idx", "#val"
"""Suffixes of an int8 tensor's scale and of a top-k change's indices and values in a compressed
message; message keys never contain `#`."""
RESIDUAL = "wire#ef/"
"""Prefix of error feedback's residuals in a client's state (never a method's own key)."""
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Codec:
    """A wire format (module doc) applied to whole messages: `encode(msg, rng)` the compressed bytes,
    `decode(buf)` the float32 message the receiver works with. `fp32` is `encode` / `decode` exactly."""

    fmt: str = "fp32"
    stochastic: bool = False
    """int8 rounds stochastically, drawing from the generator `encode` is given."""
    topk: float = 0.01
    """topk: the fraction of each tensor's entries sent."""
    feedback: bool = False
    """topk: error feedback (the residual kept in the client's state)."""

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise BenchError(f"unknown wire format {self.fmt!r}; choose from {', '.join(FORMATS)}")
        if not 0 < self.topk <= 1:
            raise BenchError(f"wire_topk must be in (0, 1], got {self.topk!r}")

    @property
    def label(self) -> str:
        """`fp32`, `fp16`, `bf16`, `int8`, `int8+sr` (stochastic rounding), `topk0.01`, `topk0.01+ef`
        (error feedback): the child run's `wire` param, and how reports name a method sent in another
        format (`fedrep@int8`)."""
        if self.fmt == "topk":
            return f"topk{self.topk:g}" + ("+ef" if self.feedback else "")
        return self.fmt + ("+sr" if self.draws else "")

    def down(self) -> Codec:
        """The downlinks' codec: this one, fp32 under topk (module doc)."""
        return Codec() if self.fmt == "topk" else self

    def encode_up(self, msg: dict[str, torch.Tensor], rng: torch.Generator | None, reference: dict[str, torch.Tensor],
                  state: dict[str, torch.Tensor]) -> tuple[bytes, dict[str, torch.Tensor]]:
        """A client's uplink: (its bytes, its new error-feedback residuals by `RESIDUAL + name`, {}
        without feedback). `reference`: the downlink it decoded; `state`: its state (old residuals)."""
        if self.fmt != "topk":
            return self.encode(msg, rng), {}
        out, residuals = {}, {}
        for name in _keys(msg):
            t = msg[name]
            base = _base(reference, name, t)
            if base is None:  # not a float32 tensor the client received: sent as it is
                out[name] = t
                continue
            change = (t.detach().to("cpu") - base).reshape(-1)
            if self.feedback and RESIDUAL + name in state:
                change = change + state[RESIDUAL + name].reshape(-1)
            k = max(1, math.ceil(self.topk * change.numel())) if change.numel() else 0
            idx = torch.topk(change.abs(), k, sorted=False).indices.sort().values if k else change.new_zeros(0, dtype=torch.long)
            val = change[idx]
            out[name + INDEX], out[name + VALUE] = idx.to(torch.int32), val.contiguous()
            if self.feedback:
                kept = change.clone()
                kept[idx] = 0.0  # exactly what was not sent
                residuals[RESIDUAL + name] = kept.reshape(t.shape)
        return encode(out), residuals

    def decode_up(self, buf: bytes | np.ndarray, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The server's view of a client's uplink; `reference`: the downlink that client was sent."""
        if self.fmt != "topk":
            return self.decode(buf)
        msg = decode(buf)
        out = {}
        for name, t in msg.items():
            if name.endswith(VALUE):
                continue
            if name.endswith(INDEX):
                key = name.removesuffix(INDEX)
                if key not in reference:
                    raise BenchError(f"wire: top-k change of {key!r}, which the downlink did not hold")
                dense = reference[key].detach().to("cpu", torch.float32).clone().reshape(-1)
                dense[t.long()] += msg[key + VALUE]
                out[key] = dense.reshape(reference[key].shape)
            else:
                out[name] = t
        return out

    @property
    def draws(self) -> bool:
        """Whether `encode` draws random numbers (and so needs its generator)."""
        return self.fmt == "int8" and self.stochastic

    def encode(self, msg: dict[str, torch.Tensor], rng: torch.Generator | None = None) -> bytes:
        """Both directions' encoding; under topk, a downlink's (fp32: `encode_up` sends the uplinks)."""
        return encode(msg if self.fmt in ("fp32", "topk") else self.compress(msg, rng))

    def decode(self, buf: bytes | np.ndarray) -> dict[str, torch.Tensor]:
        msg = decode(buf)
        return msg if self.fmt in ("fp32", "topk") else self.expand(msg)

    def compress(self, msg: dict[str, torch.Tensor], rng: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The message as it travels: float32 tensors in this format, anything else as it is."""
        if self.draws and rng is None:
            raise ValueError("stochastic int8 rounding needs a generator")
        out: dict[str, torch.Tensor] = {}
        for name in _keys(msg):
            t = msg[name]
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                out[name] = t
            elif self.fmt in _HALF:
                out[name] = t.detach().to("cpu", _HALF[self.fmt])
            else:
                out[name], out[name + SCALE] = quantize_int8(t.detach().to("cpu"), rng if self.stochastic else None)
        return out

    def expand(self, msg: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of `compress` up to its rounding: the float32 message the receiver works with."""
        out = {}
        for name, t in msg.items():
            if name.endswith(SCALE):
                continue
            if self.fmt in _HALF and t.dtype == _HALF[self.fmt]:
                out[name] = t.to(torch.float32)
            elif self.fmt == "int8" and t.dtype == torch.int8 and name + SCALE in msg:
                out[name] = t.to(torch.float32) * msg[name + SCALE]
            else:
                out[name] = t
        return out


def _keys(msg: dict) -> list[str]:
    """A message's keys in sorted order (stochastic draws and top-k choices in a fixed order), none of
    them holding `#`, which compressed messages reserve for their parts."""
    for name in msg:
        if "#" in name:
            raise ValueError(f"message key {name!r} contains '#', which compressed messages reserve")
    return sorted(msg)


def _base(reference: dict[str, torch.Tensor], name: str, t) -> torch.Tensor | None:
    """What a top-k change of float32 tensor `t` is taken from: the same tensor in the downlink; None
    when `t` is not float32 or the downlink holds no float32 tensor of its name and shape."""
    ref = reference.get(name)
    if (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and ref is not None
            and ref.shape == t.shape and ref.dtype == torch.float32):
        return ref.detach().to("cpu")
    return None


def quantize_int8(x: torch.Tensor, rng: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s): int8 entries and the float32 scale s = max|x| / 127 (0 for an all-zero or empty x),
    q = round(x / s), or floor(x / s + u) with u ~ U[0, 1) from `rng`; x is q * s within s / 2
    (nearest) or within s (stochastic, and unbiased)."""
    amax = x.abs().max() if x.numel() else torch.zeros((), dtype=x.dtype)
    scale = (amax / 127).to(torch.float32).reshape(())
    if float(scale) == 0.0:
        return torch.zeros(x.shape, dtype=torch.int8), scale
    y = x / scale
    y = torch.round(y) if rng is None else torch.floor(y + torch.rand(x.shape, generator=rng, dtype=y.dtype))
    return y.clamp_(-127, 127).to(torch.int8), scale


def codec_of(cfg) -> Codec:
    """The wire format of a resolved method config (`wire`, `wire_rounding`, `wire_topk`,
    `wire_feedback`); fp32 where it has none (a config built in code and never resolved against a run)."""
    return Codec(getattr(cfg, "wire", None) or "fp32", getattr(cfg, "wire_rounding", None) == "stochastic",
                 getattr(cfg, "wire_topk", None) or 0.01, bool(getattr(cfg, "wire_feedback", None)))


class LedgerRow(NamedTuple):
    """One message that crossed the network. A tuple too, so `rnd, cid, d, n, keys = row` works."""

    round: int
    client: int
    direction: str
    """`down` (server -> client) or `up` (client -> server)."""
    bytes: int
    """len(encode(message)): exactly what was sent."""
    keys: tuple[str, ...]
    """The message's tensor names, sorted."""


CSV_HEADER = "round,client,direction,bytes,keys"


def to_csv(rows) -> str:
    """The ledger as CSV (the `ledger.csv` artifact of every child run); keys are space-separated.

    Message keys are parameter names (`body.0.weight`), which hold no spaces or commas; `from_csv`
    reads this back into equal rows.
    """
    lines = [CSV_HEADER]
    for r in rows:
        if any(" " in k or "," in k or "\n" in k for k in r.keys):
            raise ValueError(f"ledger key with a space, comma or newline cannot go in CSV: {r.keys!r}")
        lines.append(f"{r.round},{r.client},{r.direction},{r.bytes},{' '.join(r.keys)}")
    return "\n".join(lines) + "\n"


def from_csv(text: str) -> list[LedgerRow]:
    """Inverse of `to_csv`."""
    lines = text.splitlines()
    if not lines or lines[0] != CSV_HEADER:
        raise ValueError(f"not a ledger CSV: the first line must be {CSV_HEADER!r}")
    rows = []
    for line in lines[1:]:
        rnd, cid, direction, n, keys = line.split(",")
        rows.append(LedgerRow(int(rnd), int(cid), direction, int(n), tuple(keys.split())))
    return rows


@dataclass
class Ledger:
    """Every message that crossed the network, one `LedgerRow` each.

    Keys are recorded so a test (or a curious user) can check what a method sent, e.g. that a
    personal head never left the client.
    """

    entries: list[LedgerRow] = field(default_factory=list)

    def record(self, rnd: int, cid: int, direction: str, payload: bytes | np.ndarray, keys) -> int:
        n = len(payload)
        self.entries.append(LedgerRow(rnd, cid, direction, n, tuple(sorted(keys))))
        return n

    def total(self, direction: str | None = None, rnd: int | None = None) -> int:
        return sum(e.bytes for e in self.entries
                   if (direction is None or e.direction == direction) and (rnd is None or e.round == rnd))

    def keys_sent(self) -> set[str]:
        return {k for e in self.entries for k in e.keys}

    def to_csv(self) -> str:
        return to_csv(self.entries)
