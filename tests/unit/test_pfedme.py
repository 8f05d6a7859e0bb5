"""pFedMe (methods/pfedme.py): K inner steps on theta, outer step w_i <- w_i - eta lam (w_i - theta),
server w <- (1 - beta) w + beta mean(w_i); theta_i stays home and is what is evaluated."""
import torch
import torch.nn.functional as F
from torch import nn

from fedeq_bench.core import seeding
from fedeq_bench.methods.base import ClientTensors, Task
from fedeq_bench.methods.nets import build_model
from fedeq_bench.methods.pfedme import THETA, PFedMe, PFedMeConfig
from fedeq_bench.methods.train import with_num_samples


def eval_rng(rnd=1, cid=0):
    """The generator the engine hands evaluate() for client `cid` after round `rnd` (bench/loop/backends.py)."""
    return seeding.generator(0, "eval", rnd, cid)


MLP_NAMES = {"body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias", "head.weight", "head.bias"}


def data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    return ClientTensors(x, y, x[:2], y[:2], x[:4], y[:4])


def ce_grad(W, b, x, y):
    """Gradient of mean CE(x W^T + b, y) by hand: G = (softmax(z) - onehot(y)) / n, dW = G^T x, db = sum_rows G."""
    p = torch.softmax(x @ W.T + b, dim=1)
    G = (p - F.one_hot(y, 3).to(p.dtype)) / len(y)
    return G.T @ x, G.sum(0)


def linear(**kw):
    # eta = 0.05 and mu = 0 keep the hand arithmetic of the first two tests short; the defaults next.
    cfg = PFedMeConfig(**{"lr": 0.05, "local_epochs": 1, "batch_size": 8, "personal_lr": 0.1, "lam": 15.0,
                          "eta": 0.05, "mu": 0.0, **kw})
    algo = PFedMe(cfg, Task("mlp", (4,), 3), net=nn.Sequential(nn.Linear(4, 3)))  # a tiny linear scratch net
    w = {"0.weight": 0.1 * torch.arange(12.0).reshape(3, 4) - 0.5, "0.bias": torch.tensor([0.2, -0.1, 0.0])}
    return algo, w


def test_one_inner_step_then_the_outer_step_by_hand():
    algo, w = linear(K=1)  # one batch (n = batch = 8), one inner step
    d = data()
    up, state, m = algo.local_update(w, {}, d, seeding.generator(0, "local", 1, 0))
    assert m["steps"] == 1
    gW, gb = ce_grad(w["0.weight"], w["0.bias"], d.train_x, d.train_y)
    # theta starts at w, so the prox term lam (theta - w_i) is 0: theta1 = w - 0.1 * g
    theta_W, theta_b = w["0.weight"] - 0.1 * gW, w["0.bias"] - 0.1 * gb
    assert torch.allclose(state[THETA + "0.weight"], theta_W, atol=1e-6)
    assert torch.allclose(state[THETA + "0.bias"], theta_b, atol=1e-6)
    # w_i <- w - eta * lam * (w - theta1) = w - 0.05 * 15 * 0.1 * g = w - 0.075 * g
    assert torch.allclose(up["0.weight"], w["0.weight"] - 0.075 * gW, atol=1e-6)
    assert torch.allclose(up["0.bias"], w["0.bias"] - 0.075 * gb, atol=1e-6)
    assert int(up["num_samples"]) == 8 and set(up) == {"0.weight", "0.bias", "num_samples"}


def test_second_inner_step_feels_the_prox_term():
    algo, w = linear(K=2)
    d = data()
    up, state, m = algo.local_update(w, {}, d, seeding.generator(0, "local", 1, 0))
    assert m["steps"] == 2  # K gradient evaluations on the one batch
    W, b = w["0.weight"], w["0.bias"]
    gW, gb = ce_grad(W, b, d.train_x, d.train_y)
    W1, b1 = W - 0.1 * gW, b - 0.1 * gb
    # theta2 = theta1 - personal_lr * (g(theta1) + lam * (theta1 - w_i)), w_i still w inside the inner loop
    gW1, gb1 = ce_grad(W1, b1, d.train_x, d.train_y)
    W2, b2 = W1 - 0.1 * (gW1 + 15.0 * (W1 - W)), b1 - 0.1 * (gb1 + 15.0 * (b1 - b))
    assert torch.allclose(state[THETA + "0.weight"], W2, atol=1e-5)
    assert torch.allclose(state[THETA + "0.bias"], b2, atol=1e-5)
    # outer: w_i = w - 0.75 * (w - theta2)
    assert torch.allclose(up["0.weight"], W - 0.75 * (W - W2), atol=1e-5)
    assert torch.allclose(up["0.bias"], b - 0.75 * (b - b2), atol=1e-5)


