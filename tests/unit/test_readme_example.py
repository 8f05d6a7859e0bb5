"""The README's worked example of adding a method really runs: its code block, as written, defines
and registers FedAvgM; a real comparison (serial backend, MLflow store) runs it beside FedAvg.

beta = 0 must give FedAvg's numbers bit for bit (w <- mean - 0 * v is the mean itself), and beta = 0.9
must differ from round 2 on (round 1's v starts at 0, so its w is the mean too)."""
import re
import sys
import types

import pytest

from bench import config as C
from bench import experiment
from fedeq_bench.methods import METHODS
from tests.conftest import ROOT

NONDETERMINISTIC = {"time/round_s", "mem/peak_rss_bytes"}


def readme_example() -> str:
    with open(f"{ROOT}/README.md") as f:
        text = f.read()
    m = re.search(r"<!-- example: methods/fedavgm.py -->\n```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its worked example (the marker and a python block after it)"
    return m.group(1)


@pytest.fixture
def fedavgm(monkeypatch):
    """The README's module, executed as `fedeq_bench.methods.fedavgm`, registered in a copy of the
    registry that the test puts back."""
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))
    module = types.ModuleType("fedeq_bench.methods.fedavgm")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
    exec(compile(readme_example(), "README.md:methods/fedavgm.py", "exec"), module.__dict__)
    assert "fedavgm" in METHODS
    return module


def histories(tmp_path, beta):
    cfg = C.apply(C.default_config(), {
        "methods": "fedavgm,fedavg", "dataset": "synthetic", "clients": 6, "rounds": 3, "backend": "serial",
        "tracking_uri": f"sqlite:///{tmp_path}/m{beta}.db", "fedavgm.beta": beta})
    cfg = experiment.validate(cfg)
    datasets = experiment.load_checked(cfg)
    from bench.loop import engine
    from bench.loop.backends import SerialBackend

    return {m: engine.run_method(cfg, m, 0, datasets[0], SerialBackend()).history for m in ("fedavgm", "fedavg")}


def same(a, b):
    return [{k: v for k, v in r.items() if k not in NONDETERMINISTIC} for r in a] == \
           [{k: v for k, v in r.items() if k not in NONDETERMINISTIC} for r in b]


def test_the_readme_method_runs_and_beta_0_is_fedavg_bit_for_bit(fedavgm, tmp_path):
    h = histories(tmp_path, 0.0)
    assert len(h["fedavgm"]) == 3 and same(h["fedavgm"], h["fedavg"])


def test_momentum_changes_the_model_from_round_2_on(fedavgm, tmp_path):
    h = histories(tmp_path, 0.9)
    assert h["fedavgm"][0]["loss/train"] == h["fedavg"][0]["loss/train"]  # round 1: same start, same updates
    assert h["fedavgm"][2]["loss/train"] != h["fedavg"][2]["loss/train"]
    assert h["fedavgm"][0]["bytes/up"] == h["fedavg"][0]["bytes/up"]  # v never crosses the network


def test_its_flag_is_range_checked_like_every_method_key(fedavgm):
    from fedeq_bench.core.errors import BenchError

    with pytest.raises(BenchError, match=r"^fedavgm.beta must be"):
        experiment.validate(C.apply(C.default_config(), {"methods": "fedavgm", "fedavgm.beta": 1.0}))
