"""`shakespeare` (datasets/shakespeare.py): vocabulary, role parsing, exact window arithmetic on a
hand-written play, the time split, the cap, LEAF JSON (split and all_data), the real tiny
Shakespeare, every bad input, and one FedAvg round through the engine."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from bench import config as C
from bench.experiment import load_dataset
from bench.loop import engine
from bench.loop.backends import SerialBackend
from fedeq_bench.core.errors import BenchError
from fedeq_bench.datasets import DataArgs, get_dataset
from fedeq_bench.datasets.base import DATASETS
from fedeq_bench.datasets.shakespeare import (
    LEAF_LETTERS,
    PAD,
    UNK,
    VOCAB_SIZE,
    ShakespeareConfig,
    cap_sizes,
    decode,
    encode,
    evenly_spaced,
    parse_play,
    role_text,
    text_windows,
    time_split,
)


def load(path: str, cfg: ShakespeareConfig | None = None, **kw):
    return get_dataset(f"shakespeare:{path}", cfg or ShakespeareConfig(), DataArgs(**{"seed": 0, **kw}))


def line(n: int, seed: int) -> str:
    """A line of exactly n characters from LEAF's vocabulary, no double spaces, no edge spaces."""
    rng = np.random.default_rng(seed)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,.;'!?"
    return "".join(rng.choice(list(letters), n))


# The hand-written play. Role texts (LEAF: lines joined by single spaces, plus a trailing space):
#   ALICE: two blocks of one 199-char line -> 199 + 1 + 199 + 1 = 400 chars -> 400 - 80 = 320 windows
#   BOB:   one 150-char line               -> 151 chars -> 71 windows
#   CAROL: one 299-char line               -> 300 chars -> 220 windows
#   DAVE:  one 279-char line               -> 280 chars -> 200 windows
A1, A2, B1, C1, D1 = line(199, 1), line(199, 2), line(150, 3), line(299, 4), line(279, 5)
PLAY = (f"Alice:\n{A1}\n\nBob:\n{B1}\n\n\nCarol:\n{C1}\n\nA block without a header line\nis nobody's text\n\n"
        f"ALICE:\n{A2}\n\nDave:\n{D1}\n")
TEXT = {"ALICE": A1 + " " + A2 + " ", "BOB": B1 + " ", "CAROL": C1 + " ", "DAVE": D1 + " "}
# With train_frac = 0.5: n_train = int(0.5 n), test windows start at n_train + 80.
#   ALICE n=320: train 0..159 (160), test 240..319 (80): 240 kept
#   BOB   n=71:  train 0..34, test would start at 115 > 70: no test window -> dropped
#   CAROL n=220: train 0..109 (110), test 190..219 (30): 140 kept
#   DAVE  n=200: train 0..99 (100), test 180..199 (20): 120 kept
HALF = ShakespeareConfig(train_frac=0.5, min_samples=100, max_samples_per_client=0)


