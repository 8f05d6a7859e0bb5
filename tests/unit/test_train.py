"""methods/train.py's `load`: it copies exactly the named entries, and refuses a name the network does
not have instead of skipping it."""
import pytest
import torch
from torch import nn

from fedeq_bench.methods.train import load


def linear() -> nn.Linear:
    net = nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.fill_(1.0)
        net.bias.fill_(2.0)
    return net


def test_load_copies_the_named_entries_and_leaves_the_others():
    net = linear()
    load(net, {"weight": torch.zeros(2, 2)})
    assert torch.equal(net.weight, torch.zeros(2, 2))
    assert torch.equal(net.bias, torch.full((2,), 2.0))  # not named: as it was


def test_load_refuses_an_unknown_name_before_copying_anything():
    net = linear()
    # `resume` is a flag FeDEQ sends next to its tensors; skipping it silently hid the caller's bug.
    with pytest.raises(ValueError) as e:
        load(net, {"weight": torch.zeros(2, 2), "resume": torch.tensor(True)})
    assert str(e.value) == "load: Linear has no state named resume; its names are weight, bias"
    assert torch.equal(net.weight, torch.ones(2, 2))  # refused whole: the known entry was not copied either


def test_a_long_list_of_names_is_cut_after_eight():
    net = nn.Sequential(*[nn.Linear(1, 1) for _ in range(5)])  # 0.weight, 0.bias, ..., 4.bias: 10 names
    unknown = {f"v.{i}": torch.zeros(1) for i in range(9)}
    with pytest.raises(ValueError) as e:
        load(net, unknown)
    assert str(e.value) == (
        "load: Sequential has no state named v.0, v.1, v.2, v.3, v.4, v.5, v.6, v.7, ... (9 in all); "
        "its names are 0.weight, 0.bias, 1.weight, 1.bias, 2.weight, 2.bias, 3.weight, 3.bias, ... (10 in all)"
    )
