"""kNN-Per: FedAvg training; evaluation mixes the global softmax with a kNN vote over the client's
training embeddings."""
import math

import pytest
import torch
from torch import nn

from fedeq_bench.core import seeding
from fedeq_bench.core.errors import BenchError
from fedeq_bench.methods.base import ClientTensors, MethodConfig, Task
from fedeq_bench.methods.fedavg import FedAvg
from fedeq_bench.methods.knnper import KNNPer, KNNPerConfig, features_and_logits, knn_probs
from fedeq_bench.methods.nets import BodyHead, build_model
from fedeq_bench.methods.train import load
from tests.helpers import bn_net, trajectory


def eval_rng(rnd=1, cid=0):
    """The generator the engine hands evaluate() for client `cid` after round `rnd` (bench/loop/backends.py)."""
    return seeding.generator(0, "eval", rnd, cid)


# A hand-made 2-D datastore: four keys and their labels.
KEYS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
LABELS = torch.tensor([0, 0, 1, 2])
E1, E2 = math.exp(-1.0), math.exp(-2.0)


def test_knn_vote_on_a_hand_made_2d_datastore():
    q = torch.tensor([[0.0, 1.0]])
    # Squared distances from (0, 1): (0,0) -> 1, (1,0) -> 1 + 1 = 2, (0,2) -> 1, (3,3) -> 9 + 4 = 13.
    # k = 3 keeps d = 1 (label 0), 1 (label 1), 2 (label 0); weights softmax(-d / T), T = 1:
    #   p0 = (e^-1 + e^-2) / (2 e^-1 + e^-2),  p1 = e^-1 / (2 e^-1 + e^-2),  p2 = 0.
    z = 2 * E1 + E2
    p = knn_probs(q, KEYS, LABELS, k=3, temperature=1.0, num_classes=3)
    assert torch.allclose(p, torch.tensor([[(E1 + E2) / z, E1 / z, 0.0]]), atol=1e-6)
    # T = 2 halves every exponent: p0 = (e^-0.5 + e^-1) / (2 e^-0.5 + e^-1).
    h, one = math.exp(-0.5), math.exp(-1.0)
    p = knn_probs(q, KEYS, LABELS, k=3, temperature=2.0, num_classes=3)
    assert torch.allclose(p, torch.tensor([[(h + one) / (2 * h + one), h / (2 * h + one), 0.0]]), atol=1e-6)
    # k = 1: the nearest key wins outright. Ties at d = 1 between labels 0 and 1, so use (0, 1.9):
    # (0,2) at 0.01 is nearest -> label 1 with probability 1.
    p = knn_probs(torch.tensor([[0.0, 1.9]]), KEYS, LABELS, k=1, temperature=1.0, num_classes=3)
    assert torch.equal(p, torch.tensor([[0.0, 1.0, 0.0]]))
    # k above the datastore size uses all 4 keys: (3,3) at 13 now adds e^-13 to label 2.
    p = knn_probs(q, KEYS, LABELS, k=50, temperature=1.0, num_classes=3)
    z4 = 2 * E1 + E2 + math.exp(-13.0)
    assert torch.allclose(p, torch.tensor([[(E1 + E2) / z4, E1 / z4, math.exp(-13.0) / z4]]), atol=1e-7)


def identity_body_method(mix, k=3, temperature=1.0):
    """kNN-Per on a model whose body is the identity: embeddings are the raw 2-D inputs."""
    algo = KNNPer(KNNPerConfig(model="mlp", lr=0.1, local_epochs=1, batch_size=4, k=k, mix=mix,
                               temperature=temperature), Task("mlp", (2,), 3),
                  net=BodyHead(nn.Identity(), nn.Linear(2, 3)))  # the prebuilt scratch net it loads into
    # Global model: zero weights, bias (0, 0, log 2) -> p_global = (1/4, 1/4, 1/2) for every input.
    down = {"head.weight": torch.zeros(3, 2), "head.bias": torch.tensor([0.0, 0.0, math.log(2.0)])}
    return algo, down