@pytest.fixture
def play(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text(PLAY)
    return str(path)


def windows_at(text: str, starts, targets: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """Expected (x, y) of the windows starting at `starts` of `text`, built from the string: y is
    the window shifted by one character (`all`, the default) or the next character (`last`)."""
    ids = encode(text)
    x = np.stack([ids[s:s + 80] for s in starts]).astype(np.float32)
    if targets == "all":
        y = np.stack([ids[s + 1:s + 81] for s in starts]).astype(np.int64)
    else:
        y = np.array([ids[s + 80] for s in starts], dtype=np.int64)
    return x, y


# -- vocabulary and parsing ------------------------------------------------------------------------

def test_registered_with_models_and_vocabulary_size():
    assert "shakespeare" in DATASETS.names()
    assert VOCAB_SIZE == 90  # the FeDEQ paper's vocabulary
    # LEAF's ALL_LETTERS: 80 distinct symbols.
    assert len(LEAF_LETTERS) == 80 and len(set(LEAF_LETTERS)) == 80


def test_vocabulary_reserves_zero_for_padding():
    # id = ALL_LETTERS.index(c) + 1: "\n" is index 0 -> 1, " " index 1 -> 2, "}" index 79 -> 80.
    assert encode("\n").tolist() == [1] and encode(" ").tolist() == [2] and encode("}").tolist() == [80]
    assert encode("a").tolist() == [LEAF_LETTERS.index("a") + 1] == [54]
    ids = encode(LEAF_LETTERS)
    assert ids.tolist() == list(range(1, 81)) and PAD == 0 and PAD not in ids
    # Outside the vocabulary (tiny Shakespeare's "$", a non-ASCII letter) -> UNK = 81 < 90.
    assert encode("$é").tolist() == [UNK, UNK] == [81, 81] and UNK < VOCAB_SIZE
    assert decode(encode("To be, or not to be}")) == "To be, or not to be}"
    assert decode([0, 0, 54]) == "a"  # padding decodes to nothing


def test_parse_play_follows_role_blocks():
    text = "Alice:\nhello: there\nsecond line\n\nnot a header\nignored:\n\nBOB:\nhi\r\n\nAlice:\nagain\n"
    roles = parse_play(text)
    # "hello: there" is text (only a block's first line can be a header); the headerless block is
    # skipped; "Alice" and "ALICE" are one role (LEAF upper-cases names).
    assert roles == {"ALICE": ["hello: there", "second line", "again"], "BOB": ["hi"]}


def test_role_text_is_leafs_join():
    # Lines + "\n", newlines -> spaces, runs of 2+ spaces -> one: "ab" "c  d" -> "ab c d ".
    assert role_text(["ab", "c  d"]) == "ab c d "
    assert role_text(["x "]) == "x "  # "x \n" -> "x  " -> "x "


def test_a_100_char_text_has_20_windows():
    text = line(100, 7)
    rows = text_windows(encode(text))
    assert rows.shape == (100 - 80, 81) == (20, 81)
    for i in (0, 7, 19):
        assert decode(rows[i]) == text[i:i + 81]  # x = text[i:i+80], y = text[i+80]
    assert text_windows(encode(line(80, 8))).shape == (0, 81)  # 80 chars: no target after the window


def test_time_split_and_cap_arithmetic():
    # n = 1000, train_frac 0.8: train 0..799, gap 800..879, test 880..999 (120).
    tr, te = time_split(1000, 0.8)
    assert (tr.start, tr.stop, te.start, te.stop) == (0, 800, 880, 1000)
    # n = 999: int(0.8 * 999) = int(799.2) = 799 train (LEAF's int(), not rounding), test 879..998.
    tr, te = time_split(999, 0.8)
    assert (tr.stop, te.start, len(te)) == (799, 879, 120)
    # Cap 100 over (800, 120): train int(100 * 800 / 920) = int(86.96) = 86, test 14.
    assert cap_sizes(800, 120, 100) == (86, 14)
    assert cap_sizes(800, 120, 0) == (800, 120) and cap_sizes(30, 10, 40) == (30, 10)
    # 4 of 10 evenly spaced: floor(j * 10 / 4) = 0, 2, 5, 7.
    assert evenly_spaced(10, 4).tolist() == [0, 2, 5, 7]
    assert evenly_spaced(3, 5).tolist() == [0, 1, 2]


# -- the hand-written play -------------------------------------------------------------------------

def test_hand_play_windows_exactly(play):
    ds = load(play, HALF, val_frac=0.0)
    assert ds.name == "shakespeare" and ds.num_classes == 90 and ds.input_shape == (80,)
    assert ds.default_models == {"explicit": "transformer8", "deq": "deq_transformer"}
    assert ds.partition == "shakespeare(natural,roles=3,source=text,cap=0)"
    # Ranked by kept windows: ALICE 240, CAROL 140, DAVE 120; BOB has no test window.
    want = {0: ("ALICE", 160, 240, 320), 1: ("CAROL", 110, 190, 220), 2: ("DAVE", 100, 180, 200)}
    assert len(ds.clients) == 3
    for cid, (role, n_train, test_from, n) in want.items():
        c = ds.clients[cid]
        x, y = windows_at(TEXT[role], range(0, n_train))
        np.testing.assert_array_equal(c.train_x, x)
        np.testing.assert_array_equal(c.train_y, y)
        x, y = windows_at(TEXT[role], range(test_from, n))
        np.testing.assert_array_equal(c.test_x, x)
        np.testing.assert_array_equal(c.test_y, y)
        assert c.train_x.dtype == np.float32 and c.train_y.dtype == np.int64
        assert (c.train_x != PAD).all() and (c.test_x != PAD).all()


def test_min_samples_and_clients_pick_the_largest_roles(play):
    # min_samples 130 drops DAVE (120 kept windows); clients=1 keeps ALICE (240) alone.
    ds = load(play, ShakespeareConfig(train_frac=0.5, min_samples=130, max_samples_per_client=0), val_frac=0.0)
    assert [len(c.train_y) + len(c.test_y) for c in ds.clients] == [240, 140]
    one = load(play, HALF, val_frac=0.0, clients=1)
    assert len(one.clients) == 1
    np.testing.assert_array_equal(one.clients[0].test_x, ds.clients[0].test_x)


def test_cap_keeps_evenly_spaced_windows_on_both_sides(play):
    cfg = ShakespeareConfig(train_frac=0.5, min_samples=100, max_samples_per_client=120)
    ds = load(play, cfg, val_frac=0.0)
    # ALICE (160 train, 80 test) > 120: train int(120 * 160 / 240) = 80 windows, floor(j * 160 / 80)
    # = 2j; test 40 windows, 240 + floor(j * 80 / 40) = 240 + 2j.
    alice = ds.clients[0]
    x, y = windows_at(TEXT["ALICE"], range(0, 160, 2))
    np.testing.assert_array_equal(alice.train_x, x)
    x, y = windows_at(TEXT["ALICE"], range(240, 320, 2))
    np.testing.assert_array_equal(alice.test_x, x)
    np.testing.assert_array_equal(alice.test_y, y)
    # CAROL (110, 30) = 140 > 120: train int(120 * 110 / 140) = int(94.3) = 94, test 26.
    # DAVE (100, 20) = 120 = the cap: untouched.
    assert [(len(c.train_y), len(c.test_y)) for c in ds.clients] == [(80, 40), (94, 26), (100, 20)]


def test_validation_comes_from_train_windows(play):
    ds = load(play, HALF, val_frac=0.1)
    alice = ds.clients[0]
    # round(0.1 * 160) = 16 validation windows, all from ALICE's 160 train windows.
    assert (len(alice.train_y), len(alice.val_y)) == (144, 16)
    x, _ = windows_at(TEXT["ALICE"], range(160))
    pool = {r.tobytes() for r in x}
    assert all(r.tobytes() in pool for r in alice.val_x)


def test_targets_all_is_the_shifted_window_and_last_its_last_column(play):
    every = load(play, HALF, val_frac=0.0)
    last = load(play, ShakespeareConfig(train_frac=0.5, min_samples=100, max_samples_per_client=0, targets="last"),
                val_frac=0.0)
    assert last.partition == "shakespeare(natural,roles=3,source=text,cap=0,targets=last)"
    for ca, cl in zip(every.clients, last.clients, strict=True):
        assert ca.train_y.shape == (len(ca.train_x), 80) and cl.train_y.shape == (len(cl.train_x),)
        np.testing.assert_array_equal(ca.train_x, cl.train_x)
        np.testing.assert_array_equal(ca.test_y[:, -1], cl.test_y)
        # y[:, t] is x[:, t + 1]: position t predicts the next character of the window.
        np.testing.assert_array_equal(ca.train_y[:, :-1], cl.train_x[:, 1:].astype(np.int64))
    # The `last` labels are ALICE's next characters, built from the string.
    np.testing.assert_array_equal(last.clients[0].train_y, windows_at(TEXT["ALICE"], range(160), "last")[1])


def test_per_position_loss_and_accuracy_count_tokens():
    """Hand-set logits, N = 2 windows of T = 3 positions, V = 4: CE is the mean over 6 tokens and
    accuracy correct tokens / 6; with one label per window the last position is scored."""
    import torch
    import torch.nn.functional as F

    from fedeq_bench.core.types import ClientTensors
    from fedeq_bench.methods.train import count_correct, cross_entropy, eval_metrics

    logits = torch.tensor([[[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]],
                           [[0, 0, 0, 4.0], [4.0, 0, 0, 0], [0, 4.0, 0, 0]]])  # argmax 0 1 2 / 3 0 1
    y = torch.tensor([[0, 1, 3], [3, 2, 1]])  # right: 0 1 . / 3 . 1 -> 4 of 6
    assert count_correct(logits, y) == 4
    rows = logits.reshape(6, 4)
    per_token = -torch.log_softmax(rows, -1)[torch.arange(6), y.reshape(6)]
    assert torch.allclose(cross_entropy(logits, y), per_token.sum() / 6)
    # One label per window: the last position, logits[:, -1] = argmax 2 and 1.
    y_last = torch.tensor([2, 0])
    assert count_correct(logits, y_last) == 1
    assert torch.allclose(cross_entropy(logits, y_last), F.cross_entropy(logits[:, -1], y_last))

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits[x[:, 0].long()]

    x = torch.tensor([[0.0], [1.0]])
    data = ClientTensors(x, y, x[:0], y[:0], x, y)
    m = eval_metrics(Fixed(), data)
    assert m["test_acc"] == 4 / 6 and m["test_n"] == 2.0  # tokens correct / tokens; examples counted
    assert abs(m["test_loss"] - float(per_token.mean())) < 1e-6
    # A per-example model cannot meet per-position labels: one clear error.
    with pytest.raises(BenchError, match="shakespeare.targets=last"):
        cross_entropy(logits[:, -1], y)


# -- LEAF JSON -------------------------------------------------------------------------------------

def leaf_json(users: dict[str, tuple[list[str], list[str]]]) -> dict:
    return {"users": list(users), "num_samples": [len(v[1]) for v in users.values()],
            "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()}}


def windows_str(text: str, starts) -> tuple[list[str], list[str]]:
    return [text[s:s + 80] for s in starts], [text[s + 80] for s in starts]


def write_json(path, doc) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f)


def test_leaf_split_directory_round_trip(tmp_path):
    # LEAF -t sample layout; ALICE's train windows are spread over two files (merged in name order).
    a, c = TEXT["ALICE"], TEXT["CAROL"]
    write_json(tmp_path / "train" / "a_train.json", leaf_json({"ALICE": windows_str(a, range(0, 100)),
                                                               "CAROL": windows_str(c, range(0, 90))}))
    write_json(tmp_path / "train" / "b_train.json", leaf_json({"ALICE": windows_str(a, range(100, 150))}))
    doc = leaf_json({"ALICE": windows_str(a, range(200, 260)), "CAROL": windows_str(c, range(120, 140))})
    doc["user_data"]["GHOST"] = {"x": [], "y": []}  # LEAF leaves dropped users' empty entries: ignored
    write_json(tmp_path / "test" / "all_test.json", doc)
    ds = load(str(tmp_path), ShakespeareConfig(), val_frac=0.0)
    assert ds.partition == "shakespeare(natural,roles=2,source=leaf,cap=2000)"
    # ALICE: 100 + 50 train, 60 test = 210 kept > CAROL: 90 + 20 = 110.
    alice, carol = ds.clients
    np.testing.assert_array_equal(alice.train_x, windows_at(a, range(0, 150))[0])
    np.testing.assert_array_equal(alice.test_y, windows_at(a, range(200, 260))[1])
    np.testing.assert_array_equal(carol.test_x, windows_at(c, range(120, 140))[0])


def test_leaf_all_data_matches_the_raw_text(tmp_path, play):
    # LEAF's all_data holds every stride-1 window in text order, so the same time split applies:
    # the JSON and the raw text give identical clients.
    doc = leaf_json({role: windows_str(TEXT[role], range(len(TEXT[role]) - 80)) for role in TEXT})
    write_json(tmp_path / "leaf" / "data" / "all_data" / "all_data.json", doc)  # LEAF's own data/ parent
    from_json = load(str(tmp_path / "leaf"), HALF)
    from_text = load(play, HALF)
    assert from_json.partition == "shakespeare(natural,roles=3,source=leaf-all,cap=0)"
    assert len(from_json.clients) == len(from_text.clients) == 3
    for cj, ct in zip(from_json.clients, from_text.clients, strict=True):
        for f in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
            np.testing.assert_array_equal(getattr(cj, f), getattr(ct, f))


# -- bad input -------------------------------------------------------------------------------------

def one_line_error(fn, *needles) -> str:
    with pytest.raises(BenchError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_missing_path_is_one_line(tmp_path):
    one_line_error(lambda: load(str(tmp_path / "nope.txt")), "not found", "nope.txt", "--set shakespeare.path")


def test_no_source_anywhere_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
    get = lambda **kw: get_dataset("shakespeare", ShakespeareConfig(), DataArgs(seed=0, **kw))  # noqa: E731
    one_line_error(get, "not found", "--data-dir", "TalwalkarLab/leaf")
    one_line_error(lambda: get(data_dir=str(tmp_path)), "tinyshakespeare.txt", str(tmp_path))


def test_data_dir_and_env_are_searched(tmp_path, monkeypatch, play):
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "tinyshakespeare.txt").write_text(PLAY)
    want = load(play, HALF).fingerprint
    got = get_dataset("shakespeare", HALF, DataArgs(seed=0, data_dir=str(tmp_path / "d")))
    assert got.fingerprint == want
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "d"))
    assert get_dataset("shakespeare", HALF, DataArgs(seed=0)).fingerprint == want


