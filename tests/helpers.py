"""Small builders shared by tests: a tiny npz federation and a config for it; the tiny task the
method tests share (a method, its server, the initial network and one client's data)."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from bench import config as C
from fedeq_bench.core import seeding
from fedeq_bench.methods.base import ClientTensors, Method, State, Task
from fedeq_bench.methods.nets import build_model

TINY_FEATURES, TINY_CLASSES = 4, 3
"""The method tests' task: 4 features, 3 classes; on `mlp`, body Linear(4, 200), Linear(200, 200) and
head Linear(200, 3)."""


class MethodSetup(NamedTuple):
    algo: Method
    server: State
    ref: nn.Module
    """The initial network the server was made from (same weights): the tests' by-hand reference."""
    data: ClientTensors


def method_setup(method: type[Method], *, data_seed: int, n: int = 12, labels: torch.Tensor | None = None,
                 model: str = "mlp", **cfg: Any) -> MethodSetup:
    """A method on the tiny task with its server, the initial network and one client's data.

    Config: `method.Config(model=model, **cfg)` (`model`: mlp, or deq_mlp for FeDEQ). The initial
    network is built right after torch.manual_seed(0), and the server made from it with the
    `server_init` stream of seed 0.
    Data: x (n, 4) ~ N(0, 1) from torch.Generator().manual_seed(data_seed), then labels uniform in
    {0, 1, 2} from the same generator (or `labels`, drawing nothing); validation = the first 2
    examples, test = the first 4."""
    algo = method(method.Config(model=model, **cfg), Task(model, (TINY_FEATURES,), TINY_CLASSES))
    torch.manual_seed(0)
    ref = build_model(model, (TINY_FEATURES,), TINY_CLASSES)
    server = algo.init_server(ref, seeding.generator(0, "server_init"))
    g = torch.Generator().manual_seed(data_seed)
    x = torch.randn(n, TINY_FEATURES, generator=g)
    y = torch.randint(0, TINY_CLASSES, (n,), generator=g) if labels is None else labels
    return MethodSetup(algo, server, ref, ClientTensors(x, y, x[:2], y[:2], x[:4], y[:4]))


def trajectory(method: type[Method], **cfg: Any) -> dict[str, float]:
    """A method's numbers on the tiny task (method_setup, data seed 1, 12 samples, lr 0.1, 2 epochs,
    batch 4, and `cfg`): client 0 trains rounds 1 and 2 (the server aggregating its upload alone),
    is evaluated, then client 5 joins from the new server and is personalized and evaluated.
    Float64 sums of what each step returns, so that a changed computation shows; the tests compare
    them with values recorded from the code before an option existed."""
    algo, server, _, d = method_setup(method, data_seed=1, n=12, lr=0.1, local_epochs=2, batch_size=4, **cfg)

    def total(tensors: dict) -> float:
        return float(sum(t.double().sum() for _, t in sorted(tensors.items())))

    state = algo.init_client(0, server, seeding.generator(0, "client_init", 0))
    rec: dict[str, float] = {}
    for rnd in (1, 2):
        up, state, m = algo.local_update(algo.broadcast(server, 0, rnd), state, d, seeding.generator(0, "local", rnd, 0))
        rec[f"up{rnd}"], rec[f"state{rnd}"], rec[f"loss{rnd}"] = total(up), total(state), m["loss"]
        if up:
            server, _ = algo.aggregate(server, [(0, up)], rnd)
    rec["eval"] = algo.evaluate(algo.broadcast(server, 0, 3), state, d, eval_rng(2, 0))["test_loss"]
    fresh = algo.init_client(5, server, seeding.generator(0, "client_init", 5))
    personal = algo.personalize(algo.broadcast(server, 5, 3), fresh, d, seeding.generator(0, "personalize", 2, 5))
    rec["personalized"] = total(personal)
    rec["eval_unseen"] = algo.evaluate(algo.broadcast(server, 5, 3), personal, d, eval_rng(2, 5))["test_loss"]
    return rec