def test_evaluate_mixes_knn_and_global_probabilities_by_hand():
    test_x = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    test_y = torch.tensor([0, 1])
    d = ClientTensors(KEYS, LABELS, test_x[:1], test_y[:1], test_x, test_y)
    z = 2 * E1 + E2
    p0, p1 = (E1 + E2) / z, E1 / z                       # 0.5777, 0.4223 (first test above)
    # mix = 0.5: p = 0.5 * (p0, p1, 0) + 0.5 * (1/4, 1/4, 1/2) = (0.4138, 0.3362, 0.25): predicts 0.
    algo, down = identity_body_method(mix=0.5)
    m = algo.evaluate(down, {}, d, eval_rng())
    mixed = [0.5 * p0 + 0.125, 0.5 * p1 + 0.125, 0.25]
    assert m["test_acc"] == 0.5 and m["test_n"] == 2      # right on label 0, wrong on label 1
    assert math.isclose(m["test_loss"], (-math.log(mixed[0]) - math.log(mixed[1])) / 2, rel_tol=1e-6)
    assert m["val_acc"] == 1.0 and m["val_n"] == 1
    # mix = 0: the global model alone predicts class 2 for both: accuracy 0, loss -log(1/4) and -log(1/4).
    algo, down = identity_body_method(mix=0.0)
    m = algo.evaluate(down, {}, d, eval_rng())
    assert m["test_acc"] == 0.0 and math.isclose(m["test_loss"], math.log(4.0), rel_tol=1e-6)
    # mix = 1: the kNN model alone: loss (-log p0 - log p1) / 2.
    algo, down = identity_body_method(mix=1.0)
    m = algo.evaluate(down, {}, d, eval_rng())
    assert math.isclose(m["test_loss"], (-math.log(p0) - math.log(p1)) / 2, rel_tol=1e-6)


def test_default_temperature_is_the_feature_dimension_times_scale():
    # The reference's kernel exp(-d / (features_dimension * scale)), scale = 1 (omarfoq/knn-per client.py).
    cfg = dict(model="mlp", lr=0.1, local_epochs=1, batch_size=8)
    assert KNNPerConfig().temperature is None and KNNPerConfig().scale == 1.0
    assert KNNPer(KNNPerConfig(**cfg), Task("mlp", (4,), 3)).temperature() == 200 * 1.0  # mlp: 200 features
    assert KNNPer(KNNPerConfig(**cfg, scale=0.5), Task("mlp", (4,), 3)).temperature() == 200 * 0.5
    assert KNNPer(KNNPerConfig(**cfg, temperature=3.0, scale=0.5), Task("mlp", (4,), 3)).temperature() == 3.0
    assert KNNPer(KNNPerConfig(**{**cfg, "model": "cnn"}), Task("cnn", (1, 8, 8), 3)).temperature() == 512
    with pytest.raises(BenchError, match="temperature must be > 0"):
        KNNPer(KNNPerConfig(**cfg, scale=0.0), Task("mlp", (4,), 3)).temperature()
    # On the 2-D identity-body model the default is T = 2 * 1 = 2, and evaluation uses it: the
    # kNN-alone loss is that of knn_probs at T = 2 (first test: p0 = (e^-0.5 + e^-1) / (2 e^-0.5 + e^-1)).
    algo, down = identity_body_method(mix=1.0, temperature=None)
    assert algo.temperature() == 2.0
    test_x, test_y = torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 1])
    d = ClientTensors(KEYS, LABELS, test_x[:1], test_y[:1], test_x, test_y)
    h, one = math.exp(-0.5), math.exp(-1.0)
    p0, p1 = (h + one) / (2 * h + one), h / (2 * h + one)
    m = algo.evaluate(down, {}, d, eval_rng())
    assert math.isclose(m["test_loss"], (-math.log(p0) - math.log(p1)) / 2, rel_tol=1e-6)