def test_malformed_json_names_the_file(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "train" / "t.json").write_text('{"users": ["a"], ')
    write_json(tmp_path / "test" / "s.json", leaf_json({}))
    one_line_error(lambda: load(str(tmp_path)), "t.json", "not valid JSON")


def test_user_missing_from_user_data(tmp_path):
    doc = leaf_json({"ALICE": windows_str(TEXT["ALICE"], range(10))})
    doc["users"].append("BOB")
    doc["num_samples"].append(3)
    write_json(tmp_path / "all_data" / "x.json", doc)
    one_line_error(lambda: load(str(tmp_path)), "'BOB'", "not in user_data", "x.json")


def test_wrong_window_length_and_count(tmp_path):
    x, y = windows_str(TEXT["ALICE"], range(10))
    x[3] = x[3][:79]
    write_json(tmp_path / "a" / "all_data" / "x.json", leaf_json({"ALICE": (x, y)}))
    one_line_error(lambda: load(str(tmp_path / "a")), "x[3]", "80-character", "length 79")
    doc = leaf_json({"ALICE": windows_str(TEXT["ALICE"], range(10))})
    doc["num_samples"] = [11]
    write_json(tmp_path / "b" / "all_data" / "x.json", doc)
    one_line_error(lambda: load(str(tmp_path / "b")), "num_samples 11", "10 samples")


