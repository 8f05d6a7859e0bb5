"""The edges of the method interface (docs/architecture.md, Method interface): every registered method
is a concrete subclass of the abstract `Method`, its local update returns a `LocalResult` and its
aggregation an `AggregateResult`; a class that leaves an abstract function undefined is refused when
it is registered, and never reaches the registry."""
import inspect

import pytest
import torch

from fedeq_bench.core import seeding
from fedeq_bench.methods import METHODS
from fedeq_bench.methods.base import AggregateResult, LocalResult, Method, register_method, whole_model_personal
from fedeq_bench.methods.nets import build_model
from tests.helpers import method_setup

ABSTRACT = {"init_server", "broadcast", "local_update", "aggregate", "evaluate"}
# mlp on 4 features, 3 classes (tests/helpers.py): its state names and their sizes.
MLP_NAMES = ["body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias", "head.weight", "head.bias"]
MLP_NUMEL = 4 * 200 + 200 + 200 * 200 + 200 + 200 * 3 + 3  # 41803


def test_the_abstract_functions_are_exactly_the_five_without_a_default():
    assert Method.__abstractmethods__ == ABSTRACT  # init_client and personalize keep their defaults
    with pytest.raises(TypeError):
        Method(None, None)
    assert LocalResult._fields == ("message", "state", "metrics")
    assert AggregateResult._fields == ("server", "metrics")


@pytest.mark.parametrize("name", METHODS.names())
def test_every_registered_method_is_a_concrete_method(name):
    cls = METHODS.get(name)
    assert issubclass(cls, Method) and not inspect.isabstract(cls) and not cls.__abstractmethods__
    assert cls.name == name


def tensors(d) -> bool:
    return isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def floats(d) -> bool:
    return isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in d.items())


@pytest.mark.parametrize("name", METHODS.names())
def test_a_round_returns_the_named_results(name):
    cls = METHODS.get(name)
    model = "deq_mlp" if cls.model_kind == "deq" else "mlp"
    algo, server, _, d = method_setup(cls, data_seed=0, n=8, model=model, lr=0.05, local_epochs=1, batch_size=4)
    state = algo.init_client(0, server, seeding.generator(0, "client_init", 0))
    down = algo.broadcast(server, 0, 1)

    res = algo.local_update(down, state, d, seeding.generator(0, "local", 1, 0))
    assert type(res) is LocalResult
    assert tensors(res.message) and tensors(res.state) and floats(res.metrics)
    assert {"loss", "steps"} <= set(res.metrics)  # the plain keys the engine reads
    up, new_state, metrics = res  # still unpacks as the engine reads it
    assert (up, new_state, metrics) == (res.message, res.state, res.metrics)

    replies = [(0, res.message)] if res.message else []  # an empty message is not sent (`local`)
    agg = algo.aggregate(server, replies, 1)
    assert type(agg) is AggregateResult
    assert tensors(agg.server) and floats(agg.metrics)
    assert set(agg.server) == set(server)


class Partial(Method):
    """Defines every abstract function but aggregate and evaluate."""

    def init_server(self, model, rng):
        return {}

    def broadcast(self, server, cid, rnd):
        return {}

    def local_update(self, down, state, data, rng):
        return LocalResult({}, state, {})


class NoAggregate(Partial):
    def evaluate(self, down, state, data, rng):
        return {}


@pytest.mark.parametrize(("cls", "missing"), [(NoAggregate, "aggregate"), (Partial, "aggregate, evaluate")])
def test_a_class_with_abstract_functions_left_is_refused_and_not_registered(cls, missing):
    name = f"test_{cls.__name__.lower()}"
    with pytest.raises(TypeError) as e:
        register_method(name)(cls)
    assert str(e.value) == f"method {name!r} ({cls.__name__}) does not define {missing}"
    assert name not in METHODS and cls.name == ""  # not registered, not even renamed


def test_a_class_that_is_not_a_method_is_refused():
    class Duck:
        pass

    with pytest.raises(TypeError, match="is not a subclass of Method"):
        register_method("test_duck")(Duck)
    assert "test_duck" not in METHODS


@pytest.mark.parametrize("name", ["apfl", "ditto", "fedavg_ft", "pfedme"])
def test_a_whole_personal_model_next_to_the_global_one_counts_both(name):
    """These methods upload the global model and keep a whole model of their own: both lists are every
    state name, so params/shared = params/personal = the model's size."""
    cls = METHODS.get(name)
    net = build_model("mlp", (4,), 3)
    shared, personal = cls(cls.Config(model="mlp"), None).param_split(net)
    assert shared == personal == MLP_NAMES and shared is not personal
    assert sum(net.state_dict()[k].numel() for k in personal) == MLP_NUMEL


def test_local_shares_nothing_and_keeps_the_whole_model():
    cls = METHODS.get("local")
    net = build_model("mlp", (4,), 3)
    assert cls(cls.Config(model="mlp"), None).param_split(net) == ([], MLP_NAMES)
    assert whole_model_personal(net, shared=False) == ([], MLP_NAMES)
