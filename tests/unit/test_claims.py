"""bench/perf/claims.py: the FeDEQ paper's bytes and memory claims on its presets and models.

Expected values: the parameter counts are the reference's (longtanle/FeDEQ's Haiku models, the same
figures as tests/unit/test_presets.py and test_nets.py); the framing is the wire codec's documented
layout (bench/loop/wire.py): 8 bytes of header per message, and per tensor 2 + len(name) + 1 + 1 +
4 * ndim + 8 bytes before its raw data.
"""
from __future__ import annotations

import pytest
import torch

from bench.loop.wire import HEADER_BYTES
from bench.perf import __main__ as perf_main
from bench.perf import claims
from fedeq_bench.core.errors import BenchError
from fedeq_bench.methods.base import NUM_SAMPLES
from fedeq_bench.methods.nets import build_model, split_names

RESNET34_CIFAR100 = 1_856 + 221_952 + 1_403_392 + 9_150_464 + 65_792 + 32_896 + 256 + 12_900
# dataset: (FeDEQ's model, its parameters, its head's), (the baselines' model, its parameters), the
# hand-computed ratio full model / FeDEQ's shared part (model - head), to three decimals:
# 2,975,390 / 984,896 = 3.021; 7,779,274 / 2,725,120 = 2.855 (2.8547); 10,889,508 / 2,725,120 = 3.996;
# 416,730 / 210,944 = 1.976 (to two decimals 3.02, 2.85, 4.00, 1.98).
PAPER = {
    "femnist": (("deq_resnet_s_ref", 992_894, 128 * 62 + 62), ("resnet20", 2_975_390), 3.021),
    "cifar10": (("deq_resnet_m_ref", 2_726_410, 128 * 10 + 10), ("resnet34", 7_779_274), 2.855),
    "cifar100": (("deq_resnet_m_ref", 2_726_410 + 90 * 129, 128 * 100 + 100), ("resnet34", RESNET34_CIFAR100), 3.996),
    "shakespeare": (("deq_transformer", 266_906, 55_962), ("transformer8", 416_730), 1.976),
}


def framing(name: str, t: torch.Tensor) -> int:
    """The codec's bytes around one tensor's data (wire.py's layout)."""
    return 2 + len(name.encode()) + 1 + 1 + 4 * t.dim() + 8


def encoded_size(tensors: dict[str, torch.Tensor]) -> int:
    """Header + per tensor its framing and numel * itemsize bytes of data."""
    return HEADER_BYTES + sum(framing(k, t) + t.numel() * t.element_size() for k, t in tensors.items())


@pytest.mark.parametrize("dataset", sorted(PAPER))
def test_round_bytes_are_the_parameter_counts_in_float32_plus_framing(dataset):
    (deq, deq_params, deq_head), (explicit, explicit_params), ratio = PAPER[dataset]
    rows = {r["method"]: r for r in claims.round_bytes([dataset], methods=("fedeq", "fedavg", "fedrep", "local"))}
    shape, classes = claims.DATASETS[dataset]
    n_i = {NUM_SAMPLES: torch.tensor(1, dtype=torch.int64)}  # the uplink's n_i: one int64 scalar

    # FedAvg: the whole state dict both ways (+ n_i up). Its parameters are float32, 4 bytes each; the
    # buffers (BatchNorm statistics) travel too.
    sd = build_model(explicit, shape, classes).state_dict()
    params = {n for n, _ in build_model(explicit, shape, classes).named_parameters()}
    assert sum(sd[k].numel() for k in params) == explicit_params
    assert all(sd[k].dtype == torch.float32 for k in params)
    assert rows["fedavg"]["params"] == explicit_params
    assert rows["fedavg"]["down"] == encoded_size(sd)
    assert rows["fedavg"]["up"] == encoded_size({**sd, **n_i}) == rows["fedavg"]["down"] + framing(NUM_SAMPLES, n_i[NUM_SAMPLES]) + 8
    float_data = 4 * explicit_params
    assert encoded_size(sd) - float_data == HEADER_BYTES + sum(framing(k, t) for k, t in sd.items()) + sum(
        t.numel() * t.element_size() for k, t in sd.items() if k not in params)

    # FeDEQ: the DEQ body (parameters and its normalization statistics) down with a one-byte resume
    # flag, up with n_i; the head stays on the client.
    net = build_model(deq, shape, classes)
    body, head = split_names(net)
    dsd = net.state_dict()
    assert sum(dsd[k].numel() for k in head) == deq_head
    theta = {k: dsd[k] for k in body}
    resume = {"resume": torch.tensor(False)}
    assert rows["fedeq"]["params"] == deq_params - deq_head
    assert rows["fedeq"]["down"] == encoded_size({**theta, **resume})
    assert rows["fedeq"]["up"] == encoded_size({**theta, **n_i})

    # The paper's ratio, full model against FeDEQ's shared part, from the real messages' parameters.
    assert round(rows["fedavg"]["params"] / rows["fedeq"]["params"], 3) == ratio
    # With buffers and framing the bytes' ratio is within 1% of it.
    total = {m: rows[m]["down"] + rows[m]["up"] for m in rows}
    assert total["fedavg"] / total["fedeq"] == pytest.approx(explicit_params / (deq_params - deq_head), rel=0.01)
    # FedRep sends its body only (the head's parameters stay); `local` sends nothing.
    head_params = sum(sd[k].numel() for k in split_names(build_model(explicit, shape, classes))[1] if k in params)
    assert rows["fedrep"]["params"] == explicit_params - head_params
    assert rows["local"]["down"] == rows["local"]["up"] == rows["local"]["params"] == 0