def test_train_only_user_and_half_layout(tmp_path):
    write_json(tmp_path / "a" / "train" / "t.json", leaf_json({"ALICE": windows_str(TEXT["ALICE"], range(10))}))
    one_line_error(lambda: load(str(tmp_path / "a")), "no test/*.json")
    write_json(tmp_path / "a" / "test" / "t.json", leaf_json({"BOB": windows_str(TEXT["BOB"], range(10))}))
    one_line_error(lambda: load(str(tmp_path / "a")), "'ALICE'", "train files only")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: load(str(tmp_path / "empty")), "no LEAF JSON")


def test_text_without_roles_and_json_file(tmp_path):
    (tmp_path / "p.txt").write_text("just some words\nand more\n")
    one_line_error(lambda: load(str(tmp_path / "p.txt")), "ROLE:")
    (tmp_path / "d.json").write_text("{}")
    one_line_error(lambda: load(str(tmp_path / "d.json")), "JSON file", "directory")


@pytest.mark.parametrize("partition", ["dirichlet:0.5", "shards:2", "iid"])
def test_only_the_natural_partition(play, partition):
    one_line_error(lambda: load(play, HALF, partition=partition), "natural", partition)


def test_natural_partition_is_accepted(play):
    assert load(play, HALF, partition="natural").fingerprint == load(play, HALF).fingerprint


