"""configs/paper/*.toml, the FeDEQ paper's setups: each parses with the project's config code
(unknown keys fail there), carries the reference's settings (github.com/longtanle/FeDEQ
runners/<dataset>/main.sh and run_*.sh), and pairs each method with the paper's model, whose
parameter count is the reference's."""
from __future__ import annotations

import os

import pytest

from bench import config as C
from fedeq_bench.methods.nets import build_model

PAPER = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "paper"))
METHODS = ("fedeq", "fedavg", "fedavg_ft", "fedper", "fedrep", "ditto", "knnper", "local")

# Per preset: run settings (main.sh; rounds = --num_rounds + 1, the reference's range(num_rounds + 1)
# with round 0 training, tests/unit/test_paper_presets.py), the dataset's input shape and classes (the loaders' tasks:
# FEMNIST 28x28x1 and 62 classes, CIFAR 32x32x3, Shakespeare 80 token ids over a vocabulary of 90),
# FeDEQ's model and the baselines' model with the reference's parameter counts (the same figures
# as tests/unit/test_nets.py, measured on the reference's Haiku models).
RESNET34_CIFAR100 = 1_856 + 221_952 + 1_403_392 + 9_150_464 + 65_792 + 32_896 + 256 + 12_900  # test_nets.py
PRESETS = {
    "femnist": dict(lr=0.01, batch_size=10, clients=100, rounds=151, shape=(1, 28, 28), classes=62,
                    deq=("deq_resnet_s_ref", 992_894), explicit=("resnet20", 2_975_390)),
    "cifar10": dict(lr=0.01, batch_size=20, clients=100, rounds=151, shape=(3, 32, 32), classes=10,
                    deq=("deq_resnet_m_ref", 2_726_410), explicit=("resnet34", 7_779_274)),
    "cifar100": dict(lr=0.05, batch_size=20, clients=100, rounds=151, shape=(3, 32, 32), classes=100,
                     deq=("deq_resnet_m_ref", 2_726_410 + 90 * (128 + 1)), explicit=("resnet34", RESNET34_CIFAR100)),
    "shakespeare": dict(lr=0.1, batch_size=16, clients=200, rounds=401, shape=(80,), classes=90,
                        deq=("deq_transformer", 266_906), explicit=("transformer8", 416_730)),
}


def load(name: str) -> C.Config:
    return C.apply(C.default_config(), C.load_toml(os.path.join(PAPER, f"{name}.toml")))


def test_the_four_presets_exist():
    assert sorted(f for f in os.listdir(PAPER) if f.endswith(".toml")) == sorted(f"{n}.toml" for n in PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_carries_the_reference_settings(name):
    want, cfg = PRESETS[name], load(name)
    run = cfg.run
    assert run.dataset == name and run.methods == METHODS
    assert (run.lr, run.batch_size, run.clients, run.rounds) == (want["lr"], want["batch_size"], want["clients"], want["rounds"])
    assert run.fraction == 0.1 and run.val_frac == 0.0 and run.local_epochs == 5
    fedeq = C.resolve_method(cfg, "fedeq", {"deq": "none", "explicit": "none"})
    assert (fedeq.rho, fedeq.personal_epochs, fedeq.shared_epochs) == (0.01, 3, 5)
    # cifar100: run_fedeq.sh's --learning_rate 0.01 over main.sh's 0.05, which the baselines keep.
    assert fedeq.lr == (0.01 if name == "cifar100" else run.lr)
    assert fedeq.max_iter == 20
    # Shakespeare: the whole batch's Broyden stop, ||f(Z) - Z||_F < 1e-6 sqrt(numel) (test_paper_presets.py).
    assert (fedeq.tol, fedeq.stop_mode) == ((1e-6, "batch") if name == "shakespeare" else (0.001, "abs"))
    if name == "shakespeare":
        assert cfg.datasets["shakespeare"].targets == "all"
        assert (fedeq.solver, fedeq.penalty_scale, fedeq.dual_init, fedeq.server_weights) == (
            "broyden", "tokens", 0.001, "uniform")
    else:
        assert (fedeq.solver, fedeq.dual_init, fedeq.server_weights) == ("anderson", 0.0, "samples")
    assert cfg.methods["fedrep"].head_epochs == 3
    # The baselines by the reference's runners (trainers/vision/*.py, trainers/sequence/*.py), cited
    # line by line in the presets' comments and docs/methods.md.
    vision = name != "shakespeare"
    fedper, fedrep, ditto, knnper = (cfg.methods[m] for m in ("fedper", "fedrep", "ditto", "knnper"))
    assert cfg.methods["local"].participation == "all"
    assert (ditto.personal_init, ditto.unseen) == ("global", "global")
    assert fedper.head_epochs == 3 and fedper.unseen_head_epochs == 3
    assert fedper.server_weights == ("samples" if vision else "uniform") and fedrep.server_weights == "uniform"
    assert (fedper.unseen_bn, fedrep.unseen_bn) == ("keep", "keep")
    assert (knnper.kernel, knnper.store_mode) == ("exp_l2", "train")
    assert knnper.features == ("pre_norm" if name.startswith("cifar") else "head_input")
    # finetune_frac 0.3 of --num_rounds (rounds - 1) as FedAvg: rounds 1 .. 0.3 * (rounds - 1), then fine-tuning.
    assert cfg.methods["fedavg_ft"].switch_round == int(0.3 * (run.rounds - 1)) + 1


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_models_have_the_reference_parameter_counts(name):
    want, cfg = PRESETS[name], load(name)
    no_default = {"deq": "unset", "explicit": "unset"}  # every method names its model in the preset
    models = {m: C.resolve_method(cfg, m, no_default).model for m in METHODS}
    assert models["fedeq"] == want["deq"][0]
    assert {models[m] for m in METHODS if m != "fedeq"} == {want["explicit"][0]}
    for model, count in (want["deq"], want["explicit"]):
        net = build_model(model, want["shape"], want["classes"])
        assert sum(p.numel() for p in net.parameters()) == count, model