def test_memory_of_one_batch_updates_counts_the_models_each_method_holds():
    """FedAvg on resnet20: at least its parameters and their gradients, 2 x 4 bytes per parameter; Ditto
    trains a second (personal) model after the global one and keeps the global one's upload: at
    least one model more. One batch of the preset's size (10)."""
    rows = {r["method"]: r for r in claims.update_memory(["femnist"], b_solvers=["gmres"],
                                                        methods=("fedavg", "ditto"))}
    model_bytes = 4 * PAPER["femnist"][1][1]
    assert rows["fedavg"]["batch"] == rows["ditto"]["batch"] == 10
    assert rows["fedavg"]["metrics"]["steps"] == 1 and rows["ditto"]["metrics"]["steps"] == 2  # one batch per phase
    assert rows["fedavg"]["peak"] >= 2 * model_bytes
    assert rows["ditto"]["peak"] >= rows["fedavg"]["peak"] + model_bytes
    assert rows["fedavg"]["b_solver"] is None


def test_epochs_are_capped_not_raised():
    cfg = claims.paper_config("femnist")
    from bench.config import resolve_method

    fedeq = claims.cap_epochs(resolve_method(cfg, "fedeq", {}), 1)
    assert (fedeq.personal_epochs, fedeq.shared_epochs) == (1, 1)
    ft = claims.cap_epochs(resolve_method(cfg, "fedavg_ft", {}), 1)
    assert (ft.local_epochs, ft.finetune_epochs) == (1, 0)  # the preset's 0 stays 0
    assert claims.cap_epochs(resolve_method(cfg, "fedrep", {}), 0).head_epochs == 0


def test_bad_names_are_one_line_before_anything_is_measured():
    with pytest.raises(BenchError, match=r"fedeq.b_solver must be one of .*gmres.*, got 'nope'"):
        claims.check_b_solvers(["gmres", "nope"])
    assert claims.check_b_solvers(["preset", "gmres", "preset"]) == ("preset", "gmres")
    with pytest.raises(BenchError, match=r"unknown paper dataset 'mnist'; choose from cifar10, cifar100"):
        claims.paper_config("mnist")
    with pytest.raises(BenchError, match=r"the femnist preset has no method 'fedprox'"):
        claims.check_methods(["femnist"], ["fedavg", "fedprox"])


@pytest.mark.parametrize("argv, message", [
    (["--memory-claim", "--b-solvers", "gmres,nope"], "fedeq.b_solver must be one of"),
    (["--bytes-claim", "--datasets", "femnist,mnist"], "unknown paper dataset 'mnist'"),
    (["--memory-claim", "--b-solvers", "gmres", "--claim-methods", "fedprox"], "preset has no method 'fedprox'"),
])
def test_cli_refuses_bad_names_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        perf_main.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
