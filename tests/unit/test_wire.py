"""bench/loop/wire.py: the codec is exact, deterministic and pickle-free; the ledger counts its bytes."""
import struct

import pytest
import torch

from bench.loop import wire
from fedeq_bench.core.errors import BenchError


def test_round_trip_is_bit_equal_for_every_dtype():
    msg = {
        "w": torch.randn(3, 4),
        "d": torch.randn(5, dtype=torch.float64),
        "h": torch.randn(2, 2).half(),
        "bf": torch.randn(7).bfloat16(),
        "i": torch.arange(-3, 3, dtype=torch.int64),
        "i32": torch.tensor([1, -2], dtype=torch.int32),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "flag": torch.tensor(True),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "nan": torch.tensor([float("nan"), float("inf"), -0.0]),
    }
    out = wire.decode(wire.encode(msg))
    assert sorted(out) == sorted(msg)
    for k, v in msg.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        # Compare raw bits so NaN payloads and -0.0 count too.
        a = v.reshape(-1).contiguous().view(torch.uint8)
        b = out[k].reshape(-1).contiguous().view(torch.uint8)
        assert torch.equal(a, b), k


def test_byte_count_is_the_layout_arithmetic():
    # mlp-like message: weight (2, 3) float32 + bias (2,) float32 + num_samples int64 scalar.
    msg = {"fc.weight": torch.zeros(2, 3), "fc.bias": torch.zeros(2), "num_samples": torch.tensor(7)}
    expected = 8  # magic + count
    expected += 2 + len("fc.weight") + 1 + 1 + 4 * 2 + 8 + 6 * 4   # 53
    expected += 2 + len("fc.bias") + 1 + 1 + 4 * 1 + 8 + 2 * 4     # 31
    expected += 2 + len("num_samples") + 1 + 1 + 0 + 8 + 8         # 31
    assert expected == 8 + 53 + 31 + 31
    assert len(wire.encode(msg)) == expected


def test_encoding_is_deterministic_and_key_order_free():
    a = {"b": torch.ones(2), "a": torch.zeros(3)}
    b = {"a": torch.zeros(3), "b": torch.ones(2)}
    assert wire.encode(a) == wire.encode(b)
    assert wire.encode(a)[:4] == b"FQW1"
    assert struct.unpack_from("<I", wire.encode(a), 4)[0] == 2


def test_non_contiguous_and_grad_tensors_encode_their_values():
    t = torch.arange(12.0).reshape(3, 4).t()  # a transposed view
    p = torch.nn.Parameter(torch.ones(2))
    out = wire.decode(wire.encode({"t": t, "p": p}))
    assert torch.equal(out["t"], t) and not out["p"].requires_grad


def test_decoded_tensors_are_private_copies():
    buf = wire.encode({"x": torch.zeros(3)})
    out = wire.decode(buf)
    out["x"] += 1  # writable, and changing it does not change the next decode
    assert torch.equal(wire.decode(buf)["x"], torch.zeros(3))


def test_an_empty_message_costs_zero_bytes():
    assert wire.encode({}) == b"" and wire.decode(b"") == {}


@pytest.mark.parametrize("bad", [b"FQW", b"PKL\x00....", wire.encode({"x": torch.zeros(3)})[:-1],
                                 wire.encode({"x": torch.zeros(3)}) + b"\x00"])
def test_corrupt_payloads_are_rejected(bad):
    with pytest.raises(BenchError):
        wire.decode(bad)


def test_non_tensor_entries_are_refused():
    with pytest.raises(TypeError):
        wire.encode({"x": [1, 2]})


def test_ledger_totals_by_direction_and_round():
    led = wire.Ledger()
    led.record(1, 0, "down", b"x" * 10, ["w"])
    led.record(1, 0, "up", b"x" * 7, ["w", "num_samples"])
    led.record(2, 1, "down", b"x" * 5, ["w"])
    assert led.total("down") == 10 + 5
    assert led.total("up") == 7
    assert led.total(rnd=1) == 10 + 7
    assert led.keys_sent() == {"w", "num_samples"}


def test_ledger_rows_have_names_and_unpack_as_tuples():
    led = wire.Ledger()
    led.record(3, 7, "up", b"x" * 12, ["w", "b"])
    (row,) = led.entries
    assert (row.round, row.client, row.direction, row.bytes, row.keys) == (3, 7, "up", 12, ("b", "w"))
    rnd, cid, direction, n, keys = row  # still a tuple: older code that unpacks rows keeps working
    assert (rnd, n) == (3, 12)


