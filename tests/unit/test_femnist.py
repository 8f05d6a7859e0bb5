"""`femnist` (datasets/femnist.py) on small generated LEAF directories: shapes, 62 classes, the
natural writer split, the pixel convention, the all_data split, every bad input, and one FedAvg
round through the engine."""
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
from fedeq_bench.datasets.femnist import FemnistConfig

# Generated writers: (train, test) samples. Totals: w_b 25, w_a 15, w_d 15, w_c 10, so the ranking
# (largest first, ties by name) is w_b, w_a, w_d, w_c.
SIZES = {"w_a": (12, 3), "w_b": (20, 5), "w_c": (8, 2), "w_d": (12, 3)}
RANKED = ["w_b", "w_a", "w_d", "w_c"]


def samples(n: int, first_id: int, rng) -> tuple[list[list[float]], list[int]]:
    """n LEAF samples: 784 pixel values in [0, 1]; pixel 0 = sample id / 10000 (to trace a sample);
    labels cycle through 0..61 from the id, so 0 and 61 both occur."""
    xs, ys = [], []
    for k in range(n):
        sid = first_id + k
        px = np.round(rng.random(784), 4)
        px[0] = sid / 10000
        xs.append(px.tolist())
        ys.append(int((sid * 7) % 62))
    return xs, ys


def leaf_doc(users: dict[str, tuple[list, list]]) -> dict:
    return {"users": list(users), "num_samples": [len(y) for _, y in users.values()],
            "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()}}


def write_json(path, doc) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f)


def make_split_dir(root, sizes=SIZES, seed=0) -> dict[str, dict[str, tuple[list, list]]]:
    """LEAF `-t sample` layout: train over two files (w_a in both: merged in name order), test in one."""
    rng = np.random.default_rng(seed)
    data: dict[str, dict[str, tuple[list, list]]] = {"train": {}, "test": {}}
    next_id = 1
    for w, (ntr, nte) in sizes.items():
        for part, n in (("train", ntr), ("test", nte)):
            data[part][w] = samples(n, next_id, rng)
            next_id += n
    tr = data["train"]
    a_x, a_y = tr["w_a"]
    first = {"w_a": (a_x[:5], a_y[:5]), **{w: v for w, v in tr.items() if w in ("w_b", "w_c")}}
    second = {"w_a": (a_x[5:], a_y[5:]), **{w: v for w, v in tr.items() if w not in ("w_a", "w_b", "w_c")}}
    write_json(os.path.join(root, "train", "all_data_0_train_9.json"), leaf_doc(first))
    write_json(os.path.join(root, "train", "all_data_1_train_9.json"), leaf_doc(second))
    test_doc = leaf_doc(data["test"])
    test_doc["user_data"]["dropped"] = {"x": [], "y": []}  # LEAF leaves dropped writers' empty entries
    write_json(os.path.join(root, "test", "all_data_0_test_9.json"), test_doc)
    return data


def load(path, cfg: FemnistConfig | None = None, **kw):
    return get_dataset(f"femnist:{path}", cfg or FemnistConfig(), DataArgs(**{"seed": 0, **kw}))


def ids(x: np.ndarray) -> list[int]:
    """Sample ids from pixel 0 of (n, 1, 28, 28) images."""
    return [int(round(v * 10000)) for v in x[:, 0, 0, 0]]


@pytest.fixture
def split_dir(tmp_path):
    root = tmp_path / "femnist"
    return str(root), make_split_dir(str(root))


def test_registered_shapes_and_classes(split_dir):
    root, _ = split_dir
    ds = load(root)
    assert "femnist" in DATASETS.names()
    assert ds.name == "femnist" and ds.num_classes == 62 and ds.input_shape == (1, 28, 28)
    assert ds.default_models == {"explicit": "resnet20", "deq": "deq_resnet_s"}
    assert ds.partition == "femnist(natural,writers=4,layout=split,invert=False)"
    for c in ds.clients:
        for x, y in ((c.train_x, c.train_y), (c.val_x, c.val_y), (c.test_x, c.test_y)):
            assert x.dtype == np.float32 and x.shape[1:] == (1, 28, 28) and y.dtype == np.int64
            assert 0 <= y.min() and y.max() <= 61