def test_the_datastore_is_the_train_split():
    # k = 1, mix = 1 and a test split equal to the train split: every query's nearest key is itself
    # (distance 0, its own label), so accuracy is 1 and the loss -log 1 = 0.
    algo, down = identity_body_method(mix=1.0, k=1)
    d = ClientTensors(KEYS, LABELS, KEYS, LABELS, KEYS, LABELS)
    m = algo.evaluate(down, {}, d, eval_rng())
    assert m["test_acc"] == 1.0 and m["test_loss"] == 0.0
    # An empty training split has no datastore: the global model alone (predicts 2 -> only (3,3) right).
    empty = ClientTensors(KEYS[:0], LABELS[:0], KEYS, LABELS, KEYS, LABELS)
    assert algo.evaluate(down, {}, empty, eval_rng())["test_acc"] == 1 / 4


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return ClientTensors(x, y, x[:5], y[:5], x[n // 2 :], y[n // 2 :])


def test_mix_zero_equals_the_global_model_exactly():
    cfg = dict(model="mlp", lr=0.1, local_epochs=2, batch_size=8)
    knn = KNNPer(KNNPerConfig(**cfg, mix=0.0), Task("mlp", (4,), 3))
    fedavg = FedAvg(MethodConfig(**cfg), Task("mlp", (4,), 3))
    torch.manual_seed(0)
    server = fedavg.init_server(build_model("mlp", (4,), 3), seeding.generator(0, "server_init"))
    d = data(40, 1)
    # A trained global model (one FedAvg round), so the comparison is not at a random init only.
    up, _, _ = fedavg.local_update(fedavg.broadcast(server, 0, 1), {}, d, seeding.generator(0, "local", 1, 0))
    server, _ = fedavg.aggregate(server, [(0, up)], 1)
    down = fedavg.broadcast(server, 0, 2)
    expected = fedavg.evaluate(down, {}, d, eval_rng())
    got = knn.evaluate(down, {}, d, eval_rng())
    assert got == expected  # identical test_acc, test_loss, val_acc: float equality, not approx
    # ... and mixing does change the prediction, so the equality above is not vacuous.
    mixed = KNNPer(KNNPerConfig(**cfg, mix=0.5), Task("mlp", (4,), 3)).evaluate(down, {}, d, eval_rng())
    assert mixed["test_loss"] != expected["test_loss"]


def test_training_is_fedavgs_and_embeddings_are_the_body_output():
    cfg = dict(model="mlp", lr=0.1, local_epochs=1, batch_size=8)
    knn = KNNPer(KNNPerConfig(**cfg), Task("mlp", (4,), 3))
    fedavg = FedAvg(MethodConfig(**cfg), Task("mlp", (4,), 3))
    torch.manual_seed(0)
    server = knn.init_server(build_model("mlp", (4,), 3), seeding.generator(0, "server_init"))
    d = data(24, 2)
    a, sa, _ = knn.local_update(knn.broadcast(server, 0, 1), {}, d, seeding.generator(0, "local", 1, 0))
    b, _, _ = fedavg.local_update(fedavg.broadcast(server, 0, 1), {}, d, seeding.generator(0, "local", 1, 0))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a) and sa == {}
    assert knn.param_split(knn.net)[1] == []  # nothing personal is stored: the datastore is rebuilt
    # For the mlp (head = one Linear) the embedding is body(x), 200 features.
    net = knn.net
    feats, logits = features_and_logits(net, d.test_x)
    assert feats.shape == (12, 200) and torch.equal(feats, net.body(d.test_x))
    assert torch.equal(logits, net.head(feats))


def test_per_position_targets_put_every_training_token_in_the_datastore():
    """Shakespeare with one label per position: a token is a query and every training token a key.
    mix = 0 is the global model's per-token evaluation exactly; k = 1, mix = 1 on test = train finds
    each token's own key (distance 0; every prefix is distinct), so accuracy is 1."""
    from fedeq_bench.methods.train import eval_metrics

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 12, (6, 10), generator=g)  # 6 windows of 10 characters over a 12-symbol vocabulary
    x[:, 0] = torch.arange(6)  # distinct first characters: the model is causal, so every prefix is distinct
    y = torch.randint(0, 12, (6, 10), generator=g)
    d = ClientTensors(x, y, x[:2], y[:2], x, y)
    task = Task("transformer8", (10,), 12)
    cfg = dict(model="transformer8", lr=0.1, local_epochs=1, batch_size=8, k=1)
    fedavg = FedAvg(MethodConfig(model="transformer8", lr=0.1, local_epochs=1, batch_size=8), task)
    server = fedavg.init_server(build_model("transformer8", (10,), 12), seeding.generator(0, "server_init"))
    down = fedavg.broadcast(server, 0, 1)
    plain = fedavg.evaluate(down, {}, d, eval_rng())
    assert KNNPer(KNNPerConfig(**cfg, mix=0.0), task).evaluate(down, {}, d, eval_rng()) == plain
    assert plain == eval_metrics(fedavg.net, d)  # the per-token evaluation (60 test tokens)
    m = KNNPer(KNNPerConfig(**cfg, mix=1.0), task).evaluate(down, {}, d, eval_rng())
    assert m["test_acc"] == 1.0 and m["test_n"] == 6.0  # 60 of 60 tokens; test_n counts windows