def bn_net() -> nn.Module:
    """A tiny head(body(x)) with BatchNorm in the body, for the tiny task: body Linear(4, 8),
    BatchNorm1d(8), ReLU; head Linear(8, 3). Built after torch.manual_seed(0)."""
    from fedeq_bench.methods.nets import BodyHead

    torch.manual_seed(0)
    return BodyHead(nn.Sequential(nn.Linear(TINY_FEATURES, 8), nn.BatchNorm1d(8), nn.ReLU()),
                    nn.Linear(8, TINY_CLASSES))


def check_unseen_bn(method: type[Method], **cfg: Any) -> None:
    """A held-out client of a head-only personalization (FedRep, FedPer) on `bn_net`, one full-batch
    head epoch (`cfg` sets it): with unseen_bn = "keep" its evaluation uses the BatchNorm statistics
    that epoch left, by hand running_mean = 0.9 * 0 + 0.1 * mean(body Linear(x)) and running_var =
    0.9 * 1 + 0.1 * var(body Linear(x)) (unbiased; the Linear is frozen); with "drop" the final
    body's statistics (0 and 1), as before the option existed."""
    from fedeq_bench.methods.partial import KEPT_STATS
    from fedeq_bench.methods.train import eval_metrics

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, TINY_FEATURES, generator=g), torch.randint(0, TINY_CLASSES, (8,), generator=g)
    data = ClientTensors(x, y, x[:2], y[:2], x[:4], y[:4])
    got = {}
    for mode in ("drop", "keep"):
        algo = method(method.Config(lr=0.1, batch_size=8, unseen_bn=mode, **cfg), Task("mlp", (4,), 3), net=bn_net())
        server = algo.init_server(bn_net(), seeding.generator(0, "server_init"))
        down = algo.broadcast(server, 9, 3)
        state = algo.personalize(down, algo.init_client(9, server, None), data, seeding.generator(0, "personalize", 2, 9))
        got[mode] = (state, algo.evaluate(down, state, data, eval_rng(2, 9)), algo)
    (drop, m_drop, _), (keep, m_keep, algo) = got["drop"], got["keep"]
    assert set(drop) == {"head.weight", "head.bias"}
    assert set(keep) == set(drop) | {KEPT_STATS + k for k in ("body.1.running_mean", "body.1.running_var",
                                                              "body.1.num_batches_tracked")}
    assert all(torch.equal(keep[k], drop[k]) for k in drop)  # the same head either way
    h = x @ server["body.0.weight"].T + server["body.0.bias"]
    assert torch.allclose(keep[KEPT_STATS + "body.1.running_mean"], 0.1 * h.mean(0), atol=1e-6)
    assert torch.allclose(keep[KEPT_STATS + "body.1.running_var"], 0.9 + 0.1 * h.var(0), atol=1e-6)
    # Scored with those statistics (keep) or with the final body's (drop): a network loaded by hand.
    for state, metrics, stats in ((keep, m_keep, "kept"), (drop, m_drop, "server")):
        net = bn_net()
        net.load_state_dict({**server, **{k: v for k, v in state.items() if not k.startswith(KEPT_STATS)}})
        if stats == "kept":
            net.body[1].running_mean.copy_(state[KEPT_STATS + "body.1.running_mean"])
            net.body[1].running_var.copy_(state[KEPT_STATS + "body.1.running_var"])
        assert metrics == eval_metrics(net, data)
    assert m_keep["test_loss"] != m_drop["test_loss"]


def eval_rng(rnd: int = 1, cid: int = 0) -> torch.Generator:
    """The generator the engine hands evaluate() for client `cid` after round `rnd` (bench/loop/backends.py)."""
    return seeding.generator(0, "eval", rnd, cid)