@pytest.mark.parametrize("cfg, needle", [
    (ShakespeareConfig(train_frac=1.0), "train_frac"),
    (ShakespeareConfig(min_samples=1), "min_samples"),
    (ShakespeareConfig(min_samples=100, max_samples_per_client=50), "max_samples_per_client"),
    (ShakespeareConfig(targets="next"), "shakespeare.targets must be one of all, last"),
])
def test_bad_config(play, cfg, needle):
    one_line_error(lambda: load(play, cfg), needle)


def test_too_many_clients_and_no_eligible_role(play):
    one_line_error(lambda: load(play, HALF, clients=4), "has 3 roles", "1..3")
    one_line_error(lambda: load(play, ShakespeareConfig(min_samples=500, max_samples_per_client=0)), "no role")


# -- the real tiny Shakespeare ---------------------------------------------------------------------

def expected_roles(path: str, min_samples=64, train_frac=0.8) -> list[tuple[str, str, int]]:
    """(role, its text, kept windows), ranked largest first: computed here from the file with a
    parser written for this test (blocks split on blank lines, first line `NAME:`)."""
    with open(path) as f:
        raw = f.read()
    # Its one character outside LEAF's vocabulary is "$" (a typo, "sha$l"): it becomes UNK, which
    # decodes to U+FFFD, so the expected text carries U+FFFD there too.
    assert set(raw) - set(LEAF_LETTERS) == {"$"}
    blocks = [b for b in raw.replace("$", "\ufffd").split("\n\n") if b.strip()]
    lines: dict[str, list[str]] = {}
    for b in blocks:
        head, *rest = b.strip("\n").split("\n")
        assert head.endswith(":"), head
        lines.setdefault(head[:-1].upper(), []).extend(rest)
    out = []
    for role, ls in lines.items():
        text = " ".join(ls) + " "
        while "  " in text:
            text = text.replace("  ", " ")
        n = len(text) - 80
        n_train = int(train_frac * n)
        n_test = n - n_train - 80
        if n_test >= 1 and n_train + n_test >= min_samples:
            out.append((role, text, n_train + n_test))
    return sorted(out, key=lambda r: (-r[2], r[0]))