def test_natural_split_one_client_per_writer(split_dir):
    root, data = split_dir
    ds = load(root, val_frac=0.0)
    assert len(ds.clients) == len(SIZES) == 4
    for c, w in zip(ds.clients, RANKED, strict=True):
        ntr, nte = SIZES[w]
        assert (len(c.train_y), len(c.test_y)) == (ntr, nte)  # sizes match num_samples
        # Train: w_a's two files merged in file-name order; test passed through in order.
        tx, ty = data["train"][w]
        np.testing.assert_array_equal(c.train_x.reshape(ntr, 784), np.array(tx, dtype=np.float32))
        np.testing.assert_array_equal(c.train_y, np.array(ty))
        sx, sy = data["test"][w]
        np.testing.assert_array_equal(c.test_x.reshape(nte, 784), np.array(sx, dtype=np.float32))
        np.testing.assert_array_equal(c.test_y, np.array(sy))


def test_val_is_carved_from_train(split_dir):
    root, data = split_dir
    ds = load(root, val_frac=0.1)
    b = ds.clients[0]  # w_b: 20 train -> round(0.1 * 20) = 2 val, 18 train
    assert (len(b.train_y), len(b.val_y), len(b.test_y)) == (18, 2, 5)
    assert sorted(ids(b.train_x) + ids(b.val_x)) == [int(round(v[0] * 10000)) for v in data["train"]["w_b"][0]]


def test_pixels_are_leafs_values_row_major_and_invert_flips_them(split_dir):
    root, data = split_dir
    plain = load(root, val_frac=0.0)
    flipped = load(root, FemnistConfig(invert=True), val_frac=0.0)
    sx = np.array(data["test"]["w_b"][0], dtype=np.float32)
    # LEAF flattens 28x28 row-major: value k sits at (row k // 28, column k % 28); 29 -> (1, 1).
    assert plain.clients[0].test_x[0, 0, 1, 1] == sx[0, 29]
    assert plain.clients[0].test_x[0, 0, 27, 0] == sx[0, 27 * 28]
    np.testing.assert_allclose(flipped.clients[0].test_x.reshape(-1, 784), 1.0 - sx, atol=1e-7)
    assert flipped.partition.endswith("invert=True)")


def test_clients_keep_the_largest_writers(split_dir):
    root, _ = split_dir
    full = load(root)
    two = load(root, clients=2)  # w_b (25), then w_a over w_d (both 15) by name
    assert len(two.clients) == 2
    for c, f in zip(two.clients, full.clients[:2], strict=True):
        np.testing.assert_array_equal(c.test_x, f.test_x)
    assert [len(c.test_y) for c in two.clients] == [SIZES["w_b"][1], SIZES["w_a"][1]]


def test_deterministic(split_dir):
    root, _ = split_dir
    assert load(root).fingerprint == load(root).fingerprint


def test_all_data_only_is_split_by_order(tmp_path):
    rng = np.random.default_rng(1)
    # n_train = max(1, int(0.8 * n)): 10 -> 8, 7 -> int(5.6) = 5, 2 -> max(1, 1) = 1; n = 1 dropped.
    users = {"p": samples(10, 100, rng), "q": samples(7, 200, rng), "r": samples(2, 300, rng),
             "s": samples(1, 400, rng)}
    write_json(tmp_path / "femnist" / "data" / "all_data" / "all_data_0.json", leaf_doc(users))
    ds = load(str(tmp_path / "femnist"), val_frac=0.0)  # LEAF's own data/ parent is looked into
    assert ds.partition == "femnist(natural,writers=3,layout=all,invert=False)"
    got = [(ids(c.train_x), ids(c.test_x)) for c in ds.clients]
    assert got == [
        (list(range(100, 108)), [108, 109]),
        (list(range(200, 205)), [205, 206]),
        ([300], [301]),
    ]
    half = load(str(tmp_path / "femnist"), FemnistConfig(train_frac=0.5), val_frac=0.0)
    assert [len(c.train_y) for c in half.clients] == [5, 3, 1]  # int(5.0), int(3.5), max(1, int(1.0))


def test_data_dir_and_env_find_a_femnist_directory(tmp_path, monkeypatch, split_dir):
    root, _ = split_dir  # tmp_path / "femnist"
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
    want = load(root).fingerprint
    assert get_dataset("femnist", FemnistConfig(), DataArgs(seed=0, data_dir=str(tmp_path))).fingerprint == want
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path))
    assert get_dataset("femnist", FemnistConfig(), DataArgs(seed=0)).fingerprint == want


# -- bad input -------------------------------------------------------------------------------------

