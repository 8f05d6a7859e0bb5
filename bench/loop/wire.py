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
"""
from __future__ import annotations

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
