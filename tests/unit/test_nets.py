"""Models of the FeDEQ paper and its baselines: parameter counts against the reference
implementation (github.com/longtanle/FeDEQ, measured there on float32 28x28x1 / 32x32x3 inputs),
output shapes, the body/head split, and gradients through the DEQ models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedeq_bench.methods.deq import DEQ
from fedeq_bench.methods.nets import build_model, split_names
from fedeq_bench.methods.nets.deq_resnet import RowGroupNorm, tf_same_max_pool
from fedeq_bench.methods.train import cross_entropy


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batches of 2 are too small for intra-op threads; on a busy 2-core machine OpenMP's spin-waits
    made this file 4x slower with 2 threads than with 1 (9 s vs 2 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fast(net: nn.Module, steps: int = 5) -> nn.Module:
    """Few solver steps (forward and the implicit backward's): shapes and the finiteness of
    gradients do not depend on convergence, and the file must run in seconds."""
    for mod in net.modules():
        if isinstance(mod, DEQ):
            mod.configure(max_iter=steps, b_max_iter=steps)
    return net


def n_params(net: nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for n, p in net.named_parameters() if n.startswith(prefix))


FEMNIST, CIFAR, SHAKESPEARE = (1, 28, 28), (3, 32, 32), (80,)

# (model, input shape, classes, total parameters, personal = under `head.`)
COUNTS = [
    # Reference: 992,894 / 7,998. Personal = classifier 128*62 + 62.
    ("deq_resnet_s", FEMNIST, 62, 992_894, 128 * 62 + 62),
    # Reference: 2,726,410 and 2,738,020; 100 classes add 90 * (128 + 1) = 11,610 to the classifier.
    ("deq_resnet_m", CIFAR, 10, 2_726_410, 128 * 10 + 10),
    ("deq_resnet_m", CIFAR, 100, 2_726_410 + 90 * 129, 128 * 100 + 100),
    # The reference-arithmetic forms (per-row GroupNorm, TF-SAME pools) have the same parameters.
    ("deq_resnet_s_ref", FEMNIST, 62, 992_894, 128 * 62 + 62),
    ("deq_resnet_m_ref", CIFAR, 10, 2_726_410, 128 * 10 + 10),
    ("deq_resnet_m_ref", CIFAR, 100, 2_726_410 + 90 * 129, 128 * 100 + 100),
    # Reference: 7,779,274 (CIFAR-10, blocks (5, 6, 5)).
    ("resnet34", CIFAR, 10, 7_779_274, 1_290),
    # CIFAR-100 layout (3, 5, 8), counted by hand (no reference figure): stem 3*64*9 + 128 = 1,856;
    # group 1: 3 * (2*9*64*64 + 256) = 221,952; group 2: (9*64*128 + 9*128*128 + 512)
    # + 4 * (2*9*128*128 + 512) = 1,403,392; group 3: (9*128*256 + 9*256*256 + 1,024)
    # + 7 * (2*9*256*256 + 1,024) = 9,150,464; FC 65,792 + 32,896 + 256; classifier 12,900.
    ("resnet34", CIFAR, 100, 1_856 + 221_952 + 1_403_392 + 9_150_464 + 65_792 + 32_896 + 256 + 12_900, 12_900),
    # Reference: 2,975,390 (FEMNIST, 62 classes).
    ("resnet20", FEMNIST, 62, 2_975_390, 7_998),
    # Reference: 266,906 of which 55,962 personal (vocabulary 90, sequence 80).
    ("deq_transformer", SHAKESPEARE, 90, 266_906, 55_962),
    # Same layout with 7 explicit shared layers instead of the DEQ block (4 layers + final LN):
    # 266,906 - 200,064 + 7 * 49,984 = 416,730; the personal part is the same 55,962.
    ("transformer8", SHAKESPEARE, 90, 266_906 - 200_064 + 7 * 49_984, 55_962),
    # No reference figure (hidden 128): 784*128 + 128*128 + (128*128 + 128) + (128*10 + 10).
    ("deq_mlp", (1, 28, 28), 10, 784 * 128 + 128 * 128 + 128 * 128 + 128 + 1_290, 1_290),
]
DEQ_MODELS = {"deq_resnet_s", "deq_resnet_m", "deq_resnet_s_ref", "deq_resnet_m_ref", "deq_transformer", "deq_mlp"}
SEQUENCE_MODELS = {"deq_transformer", "transformer8"}


def batch(shape, classes, n=2):
    g = torch.Generator().manual_seed(0)
    if len(shape) == 1:  # token ids, stored as float32 by the harness
        return torch.randint(1, classes, (n, *shape), generator=g).float()
    return torch.randn(n, *shape, generator=g)


@pytest.mark.parametrize("name,shape,classes,total,personal", COUNTS,
                         ids=[f"{c[0]}-{c[2]}" for c in COUNTS])
def test_parameter_counts_match_the_reference_and_split_covers_all(name, shape, classes, total, personal):
    net = build_model(name, shape, classes)
    assert n_params(net) == total
    assert n_params(net, "head.") == personal
    assert n_params(net, "body.") == total - personal
    # Every parameter and buffer is either shared (body) or personal (head) ...
    body, head = split_names(net)
    assert sorted(body + head) == sorted(net.state_dict())
    # ... and BatchNorm running statistics are shared state, never personal.
    assert not any("running_" in k for k in head)


# One case per model on its dataset's input (the 100-class variants differ only in counts).
FORWARD = [c[:3] for c in COUNTS if c[2] != 100]


@pytest.mark.parametrize("name,shape,classes", FORWARD, ids=[c[0] for c in FORWARD])
def test_forward_returns_logits_per_sample_or_per_position(name, shape, classes):
    net = fast(build_model(name, shape, classes)).eval()
    with torch.no_grad():
        out = net(batch(shape, classes))
    # The transformers predict every position of the window, (B, T, V), as the reference.
    assert out.shape == ((2, *shape, classes) if name in SEQUENCE_MODELS else (2, classes))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(DEQ_MODELS))
def test_deq_models_expose_their_deq_layer(name):
    shape, classes = {"deq_transformer": (SHAKESPEARE, 90), "deq_mlp": ((20,), 3)}.get(name, (FEMNIST, 62))
    net = build_model(name, shape, classes)
    assert isinstance(net.body.deq, DEQ)
    assert sum(isinstance(m, DEQ) for m in net.modules()) == 1


def test_transformer_reads_float_or_long_token_ids():
    net = fast(build_model("deq_transformer", SHAKESPEARE, 90)).eval()
    x = batch(SHAKESPEARE, 90)
    with torch.no_grad():
        assert torch.equal(net(x), net(x.long()))


@pytest.mark.parametrize("name", sorted(SEQUENCE_MODELS))
def test_transformer_predicts_every_position_causally(name):
    """Position t's logits see tokens 0..t only: changing token 10 leaves positions 0..9 as they
    were and changes 10..79; changing token 0 changes the last position's (it sees every key)."""
    net = fast(build_model(name, SHAKESPEARE, 90)).eval()
    x = batch(SHAKESPEARE, 90, n=1)
    y = x.clone()
    y[0, 10] = (x[0, 10] % 89) + 1  # another non-padding id
    z = x.clone()
    z[0, 0] = (x[0, 0] % 89) + 1
    with torch.no_grad():
        ox, oy, oz = net(x), net(y), net(z)
    assert not torch.allclose(ox[:, -1], oz[:, -1])
    if name == "transformer8":
        # Exact for the explicit net; the DEQ's z* is causal only up to its solver's residual
        # (all positions are solved jointly, from a common stopping rule), so it is not checked there.
        assert torch.allclose(ox[:, :10], oy[:, :10], atol=1e-5)
        assert (ox[:, 10:] - oy[:, 10:]).abs().amax(-1).min() > 1e-5


def test_deq_transformer_map_is_fixed_within_a_forward_in_train_mode():
    """Dropout inside f draws its masks once per forward: f(z, u) twice gives the same value, or
    the solver would chase a moving target. The masks do drop something (train differs from eval)."""
    torch.manual_seed(0)
    body = build_model("deq_transformer", SHAKESPEARE, 90).body.train()
    _, u, allowed = body.embed(batch(SHAKESPEARE, 90))
    f = body.block()
    f.prepare(allowed, u)
    z = torch.randn_like(u)
    with torch.no_grad():
        first, second = f(z, u), f(z, u)
        f.eval()
        f.prepare(allowed, u)
        plain = f(z, u)
    assert torch.equal(first, second)
    assert not torch.allclose(first, plain)


def test_mlp_and_cnn_unchanged():
    mlp = build_model("mlp", (4,), 3)
    assert n_params(mlp) == (4 * 200 + 200) + (200 * 200 + 200) + (200 * 3 + 3)
    assert split_names(mlp)[1] == ["head.weight", "head.bias"]
    cnn = build_model("cnn", (1, 28, 28), 10)
    # conv 1*32*25 + 32, conv 32*64*25 + 64, FC 64*7*7*512 + 512, head 512*10 + 10
    assert n_params(cnn) == 832 + 51_264 + 1_606_144 + 5_130
    assert n_params(cnn, "head.") == 5_130


# Small inputs: gradients do not depend on the image size, and the solve stays fast on 2 cores.
GRAD_CASES = [("deq_resnet_s", (1, 12, 12), 5), ("deq_resnet_m", (3, 8, 8), 5), ("deq_resnet_s_ref", (1, 12, 12), 5),
              ("deq_transformer", (16,), 90), ("deq_mlp", (20,), 3),
              ("resnet20", (1, 12, 12), 5), ("resnet34", (3, 8, 8), 5), ("transformer8", (16,), 90)]


@pytest.mark.parametrize("name,shape,classes", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_train_step_gives_finite_body_gradients(name, shape, classes):
    torch.manual_seed(0)
    net = fast(build_model(name, shape, classes)).train()
    if name == "resnet34":
        nn.init.normal_(net.head.weight, 0.0, 0.1)  # its classifier starts at zero, which zeroes body grads
    x = batch(shape, classes, n=2)
    y = torch.tensor([0, 1])  # one label per example: a transformer is scored on its last position
    cross_entropy(net(x), y).backward()
    grads = {n: p.grad for n, p in net.named_parameters() if n.startswith("body.")}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())


# -- the reference arithmetic of deq_resnet_*_ref ------------------------------------------------

def test_row_group_norm_normalizes_each_row_over_width_and_group_channels():
    """hk.GroupNorm on one (H, W, C) image under vmap: statistics per (example, row h, group) over
    (W, C/G), computed here by loops; then per-channel scale and shift."""
    torch.manual_seed(0)
    b, c, h, w, g = 2, 4, 3, 5, 2
    x = torch.randn(b, c, h, w) * 3 + 1
    norm = RowGroupNorm(g, c)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        norm.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0]))
    want = torch.empty_like(x)
    for i in range(b):
        for r in range(h):
            for k in range(g):
                cs = slice(k * c // g, (k + 1) * c // g)
                cell = x[i, cs, r, :]  # (C/G, W) of one row
                mean, var = cell.mean(), cell.var(unbiased=False)
                want[i, cs, r, :] = (cell - mean) / torch.sqrt(var + 1e-5)
    want = want * norm.weight.view(1, c, 1, 1) + norm.bias.view(1, c, 1, 1)
    got = norm(x)
    assert torch.allclose(got, want, atol=1e-5)
    # Not standard GroupNorm, whose statistics span the whole (C/G, H, W) block.
    std = nn.GroupNorm(g, c)
    std.load_state_dict(norm.state_dict())
    assert not torch.allclose(std(x), want, atol=1e-3)


def test_tf_same_max_pool_pads_after_only():
    """TF 'SAME' 3x3/2 on 4x4: out = ceil(4/2) = 2, total padding (2-1)*2 + 3 - 4 = 1 -> (0, 1),
    so the windows cover rows/cols {0,1,2} and {2,3}; PyTorch's padding=1 covers {0,1} and {1,2,3}."""
    x = torch.arange(16.0).view(1, 1, 4, 4)  # x[r, c] = 4r + c
    assert tf_same_max_pool(x).flatten().tolist() == [4 * 2 + 2, 4 * 2 + 3, 4 * 3 + 2, 4 * 3 + 3]  # 10 11 14 15
    assert F.max_pool2d(x, 3, 2, padding=1).flatten().tolist() == [5, 7, 13, 15]
    # Padded cells never win: all-negative input, bottom-right window = rows/cols {2, 3}.
    assert tf_same_max_pool(-(x + 1)).flatten().tolist() == [-1, -3, -9, -11]
    # Odd size 7: out 4, total padding 3*2 + 3 - 7 = 2 -> (1, 1), as PyTorch's padding=1.
    y = torch.randn(1, 2, 7, 7)
    assert torch.equal(tf_same_max_pool(y), F.max_pool2d(y, 3, 2, padding=1))
    # The sizes the models see keep ceil(H/2) in both forms: 28 -> 14 -> 7, 32 -> 16 -> 8.
    for n in (28, 14, 32, 16):
        assert tf_same_max_pool(torch.zeros(1, 1, n, n)).shape[-1] == -(-n // 2)


@pytest.mark.parametrize("name", ["deq_resnet_s", "deq_resnet_m"])
def test_reference_form_has_the_same_state_and_other_arithmetic(name):
    shape = FEMNIST if name == "deq_resnet_s" else CIFAR
    std, ref = build_model(name, shape, 10), build_model(name + "_ref", shape, 10)
    assert {k: v.shape for k, v in std.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert isinstance(ref.body.stem[-1], nn.Module) and not isinstance(ref.body.stem[-1], nn.MaxPool2d)
    assert sum(isinstance(m, RowGroupNorm) for m in ref.modules()) == 3
    assert not any(isinstance(m, RowGroupNorm) for m in std.modules())
    # Same weights, different arithmetic: the stem's pool alone moves the features.
    ref.load_state_dict(std.state_dict())
    x = batch(shape, 10)
    with torch.no_grad():
        assert not torch.allclose(std.eval().body.stem(x), ref.eval().body.stem(x))


def test_probe_runs_a_real_batch_and_refuses_a_model_that_cannot_take_it(monkeypatch):
    """`probe` is the pre-flight check of bench/experiment/: transformer8 on float features used to
    pass the build-only check and die in round 1 with an IndexError."""
    from fedeq_bench.core.errors import BenchError
    from fedeq_bench.methods import nets

    feats = torch.randn(2, 60)
    tokens = torch.randint(0, 80, (2, 80))
    before = torch.random.get_rng_state()
    nets.probe("mlp", (60,), 10, feats)
    nets.probe("transformer8", (80,), 80, tokens)  # Shakespeare-shaped: token ids, 80 classes
    assert torch.equal(torch.random.get_rng_state(), before)  # built in a fork: nothing drawn
    with pytest.raises(BenchError, match=r"model 'transformer8' cannot take this dataset's samples \(shape \(60,\), "
                                         r"dtype torch.float32\): IndexError"):
        nets.probe("transformer8", (60,), 10, feats)
    # A model whose output does not end in the dataset's classes (its head ignores num_classes).
    real = nets.build_model
    monkeypatch.setattr(nets, "build_model", lambda name, shape, k: real(name, shape, 10))
    with pytest.raises(BenchError, match=r"model 'mlp' gives output \(2, 10\) for 2 samples; expected \(samples, "
                                         r"\.\.\., 7\)"):
        nets.probe("mlp", (60,), 7, feats)