def one_line_error(fn, *needles) -> str:
    with pytest.raises(BenchError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_missing_path_and_no_source(tmp_path, monkeypatch):
    one_line_error(lambda: load(str(tmp_path / "nope")), "not found", "nope", "TalwalkarLab/leaf")
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
    one_line_error(lambda: get_dataset("femnist", FemnistConfig(), DataArgs(seed=0)), "not found", "--data-dir")
    (tmp_path / "f.json").write_text("{}")
    one_line_error(lambda: load(str(tmp_path / "f.json")), "not a directory")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: load(str(tmp_path / "empty")), "no LEAF JSON", "all_data")


def write_all(tmp_path, doc, name="bad.json") -> str:
    write_json(tmp_path / "d" / "all_data" / name, doc)
    return str(tmp_path / "d")


def good_doc(n=3):
    return leaf_doc({"w": samples(n, 1, np.random.default_rng(0))})


def test_malformed_json_names_the_file(tmp_path):
    (tmp_path / "d" / "all_data").mkdir(parents=True)
    (tmp_path / "d" / "all_data" / "broken_7.json").write_text('{"users": ["w"], "num_samples": [')
    one_line_error(lambda: load(str(tmp_path / "d")), "broken_7.json", "not valid JSON")


def test_not_leaf_json(tmp_path):
    one_line_error(lambda: load(write_all(tmp_path, {"users": []})), "bad.json", "users, num_samples, user_data")


def test_user_in_num_samples_but_not_in_user_data(tmp_path):
    doc = good_doc()
    doc["users"].append("ghost")
    doc["num_samples"].append(4)
    one_line_error(lambda: load(write_all(tmp_path, doc)), "'ghost'", "not in user_data", "bad.json")


def test_users_and_num_samples_disagree(tmp_path):
    doc = good_doc()
    doc["num_samples"].append(4)
    one_line_error(lambda: load(write_all(tmp_path, doc)), "1 users but 2 num_samples")
    doc = good_doc()
    doc["num_samples"] = [5]
    one_line_error(lambda: load(write_all(tmp_path, doc)), "num_samples 5", "3 samples")


@pytest.mark.parametrize("label, needle", [(62, "label 62"), (-1, "label -1"), (1.5, "integers")])
def test_labels_out_of_range(tmp_path, label, needle):
    doc = good_doc()
    doc["user_data"]["w"]["y"][1] = label
    one_line_error(lambda: load(write_all(tmp_path, doc)), needle, "bad.json", "'w'")


def test_x_of_the_wrong_length(tmp_path):
    doc = good_doc()
    doc["user_data"]["w"]["x"][2] = doc["user_data"]["w"]["x"][2][:783]
    one_line_error(lambda: load(write_all(tmp_path, doc)), "x[2]", "784", "length 783")


def test_pixels_outside_0_1(tmp_path):
    doc = good_doc()
    doc["user_data"]["w"]["x"][0][5] = 255.0  # 0..255 data, not LEAF's grey / 255
    one_line_error(lambda: load(write_all(tmp_path, doc)), "[0, 1]")


def test_writer_in_train_files_only(tmp_path):
    rng = np.random.default_rng(0)
    write_json(tmp_path / "d" / "train" / "t.json", leaf_doc({"w": samples(3, 1, rng), "v": samples(3, 9, rng)}))
    write_json(tmp_path / "d" / "test" / "t.json", leaf_doc({"w": samples(1, 20, rng)}))
    one_line_error(lambda: load(str(tmp_path / "d")), "'v'", "train files only", "-t sample")


@pytest.mark.parametrize("partition", ["dirichlet:0.3", "shards:2"])
def test_only_the_natural_partition(split_dir, partition):
    root, _ = split_dir
    one_line_error(lambda: load(root, partition=partition), "natural", partition)
    assert load(root, partition="natural").fingerprint == load(root).fingerprint


def test_bad_train_frac_and_clients(split_dir):
    root, _ = split_dir
    one_line_error(lambda: load(root, FemnistConfig(train_frac=0.0)), "train_frac")
    one_line_error(lambda: load(root, clients=5), "has 4 writers", "1..4")


# -- through the engine ----------------------------------------------------------------------------

def test_one_fedavg_round_with_the_cnn(split_dir):
    root, _ = split_dir
    cfg = C.apply(C.default_config(), {"dataset": f"femnist:{root}", "rounds": 1, "backend": "serial",
                                       "clients": 3, "methods": "fedavg", "model": "cnn"})
    ds = load_dataset(cfg, 0)
    assert len(ds.clients) == 3
    res = engine.run_method(cfg, "fedavg", 0, ds, SerialBackend())
    (h,) = res.history
    assert res.model == "cnn"
    assert np.isfinite(h["loss/train"]) and 0.0 <= h["acc/mean"] <= 1.0 and h["bytes/up"] > 0