@pytest.fixture(scope="module")
def real(tiny_shakespeare):
    return load(tiny_shakespeare, ShakespeareConfig(max_samples_per_client=300)), expected_roles(tiny_shakespeare)


def windows_of(x: np.ndarray, y: np.ndarray) -> list[str]:
    """Each window's 80 characters and its next one (y's last column with per-position targets)."""
    return [decode(r) + decode(np.atleast_1d(t)[-1:]) for r, t in zip(x, y, strict=True)]


def test_real_roles_become_clients(real):
    ds, roles = real
    assert len(ds.clients) == len(roles) > 100  # 183 roles of 303 have enough text for the split
    for c, (_role, text, kept) in zip(ds.clients, roles, strict=True):
        n = len(c.train_y) + len(c.val_y) + len(c.test_y)
        assert n == min(kept, 300) >= 64  # every client >= min_samples, at most the cap
        for x, y in ((c.train_x, c.train_y), (c.val_x, c.val_y), (c.test_x, c.test_y)):
            assert (x != PAD).all() and (y != PAD).all() and x.max() < 90 and y.max() < 90
        # Every window (x then y) is a piece of its role's text.
        assert all(w in text for w in windows_of(np.concatenate([c.train_x, c.test_x]),
                                                 np.concatenate([c.train_y, c.test_y])))