# tests/helpers.py `trajectory(KNNPer)`, recorded from the code before kernel, features and store_mode existed.
BEFORE_OPTIONS = {"up1": 18.900714854827697, "state1": 0.0, "loss1": 1.0669091840585072,
                  "up2": 20.540440372958187, "state2": 0.0, "loss2": 0.920618732770284,
                  "eval": 0.8304543495178223, "personalized": 0.0, "eval_unseen": 0.8304543495178223}


def test_default_options_keep_the_numbers():
    cfg = KNNPerConfig()
    assert (cfg.kernel, cfg.features, cfg.store_mode) == ("softmax_sq", "head_input", "eval")
    # Same machine: equal bit for bit; the tolerance only absorbs another CPU's float rounding.
    assert trajectory(KNNPer) == pytest.approx(BEFORE_OPTIONS, rel=1e-6)
    assert trajectory(KNNPer, kernel="exp_l2")["eval"] != pytest.approx(BEFORE_OPTIONS["eval"], rel=1e-6)


def test_exp_l2_kernel_weighs_neighbours_by_exp_of_minus_the_plain_distance():
    q = torch.tensor([[0.0, 1.0]])
    # L2 distances from (0, 1): (0,0) -> 1, (1,0) -> sqrt 2, (0,2) -> 1, (3,3) -> sqrt 13. k = 3 keeps
    # 1 (label 0), 1 (label 1), sqrt 2 (label 0); weights exp(-d) normalized (the reference's
    # knn_softmax), no temperature: p0 = (e^-1 + e^-sqrt2) / z, p1 = e^-1 / z, z = 2 e^-1 + e^-sqrt2.
    r2 = math.exp(-math.sqrt(2.0))
    z = 2 * E1 + r2
    for t in (1.0, 5.0):  # the temperature argument plays no part
        p = knn_probs(q, KEYS, LABELS, k=3, temperature=t, num_classes=3, kernel="exp_l2")
        assert torch.allclose(p, torch.tensor([[(E1 + r2) / z, E1 / z, 0.0]]), atol=1e-6)
    # Far keys: every exp(-d) underflows in float32 (d ~ 200), yet the row is the normalized vote.
    far = knn_probs(q + 200.0, KEYS, LABELS, k=2, temperature=1.0, num_classes=3, kernel="exp_l2")
    assert torch.isfinite(far).all() and abs(float(far.sum()) - 1.0) < 1e-6
    # Through evaluate: the identity-body method with mix = 1 scores the exp_l2 vote; a set
    # temperature is refused with one line, since the kernel has none.
    algo = KNNPer(KNNPerConfig(model="mlp", k=3, mix=1.0, kernel="exp_l2"), Task("mlp", (2,), 3),
                  net=BodyHead(nn.Identity(), nn.Linear(2, 3)))
    assert algo.temperature() == 1.0
    d = ClientTensors(KEYS, LABELS, q, torch.tensor([0]), q, torch.tensor([0]))
    down = {"head.weight": torch.zeros(3, 2), "head.bias": torch.zeros(3)}
    m = algo.evaluate(down, {}, d, eval_rng())
    assert m["test_acc"] == 1.0 and m["test_loss"] == pytest.approx(-math.log((E1 + r2) / z), rel=1e-6)
    bad = KNNPer(KNNPerConfig(model="mlp", kernel="exp_l2", temperature=2.0), Task("mlp", (2,), 3),
                 net=BodyHead(nn.Identity(), nn.Linear(2, 3)))
    with pytest.raises(BenchError, match="temperature applies to kernel=softmax_sq"):
        bad.temperature()