def write_tiny_npz(path, clients=5, n_train=20, n_test=8, d=4, classes=3, seed=0):
    """`clients` clients with `n_train`/`n_test` samples of `d` features; labels from a linear rule."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, classes))
    arrays = {}
    for k in range(clients):
        for split, n in (("train", n_train), ("test", n_test)):
            x = rng.normal(size=(n, d)).astype(np.float32) + k * 0.1
            y = (x @ w).argmax(1).astype(np.int64)
            y[:classes] = np.arange(classes)  # every class present, so num_classes == classes
            arrays[f"{split}_x_{k}"], arrays[f"{split}_y_{k}"] = x, y
    np.savez(path, **arrays)
    return str(path)


def tiny_config(npz_path, **run):
    """Config for the tiny npz task; `run` overrides run keys (values typed or strings)."""
    cfg = C.default_config()
    base = {"dataset": f"npz:{npz_path}", "rounds": 2, "backend": "serial", "val_frac": 0.1}
    base.update(run)
    return C.apply(cfg, base)


def check_finetuning_follows_rng(algo, down, state, d, tuned_by_hand):
    """Evaluation that fine-tunes (FedAvg-FT, FedBABU) on 8 samples in batches of 4, one epoch: its
    metrics equal `eval_metrics(tuned_by_hand([first 4, last 4 of the permutation]), d)`, with the
    permutation drawn as methods.train.minibatches draws it from the `eval` generator it is handed.
    Same generator: the same metrics bit for bit; another round's: other batches, other metrics."""
    from fedeq_bench.methods.train import eval_metrics

    def expected(rnd):
        order = torch.randperm(8, generator=seeding.generator(0, "eval", rnd, 0))
        return eval_metrics(tuned_by_hand([order[:4], order[4:]]), d), set(order[:4].tolist())

    got = {rnd: algo.evaluate(down, state, d, seeding.generator(0, "eval", rnd, 0)) for rnd in (1, 2)}
    (want1, first1), (want2, first2) = expected(1), expected(2)
    for m, want in ((got[1], want1), (got[2], want2)):
        assert m["test_acc"] == want["test_acc"] and abs(m["test_loss"] - want["test_loss"]) < 1e-6
    assert algo.evaluate(down, state, d, seeding.generator(0, "eval", 1, 0)) == got[1]
    assert first1 != first2  # round 2's generator groups the samples differently ...
    assert abs(got[2]["test_loss"] - got[1]["test_loss"]) > 1e-6  # ... and evaluation follows it


_STORE_TEMPLATE: list[str] = []


def new_store(path) -> str:
    """`sqlite:///PATH` of a new, empty MLflow store at `path`, for tests whose subject is not the store's
    creation: a copy of one store MLflow made once in this process. Making one runs MLflow's schema
    migrations (about 2 s of CPU each time, some 70 times a suite); the copy is the same file, down to
    its Default experiment (whose artifact folder names the template's; runs here use their own
    experiment)."""
    import atexit
    import os
    import shutil
    import tempfile

    if not _STORE_TEMPLATE:
        from mlflow.tracking import MlflowClient

        folder = tempfile.mkdtemp(prefix="store-template")
        atexit.register(shutil.rmtree, folder, True)
        template = os.path.join(folder, "mlflow.db")
        MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
        _STORE_TEMPLATE.append(template)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    shutil.copyfile(_STORE_TEMPLATE[0], path)
    return f"sqlite:///{path}"


def synthetic_run(method: str, **keys):
    """`(dataset, MethodResult)` of `method` on synthetic, 6 clients, 2 rounds, fraction 0.5, serial,
    seed 0, with `keys` applied as `--set` would (the wire-format and FLOP tests' small run)."""
    from bench.loop.backends import SerialBackend
    from bench.loop.engine import run_method
    from fedeq_bench.datasets import DataArgs, get_dataset

    cfg = C.apply(C.default_config(), {"dataset": "synthetic", "clients": 6, "rounds": 2, "backend": "serial",
                                       "fraction": 0.5, **keys})
    ds = get_dataset("synthetic", cfg.datasets["synthetic"],
                     DataArgs(seed=0, clients=6, partition=None, val_frac=0.1, frac_unseen=0.0, data_dir=None))
    return ds, run_method(cfg, method, 0, ds, SerialBackend())