def test_real_train_windows_precede_test_windows(real):
    ds, roles = real
    for c, (role, text, _) in zip(ds.clients, roles, strict=True):
        train = windows_of(np.concatenate([c.train_x, c.val_x]), np.concatenate([c.train_y, c.val_y]))
        test = windows_of(c.test_x, c.test_y)
        # find() is at or before a window's true start, rfind() at or after it, so this holds for
        # the true starts too: every test window starts after the last train window's target.
        last_train_target = max(text.find(w) for w in train) + 80
        assert min(text.rfind(w) for w in test) > last_train_target, role


def test_real_clients_arg_keeps_the_largest_roles(real, tiny_shakespeare):
    ds, roles = real
    top = load(tiny_shakespeare, ShakespeareConfig(max_samples_per_client=300), clients=5)
    assert len(top.clients) == 5
    assert [r[2] for r in roles[:5]] == sorted((r[2] for r in roles), reverse=True)[:5]
    for c, full, (role, text, _) in zip(top.clients, ds.clients[:5], roles[:5], strict=True):
        np.testing.assert_array_equal(c.test_x, full.test_x)
        assert all(w in text for w in windows_of(c.test_x, c.test_y)), role


def test_real_is_deterministic(real, tiny_shakespeare):
    ds, _ = real
    again = load(tiny_shakespeare, ShakespeareConfig(max_samples_per_client=300))
    assert again.fingerprint == ds.fingerprint
    # The seed only moves the validation carve: test windows are the same at another seed.
    other = load(tiny_shakespeare, ShakespeareConfig(max_samples_per_client=300), seed=1)
    assert other.fingerprint != ds.fingerprint
    np.testing.assert_array_equal(other.clients[0].test_x, ds.clients[0].test_x)


# -- through the engine ----------------------------------------------------------------------------

@pytest.mark.parametrize("targets", ["all", "last"])
def test_one_fedavg_round_with_transformer8(play, targets):
    cfg = C.apply(C.default_config(), {
        "dataset": f"shakespeare:{play}", "rounds": 1, "backend": "serial", "clients": 3,
        "methods": "fedavg", "model": "transformer8", "val_frac": 0.1, "shakespeare.targets": targets,
        "shakespeare.train_frac": 0.5, "shakespeare.min_samples": 100, "shakespeare.max_samples_per_client": 100,
    })
    ds = load_dataset(cfg, 0)
    assert C.resolve_method(C.apply(cfg, {"model": "none"}), "fedavg", ds.default_models).model == "transformer8"  # the pairing
    res = engine.run_method(cfg, "fedavg", 0, ds, SerialBackend())
    (h,) = res.history
    assert res.model == "transformer8"
    assert np.isfinite(h["loss/train"]) and 0.0 <= h["acc/mean"] <= 1.0
    assert h["bytes/up"] > 0 and h["bytes/down"] > 0


def test_describe_counts_windows_as_sizes_and_tokens_in_histograms():
    """Per-position labels (N, T): a client's size is N windows; its label histogram counts N * T tokens."""
    import numpy as np

    from fedeq_bench.datasets.base import ClientData, FederatedDataset
    from fedeq_bench.datasets.describe import describe, label_counts

    y = np.array([[0, 1, 1], [2, 2, 2]], dtype=np.int64)  # 2 windows x 3 tokens: class 0 once, 1 twice, 2 three times
    x = np.zeros((2, 3), dtype=np.float32)
    ds = FederatedDataset("toy", [ClientData(x, y, x[:0], y[:0], x, y)], 3, (3,))
    assert label_counts(ds, "train").tolist() == [[1, 2, 3]]
    text = describe(ds)
    assert "total train 2  val 0  test 2" in text  # windows, not the 6 tokens
    assert "0:1 1:2 2:3" in text and "labels counted per token" in text