def test_ledger_csv_round_trips():
    led = wire.Ledger()
    led.record(1, 0, "down", b"x" * 10, ["body.0.weight", "body.0.bias"])
    led.record(1, 0, "up", b"x" * 7, ["body.0.weight", "num_samples"])
    led.record(2, 11, "down", b"", [])  # an empty message: zero bytes, no keys
    text = led.to_csv()
    assert text.splitlines() == ["round,client,direction,bytes,keys",
                                 "1,0,down,10,body.0.bias body.0.weight",
                                 "1,0,up,7,body.0.weight num_samples",
                                 "2,11,down,0,"]
    assert wire.from_csv(text) == led.entries
    assert wire.from_csv(wire.to_csv(wire.from_csv(text))) == led.entries


def test_ledger_csv_refuses_what_it_could_not_read_back():
    with pytest.raises(ValueError, match="space, comma or newline"):
        wire.to_csv([wire.LedgerRow(1, 0, "up", 4, ("a,b",))])
    with pytest.raises(ValueError, match="not a ledger CSV"):
        wire.from_csv("r,c\n1,2\n")


# -- wire formats ---------------------------------------------------------------------------------

def entry_bytes(name: str, ndim: int, data: int) -> int:
    """One tensor's cost in the layout: u16 name length, name, u8 dtype, u8 ndim, u32 per dim, u64 nbytes, data."""
    return 2 + len(name) + 1 + 1 + 4 * ndim + 8 + data


@pytest.mark.parametrize("fmt,w_data,extra", [
    ("fp32", 12 * 4, 0),
    ("fp16", 12 * 2, 0),
    ("bf16", 12 * 2, 0),
    ("int8", 12 * 1, entry_bytes("w#scale", 0, 4)),  # plus the float32 scale, a 0-dim tensor
])
def test_each_format_costs_its_exact_bytes(fmt, w_data, extra):
    """A float32 (3, 4) tensor and an int64 count: the count travels as it is in every format."""
    msg = {"w": torch.randn(3, 4), "n": torch.tensor(7)}
    want = wire.HEADER_BYTES + entry_bytes("w", 2, w_data) + entry_bytes("n", 0, 8) + extra
    assert len(wire.Codec(fmt).encode(msg)) == want
    got = wire.Codec(fmt).decode(wire.Codec(fmt).encode(msg))
    assert sorted(got) == ["n", "w"] and got["w"].dtype == torch.float32 and torch.equal(got["n"], msg["n"])


def test_fp32_is_the_plain_encoding_bit_for_bit():
    msg = {"w": torch.randn(5, 3), "n": torch.tensor(2)}
    assert wire.Codec("fp32").encode(msg) == wire.encode(msg)
    assert wire.codec_of(object()) == wire.Codec("fp32")  # a config with no wire key: fp32