def test_one_outer_step_with_the_reference_defaults_by_hand():
    # The reference's defaults (main.py, fedoptimizer.py): eta 0.005, personal_lr 0.09, mu 1e-3,
    # lam 15, K 5. The run's lr is not pFedMe's: 99 here changes nothing.
    cfg = PFedMeConfig()
    assert (cfg.eta, cfg.personal_lr, cfg.mu, cfg.lam, cfg.K, cfg.beta) == (0.005, 0.09, 1e-3, 15.0, 5, 1.0)
    algo = PFedMe(PFedMeConfig(lr=99.0, local_epochs=1, batch_size=8), Task("mlp", (4,), 3),
                  net=nn.Sequential(nn.Linear(4, 3)))
    w = {"0.weight": 0.1 * torch.arange(12.0).reshape(3, 4) - 0.5, "0.bias": torch.tensor([0.2, -0.1, 0.0])}
    d = data()  # n = batch = 8: one mini-batch, one outer step
    up, state, m = algo.local_update(w, {}, d, seeding.generator(0, "local", 1, 0))
    assert m["steps"] == 5
    W, b = w["0.weight"].double(), w["0.bias"].double()
    x, y = d.train_x.double(), d.train_y
    tW, tb = W.clone(), b.clone()
    for _ in range(5):  # theta <- theta - 0.09 * (g(theta) + 15 (theta - w) + 0.001 theta)
        gW, gb = ce_grad(tW, tb, x, y)
        tW, tb = tW - 0.09 * (gW + 15.0 * (tW - W) + 1e-3 * tW), tb - 0.09 * (gb + 15.0 * (tb - b) + 1e-3 * tb)
    assert torch.allclose(state[THETA + "0.weight"].double(), tW, atol=1e-6)
    assert torch.allclose(state[THETA + "0.bias"].double(), tb, atol=1e-6)
    # outer: w_i = w - eta * lam * (w - theta5) = w - 0.075 * (w - theta5)
    assert torch.allclose(up["0.weight"].double(), W - 0.075 * (W - tW), atol=1e-6)
    assert torch.allclose(up["0.bias"].double(), b - 0.075 * (b - tb), atol=1e-6)
    # mu = 0 is allowed and drops the L2 term: theta differs from the mu = 1e-3 one.
    algo0 = PFedMe(PFedMeConfig(lr=99.0, local_epochs=1, batch_size=8, mu=0.0), Task("mlp", (4,), 3),
                   net=nn.Sequential(nn.Linear(4, 3)))
    _, state0, _ = algo0.local_update(w, {}, d, seeding.generator(0, "local", 1, 0))
    assert not torch.allclose(state0[THETA + "0.weight"], state[THETA + "0.weight"], atol=1e-7)


def test_server_mixes_old_w_and_the_weighted_mean_with_beta():
    w_old = {"w": torch.tensor([10.0, 10.0]), "count": torch.tensor(1)}
    replies = [(1, with_num_samples({"w": torch.tensor([4.0, -1.0]), "count": torch.tensor(3)}, 2)),
               (0, with_num_samples({"w": torch.tensor([1.0, 2.0]), "count": torch.tensor(2)}, 1))]
    # mean = ([1, 2] * 1 + [4, -1] * 2) / 3 = [9, 0] / 3 = [3, 0]
    new, _ = PFedMe(PFedMeConfig(beta=1.0), Task("mlp", (4,), 3)).aggregate(w_old, replies, 1)
    assert torch.equal(new["w"], torch.tensor([3.0, 0.0]))  # beta = 1: exactly the weighted mean
    assert int(new["count"]) == 3                            # integer buffers: the max
    new, _ = PFedMe(PFedMeConfig(beta=0.5), Task("mlp", (4,), 3)).aggregate(w_old, replies, 1)
    assert torch.equal(new["w"], torch.tensor([0.5 * 10 + 0.5 * 3, 0.5 * 10 + 0.5 * 0]))  # [6.5, 5]
    new, _ = PFedMe(PFedMeConfig(beta=2.0), Task("mlp", (4,), 3)).aggregate(w_old, replies, 1)
    assert torch.equal(new["w"], torch.tensor([-1 * 10 + 2 * 3, -1 * 10 + 2 * 0.0]))  # [-4, -10]


def mlp_setup(**kw):
    cfg = PFedMeConfig(**{"model": "mlp", "lr": 0.05, "local_epochs": 1, "batch_size": 4, **kw})
    algo = PFedMe(cfg, Task("mlp", (4,), 3))
    torch.manual_seed(0)
    server = algo.init_server(build_model("mlp", (4,), 3), seeding.generator(0, "server_init"))
    return algo, server


def test_messages_carry_w_i_and_theta_stays_on_the_client():
    algo, server = mlp_setup()
    d = data(n=12)
    down = algo.broadcast(server, 0, 1)
    up, state, m = algo.local_update(down, {}, d, seeding.generator(0, "local", 1, 0))
    assert m["steps"] == 5 * 3  # K = 5 inner steps on each of ceil(12 / 4) = 3 batches
    assert set(down) == MLP_NAMES and set(up) == MLP_NAMES | {"num_samples"}
    assert set(state) == {THETA + k for k in MLP_NAMES}
    assert not torch.equal(up["head.weight"], state[THETA + "head.weight"])  # w_i != theta_i
    assert not torch.equal(up["head.weight"], server["head.weight"])          # and w_i moved


def test_evaluation_uses_theta_and_a_client_without_theta_uses_w():
    algo, server = mlp_setup()
    d = data(n=12)
    down = algo.broadcast(server, 0, 1)
    theta = {THETA + k: t.clone() for k, t in server.items()}
    theta[THETA + "head.weight"] = torch.zeros(3, 200)
    theta[THETA + "head.bias"] = torch.tensor([0.0, 0.0, 1.0])  # predicts class 2 for every input
    assert algo.evaluate(down, theta, d, eval_rng())["test_acc"] == float((d.test_y == 2).sum()) / 4
    algo.net.load_state_dict(server)
    expected = int((algo.net(d.test_x).argmax(1) == d.test_y).sum()) / 4
    assert algo.evaluate(down, {}, d, eval_rng())["test_acc"] == expected
    # A held-out client: one local update from the final w, keeping its theta.
    state = algo.personalize(down, {}, d, seeding.generator(0, "personalize", 1, 0))
    assert set(state) == {THETA + k for k in MLP_NAMES}
