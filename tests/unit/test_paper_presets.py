"""Every choice of the FeDEQ reference (longtanle/FeDEQ) that configs/paper/*.toml must select, one
row per key: the value the reference's runners and trainers use, per preset, and where it is.

Only the TOML is parsed and compared (no config class is consulted), so a row can name an option
that the harness gains elsewhere; every key in the table must be written in the preset itself."""
from __future__ import annotations

import os
import tomllib

import pytest

PAPER = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "paper"))
VISION = ("femnist", "cifar10", "cifar100")
PRESETS = (*VISION, "shakespeare")

# (section, key, value on the vision presets, value on shakespeare, where the reference does it).
# Paths are in longtanle/FeDEQ at 1d67b39.
TABLE = [
    # The round loop of every trainer is `for i in range(self.num_rounds + 1)` and round 0 trains
    # (e.g. trainers/sequence/fedeq_seq.py:179-255); the last round's evaluation is what is reported.
    ("run", "rounds", {"femnist": 151, "cifar10": 151, "cifar100": 151}, 401,
     "runners/*/main.sh --num_rounds 150 / 400; trainers/*: range(num_rounds + 1)"),
    ("run", "drop_last", True, True, "utils/data_utils.py:243-250 epoch_generator: len // batch_size batches"),
    ("run", "unseen_pick", "last", "last", "trainers/base.py:43-55: the last frac_unseen of client indices"),
    ("run", "eval_dropout", False, True,
     "vision: utils/jax_utils.py:324-331 is_training=False; sequence: jax_utils.py:362-364 seq_pred_fn, "
     "model.apply with the default is_training=True (utils/model_utils.py:1182, 1236)"),
    ("fedeq", "solver", "anderson", "broyden",
     "utils/options.py --fwd_solver anderson; deq_transformer solves by deq/solver/deq_seq.py's Broyden"),
    ("fedeq", "max_iter", 20, 20, "utils/model_utils.py:68 maxiter=20; deq_transformer max_iter=20 (model_utils.py:1232)"),
    ("fedeq", "stop_mode", "abs", "batch",
     "deq/solver/anderson.py: per example ||g|| <= tol; deq/solver/broyden_2.py:113, 165: the whole batch's norm"),
    ("fedeq", "tol", 1e-3, 1e-6, "utils/model_utils.py:69 tol=1e-3; deq/solver/rootfind.py:40 eps = 1e-6 sqrt(size)"),
    ("fedeq", "second_solve", False, True, "deq/solver/deq_seq.py:28-29: f(z*) then rootfind_grad's Broyden solve"),
    ("fedeq", "b_solver", "normal_cg", "broyden",
     "utils/options.py --bwd_solver normal_cg (model_utils.py:58-59); deq/solver/rootfind.py:16-35 Broyden adjoint"),
    ("fedeq", "b_tol", 1e-3, 2e-10, "utils/model_utils.py:59 tol=1e-3; rootfind.py:26 eps = 2e-10 sqrt(size)"),
    ("fedeq", "b_max_iter", 50, 20, "utils/model_utils.py:59 maxiter=50; rootfind.py:29 broyden(..., max_iter=20)"),
    ("fedeq", "server_weights", "samples", "uniform",
     "trainers/vision/fedeq_resnet.py:210 weights=update_weights; trainers/sequence/fedeq_seq.py:193 weights=None"),
    ("fedeq", "dual_init", 0.0, 0.001,
     "run_fedeq.sh --lam_admm 0.01 / 0.001; fedeq_resnet multiplies it by zeros, fedeq_seq.py:85 by ones"),
    ("fedeq", "penalty_scale", "none", "tokens", "utils/jax_utils.py:121-131; jax_utils.py:204-227 / jnp.sum(mask)"),
    ("local", "participation", "all", "all", "trainers/vision/local_resnet.py:85, sequence/local_seq.py:85: every client, every round"),
    ("ditto", "personal_init", "global", "global",
     "trainers/vision/ditto_resnet.py:156-167, sequence/ditto_seq.py:145-156: from the just-trained global copy"),
    ("ditto", "unseen", "global", "global",
     "trainers/vision/ditto_resnet.py:199, sequence/ditto_seq.py:178: eval_unseen(global_params)"),
    ("fedper", "head_epochs", 3, 3, "trainers/*/fedper_*.py: --personalized_epochs 3 of the head first"),
    ("fedper", "server_weights", "samples", "uniform",
     "trainers/vision/fedper_resnet.py:231 weights=round_weight_updates; sequence/fedper_seq.py:200 weights=None"),
    ("fedper", "unseen_bn", "keep", "keep", "trainers/vision/fedper_resnet.py:242-277: held-out clients keep their unseen_net_states"),
    ("fedrep", "server_weights", "uniform", "uniform",
     "trainers/vision/fedrep_resnet.py:230, sequence/fedrep_seq.py:204 weights=None"),
    ("fedrep", "unseen_bn", "keep", "keep", "trainers/vision/fedrep_resnet.py:243-273: held-out clients keep their unseen_net_states"),
    ("knnper", "kernel", "exp_l2", "exp_l2", "trainers/sequence/knnper_seq.py:91 np.exp(-nbr_dist)"),
    ("knnper", "features", {"femnist": "head_input", "cifar10": "pre_norm", "cifar100": "pre_norm"}, "head_input",
     "the embedding the model returns: utils/resnet_cifar.py:241-245 before linear_batchnorm; "
     "utils/resnet_femnist.py:396-398 after it; knnper_seq.py:162 the transformer's output"),
    ("knnper", "store_mode", "train", "train", "trainers/vision/knnper_resnet.py:122: datastore from the is_training=True default"),
]


def expected(vision, shakespeare, preset):
    if preset == "shakespeare":
        return shakespeare
    return vision[preset] if isinstance(vision, dict) else vision


def preset(name: str) -> dict:
    with open(os.path.join(PAPER, f"{name}.toml"), "rb") as f:
        return tomllib.load(f)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize(("section", "key", "vision", "shakespeare", "where"), TABLE,
                         ids=[f"{s}.{k}" for s, k, *_ in TABLE])
def test_preset_selects_the_reference_choice(name, section, key, vision, shakespeare, where):
    table = preset(name).get(section, {})
    assert key in table, f"{name}.toml [{section}] does not set {key} (reference: {where})"
    want = expected(vision, shakespeare, name)
    assert table[key] == want and type(table[key]) is type(want), f"{name}.toml [{section}] {key}: reference {where}"


def test_the_table_covers_every_preset():
    assert sorted(f[:-5] for f in os.listdir(PAPER) if f.endswith(".toml")) == sorted(PRESETS)


def test_each_preset_names_its_own_file_in_its_usage_line():
    for name in PRESETS:
        with open(os.path.join(PAPER, f"{name}.toml")) as f:
            usage = [line for line in f if "--config configs/paper/" in line]
        assert usage == [f"#   python -m bench.run --config configs/paper/{name}.toml --data-dir DIR\n"], name