@pytest.mark.parametrize("fmt,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_formats_deliver_the_rounded_values(fmt, dtype):
    x = torch.randn(100) * 10
    got = wire.Codec(fmt).decode(wire.Codec(fmt).encode({"x": x}))["x"]
    assert torch.equal(got, x.to(dtype).to(torch.float32))  # round to nearest even, then back to float32


def test_int8_nearest_is_within_half_a_step_and_stochastic_within_one_and_unbiased():
    x = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    q, s = wire.quantize_int8(x)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127  # the largest |x| maps to +-127
    assert float(s) == pytest.approx(float(x.abs().max()) / 127, rel=1e-6)
    err = (q.float() * s - x).abs()
    assert float(err.max()) <= float(s) / 2 * (1 + 1e-5)
    codec = wire.Codec("int8", stochastic=True)
    draws = torch.stack([codec.decode(codec.encode({"x": x}, torch.Generator().manual_seed(i)))["x"] for i in range(200)])
    assert float((draws - x).abs().max()) < float(s) * (1 + 1e-5)
    # Unbiased: each draw's error has mean 0 and std <= s / 2, so the mean of 200 draws is within 5
    # standard errors, s / 2 / sqrt(200) each, at all 4000 entries (the largest of 4000 normals is ~4 sigma).
    assert float((draws.mean(0) - x).abs().max()) < 5 * float(s) / 2 / 200 ** 0.5
    assert float((draws.mean(0) - x).abs().mean()) < float((q.float() * s - x).abs().mean())
    # Stochastic rounding is a function of the generator: the same seed, the same bytes.
    assert codec.encode({"x": x}, torch.Generator().manual_seed(3)) == codec.encode({"x": x}, torch.Generator().manual_seed(3))


def test_int8_of_zeros_and_empty_tensors_decodes_to_zeros():
    codec = wire.Codec("int8")
    got = codec.decode(codec.encode({"z": torch.zeros(3), "e": torch.zeros(0, 2)}))
    assert torch.equal(got["z"], torch.zeros(3)) and got["e"].shape == (0, 2)


def test_formats_refuse_what_they_cannot_carry():
    with pytest.raises(BenchError, match="unknown wire format 'int4'; choose from fp32, fp16, bf16, int8"):
        wire.Codec("int4")
    with pytest.raises(ValueError, match="reserve"):
        wire.Codec("int8").encode({"a#scale": torch.ones(2)})
    with pytest.raises(ValueError, match="needs a generator"):
        wire.Codec("int8", stochastic=True).encode({"a": torch.ones(2)})


# -- top-k uplinks ---------------------------------------------------------------------------------

def test_topk_sends_exactly_k_entries_of_the_change_and_the_server_restores_the_rest():
    """A (10, 10) float32 tensor at 5%: k = ceil(0.05 * 100) = 5 entries of the change from the
    downlink (indices int32, values float32); the int64 count and a tensor the downlink did not hold
    travel as they are."""
    g = torch.Generator().manual_seed(0)
    down = {"w": torch.randn(10, 10, generator=g)}
    change = torch.randn(10, 10, generator=g)
    up = {"w": down["w"] + change, "n": torch.tensor(3), "extra": torch.ones(4)}
    codec = wire.Codec("topk", topk=0.05)
    buf, residuals = codec.encode_up(up, None, down, {})
    assert residuals == {}  # no error feedback asked for
    sent = wire.decode(buf)
    assert sorted(sent) == ["extra", "n", "w#idx", "w#val"] and sent["w#idx"].dtype == torch.int32
    want = wire.HEADER_BYTES + entry_bytes("w#idx", 1, 5 * 4) + entry_bytes("w#val", 1, 5 * 4) \
        + entry_bytes("n", 0, 8) + entry_bytes("extra", 1, 4 * 4)
    assert len(buf) == want
    top = change.reshape(-1).abs().topk(5).indices.sort().values
    assert torch.equal(sent["w#idx"].long(), top)  # the 5 largest |change|, ascending
    got = codec.decode_up(buf, down)
    assert torch.equal(got["n"], up["n"]) and torch.equal(got["extra"], up["extra"])
    flat_got, flat_down = got["w"].reshape(-1), down["w"].reshape(-1)
    assert torch.equal(flat_got[top], (down["w"] + change).reshape(-1)[top])
    rest = torch.ones(100, dtype=torch.bool)
    rest[top] = False
    assert torch.equal(flat_got[rest], flat_down[rest])  # what was not sent stays the server's value


def test_error_feedback_keeps_exactly_what_was_dropped_and_sends_it_later():
    g = torch.Generator().manual_seed(1)
    down = {"w": torch.zeros(20)}
    change = torch.randn(20, generator=g)
    codec = wire.Codec("topk", topk=0.1, feedback=True)  # k = 2
    buf, residuals = codec.encode_up({"w": change}, None, down, {})
    sent = codec.decode_up(buf, down)["w"]
    (res,) = residuals.values()
    assert list(residuals) == [wire.RESIDUAL + "w"]
    assert torch.equal(sent + res, change) and int((sent != 0).sum()) == 2  # sent + kept = the whole change
    # Next round, no new change: the residual's own top 2 go out, and the kept part shrinks by them.
    buf2, residuals2 = codec.encode_up({"w": torch.zeros(20)}, None, down, residuals)
    sent2 = codec.decode_up(buf2, down)["w"]
    top2 = res.abs().topk(2).indices
    assert torch.equal(sent2[top2], res[top2]) and torch.equal(sent2 + residuals2[wire.RESIDUAL + "w"], res)


def test_topk_labels_and_fraction_range():
    assert wire.Codec("topk", topk=0.01, feedback=True).label == "topk0.01+ef"
    assert wire.Codec("int8", stochastic=True).label == "int8+sr" and wire.Codec().label == "fp32"
    assert wire.Codec("topk").down() == wire.Codec()  # downlinks travel fp32 under topk
    with pytest.raises(BenchError, match=r"wire_topk must be in \(0, 1\], got 0"):
        wire.Codec("topk", topk=0)