def bn_method(**cfg):
    """kNN-Per on tests/helpers.py's bn_net (body Linear(4, 8), BatchNorm1d(8), ReLU; head Linear(8, 3))."""
    algo = KNNPer(KNNPerConfig(model="mlp", k=3, **cfg), Task("mlp", (4,), 3), net=bn_net())
    server = algo.init_server(bn_net(), seeding.generator(0, "server_init"))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g)
    return algo, algo.broadcast(server, 0, 1), ClientTensors(x, y, x[:2], y[:2], x[6:], y[6:])


def test_pre_norm_features_are_the_input_of_the_last_batchnorm():
    algo, down, d = bn_method(features="pre_norm")
    load(algo.net, down)
    algo.net.eval()
    keys, labels = algo._datastore(d.train_x, d.train_y)
    # The BatchNorm's input is the body's Linear output, 8 features (T = 8 * scale).
    assert torch.equal(keys, d.train_x @ down["body.0.weight"].T + down["body.0.bias"]) and torch.equal(labels, d.train_y)
    assert algo.temperature() == 8.0
    head_input, _, _ = bn_method()
    load(head_input.net, down)
    head_input.net.eval()
    assert not torch.equal(head_input._datastore(d.train_x, d.train_y)[0], keys)  # after BN and ReLU instead
    # On the paper's ResNets it is the FC block's BatchNorm1d(128), right before the classifier
    # (the reference's CIFAR `embedding`); built on the meta device: shapes only.
    from fedeq_bench.methods.nets import embedding_norm

    with torch.device("meta"):
        for name, shape, classes in (("resnet20", (1, 28, 28), 62), ("resnet34", (3, 32, 32), 10)):
            net = build_model(name, shape, classes)
            norm = embedding_norm(net)
            assert norm is net.body.fc[-1] and isinstance(norm, nn.BatchNorm1d) and norm.num_features == 128
    # A model with no BatchNorm in its body is refused with one line, by param_split, which the harness
    # calls before anything is recorded (bench/experiment/sizing.py); so is a temperature with exp_l2.
    mlp = KNNPer(KNNPerConfig(model="mlp", features="pre_norm"), Task("mlp", (4,), 3))
    with pytest.raises(BenchError, match="pre_norm needs a BatchNorm in the model's body.*'mlp' has none"):
        mlp.param_split(build_model("mlp", (4,), 3))
    exp = KNNPer(KNNPerConfig(model="mlp", kernel="exp_l2", temperature=1.0), Task("mlp", (4,), 3))
    with pytest.raises(BenchError, match="temperature applies to kernel=softmax_sq"):
        exp.param_split(build_model("mlp", (4,), 3))


def test_store_mode_train_embeds_the_datastore_with_batch_statistics_and_puts_the_buffers_back():
    algo, down, d = bn_method(store_mode="train")
    load(algo.net, down)
    algo.net.eval()
    before = {k: v.clone() for k, v in algo.net.state_dict().items()}
    keys, _ = algo._datastore(d.train_x, d.train_y)
    # By hand: one train-mode BatchNorm over the 10 training rows (biased variance, eps 1e-5, scale 1,
    # shift 0), then ReLU: the classifier's input.
    h = d.train_x @ down["body.0.weight"].T + down["body.0.bias"]
    want = torch.relu((h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5))
    assert torch.allclose(keys, want, atol=1e-5)
    after = algo.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not algo.net.training
    # The eval-mode datastore uses the running statistics (0 and 1) instead, and scores differ.
    eval_algo, _, _ = bn_method()
    load(eval_algo.net, down)
    eval_algo.net.eval()
    assert torch.allclose(eval_algo._datastore(d.train_x, d.train_y)[0], torch.relu(h / math.sqrt(1 + 1e-5)), atol=1e-5)
    trained = bn_method(store_mode="train", mix=1.0)
    plain = bn_method(mix=1.0)
    assert trained[0].evaluate(down, {}, d, eval_rng()) != plain[0].evaluate(down, {}, d, eval_rng())
