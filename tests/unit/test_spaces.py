"""bench/tuning/spaces.py: search spaces as data (configs/sweeps/<method>.toml), validated by the --set code,
restricted by --params, overridden by --space FILE, and sampled through a real Optuna trial."""
import math

import optuna
import pytest

from bench import config as C
from bench.tuning import spaces as S
from fedeq_bench.core.errors import BenchError
from fedeq_bench.methods import METHODS


def write(tmp_path, text, name="space.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def one_line_error(fn, *fragments):
    """Run fn, expect a BenchError with every fragment in its message, on one line."""
    with pytest.raises(BenchError) as e:
        fn()
    msg = str(e.value)
    for f in fragments:
        assert f in msg, msg
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("method", METHODS.names())
def test_every_registered_method_has_a_space_that_loads_and_applies(method):
    # Prepare / Execute
    space = S.load_space(method)
    # Assert: non-empty, keys are the method's own --set keys, each bound/choice accepted by apply.
    assert space, method
    cfg = C.default_config()
    for key, d in space.items():
        assert key == d.key and key.startswith(f"{method}.")
        values = list(d.choices) if d.kind == "categorical" else [d.low, d.high]
        for v in values:
            C.apply(cfg, {key: v})


def test_fedeq_space_is_log_uniform_in_rho_and_tolerances_and_holds_the_defaults():
    # Expected ranges: rho, forward tol and adjoint b_tol log-uniform (each spans decades), max_iter,
    # lr and epochs, with the bounds written in configs/sweeps/fedeq.toml.
    space = S.load_space("fedeq")
    assert space["fedeq.rho"] == S.Dist("fedeq.rho", "float", low=1e-4, high=10.0, log=True)
    assert space["fedeq.tol"].log and space["fedeq.b_tol"].log
    # max_iter is an int field (methods/fedeq.py: `max_iter: int = 20`), so its range is int.
    assert space["fedeq.max_iter"] == S.Dist("fedeq.max_iter", "int", low=5, high=40)
    # lr is `float | None`: the file's bounds are floats, and an int bound would be coerced to float too.
    assert space["fedeq.lr"].kind == "float"
    # The defaults lie inside the ranges (methods/fedeq.py: rho 0.01, tol 1e-3, b_tol 1e-3, max_iter 20).
    defaults = C.default_config().methods["fedeq"]
    for name in ("rho", "tol", "b_tol", "max_iter", "personal_epochs", "shared_epochs"):
        d = space[f"fedeq.{name}"]
        assert d.low <= getattr(defaults, name) <= d.high, name


def test_params_restrict_by_short_and_full_names():
    full = S.load_space("fedeq")
    # "rho" is short for "fedeq.rho"; "fedeq.tol" is already a full key.
    sub = S.load_space("fedeq", params=["rho", "fedeq.tol"])
    assert list(sub) == ["fedeq.rho", "fedeq.tol"]  # file order, not params order
    assert sub["fedeq.rho"] == full["fedeq.rho"]


def test_unknown_params_name_lists_the_space():
    msg = one_line_error(lambda: S.load_space("fedeq", params=["rho", "rhoo"]),
                         "'rhoo' is not in fedeq's search space", "rho", "b_tol", "max_iter")
    assert "fedeq.rho" not in msg  # offered as --params takes them: short names


def test_space_file_overrides_the_default(tmp_path):
    p = write(tmp_path, "fedeq.rho = {low = 0.5, high = 2}\n")
    space = S.load_space("fedeq", path=p)
    # Only the file's key; `rho` is a float field, so the int bound 2 is the float 2.0 (as --set coerces).
    assert space == {"fedeq.rho": S.Dist("fedeq.rho", "float", low=0.5, high=2.0)}


def test_dotted_and_table_forms_are_the_same(tmp_path):
    dotted = write(tmp_path, "fedrep.head_epochs = {low = 1, high = 10}\nfedrep.lr = {low = 1e-3, high = 0.3, log = true}\n", "a.toml")
    table = write(tmp_path, "[fedrep]\nhead_epochs = {low = 1, high = 10}\nlr = {low = 1e-3, high = 0.3, log = true}\n", "b.toml")
    assert S.load_space("fedrep", path=dotted) == S.load_space("fedrep", path=table)
    assert S.load_space("fedrep", path=dotted)["fedrep.head_epochs"].kind == "int"


def test_run_keys_and_categoricals(tmp_path):
    p = write(tmp_path, 'lr = {low = 0.01, high = 0.1}\nfedeq.solver = {choices = ["anderson", "broyden"]}\n')
    space = S.load_space("fedeq", path=p)
    assert space["lr"] == S.Dist("lr", "float", low=0.01, high=0.1)
    assert space["fedeq.solver"] == S.Dist("fedeq.solver", "categorical", choices=("anderson", "broyden"))


def test_a_wire_format_is_a_categorical_like_any_other(tmp_path):
    """A multi-objective sweep (acc, bytes) can trade accuracy for bytes through the wire format."""
    p = write(tmp_path, 'fedrep.wire = {choices = ["fp32", "fp16", "int8"]}\nwire = {choices = ["fp32", "bf16"]}\n')
    space = S.load_space("fedrep", path=p)
    assert space["fedrep.wire"] == S.Dist("fedrep.wire", "categorical", choices=("fp32", "fp16", "int8"))
    assert space["wire"].choices == ("fp32", "bf16")


@pytest.mark.parametrize("text, fragments", [
    # Unknown keys: the same messages as --set (see tests/unit/test_config.py).
    ("fedeq.rhoo = {low = 1, high = 2}", ["fedeq.rhoo", "unknown key 'fedeq.rhoo'; fedeq keys:"]),
    ("fedq.rho = {low = 1, high = 2}", ["unknown key 'fedq.rho': sections are run,"]),
    # Bad ranges.
    ("fedeq.rho = {low = 2, high = 2}", ["fedeq.rho", "low must be below high"]),
    ("fedeq.rho = {low = 3, high = 2}", ["fedeq.rho", "low must be below high"]),
    # dual_init takes any finite number, so the log rule (not the field's range) refuses these.
    ("fedeq.dual_init = {low = 0, high = 2, log = true}", ["fedeq.dual_init", "a log range needs low > 0"]),
    ("fedeq.dual_init = {low = -1, high = 2, log = true}", ["a log range needs low > 0"]),
    # A range leaving the field's declared range (core/ranges.py), at either end, and non-finite bounds.
    ("fedeq.rho = {low = 0, high = 2}", ["fedeq.rho must be > 0, got 0.0"]),
    ("fedeq.rho = {low = -1, high = 2, log = true}", ["fedeq.rho must be > 0, got -1.0"]),
    ("fedeq.rho = {low = 1e-3, high = inf, log = true}", ["fedeq.rho must be a finite number > 0, got inf"]),
    ("fedeq.tol = {low = nan, high = 0.1}", ["fedeq.tol must be a finite number > 0, got nan"]),
    ("knnper.mix = {low = 0.5, high = 1.5}", ["knnper.mix must be in [0, 1], got 1.5"]),
    ("fedeq.max_iter = {low = 0, high = 40}", ["fedeq.max_iter must be >= 1, got 0"]),
    ("pfedme.K = {choices = [5, 0]}", ["pfedme.K must be >= 1, got 0"]),
    ("lr = {low = 0, high = 0.3}", ["lr must be > 0, got 0.0"]),
    # Wrong type: float bounds on an int field, a string on a float field, a bad choice.
    ("fedeq.max_iter = {low = 5.0, high = 40.0}", ["fedeq.max_iter expects int"]),
    ('fedeq.rho = {low = "small", high = 2}', ["fedeq.rho expects float, got 'small'"]),
    ('fedeq.solver = {choices = ["anderson", "newton"]}', ["fedeq.solver must be one of anderson, broyden, fixed_point"]),
    ('fedrep.wire = {choices = ["fp32", "int4"]}', ["fedrep.wire expects 'fp32' | 'fp16' | 'bf16' | 'int8' | 'topk' | none, got 'int4'"]),
    # Malformed entries.
    ("fedeq.rho = {lo = 1, high = 2}", ["fedeq.rho", "unknown field 'lo'", "low, high, log, step, choices"]),
    ("fedeq.rho = {high = 2}", ["fedeq.rho", "a range needs both low and high"]),
    ('fedeq.solver = {low = 1, high = 2, choices = ["anderson"]}', ["either choices or low/high"]),
    ("fedeq.solver = {choices = []}", ["choices must be a non-empty list"]),
    ("seeds = {choices = [[0, 1], [2]]}", ["seeds", "each choice must be a string, number or boolean"]),
    ("fedeq.rho = 0.5", ["fedeq.rho", "expected a table"]),
    ("fedeq.max_iter = {low = 5, high = 40, step = 2.5}", ["step must be a positive int"]),
    ("fedeq.rho = {low = 1e-3, high = 1, log = true, step = 0.1}", ["step and log cannot be combined"]),
    ("fedeq.rho = {low = 1e-3, high = 1, log = 1}", ["log must be true or false"]),
])
def test_bad_space_is_one_line_naming_file_and_key(tmp_path, text, fragments):
    p = write(tmp_path, text + "\n")
    one_line_error(lambda: S.load_space("fedeq", path=p), f"search space {p!r}", *fragments)


def test_missing_or_invalid_files(tmp_path):
    one_line_error(lambda: S.load_space("fedeq", path=str(tmp_path / "nope.toml")), "not found")
    p = write(tmp_path, "fedeq.rho = {low = \n")
    one_line_error(lambda: S.load_space("fedeq", path=p), "is not valid TOML")
    one_line_error(lambda: S.load_space("fedq"), "unknown method 'fedq'; choose from", "fedeq")


def test_installed_without_a_checkout_says_to_pass_space(monkeypatch):
    monkeypatch.setattr(S, "sweeps_dir", lambda: None)
    one_line_error(lambda: S.load_space("fedeq"), "pass --space FILE")


@pytest.mark.parametrize("method", ["fedeq", "pfedme", "lg_fedavg", "knnper"])
def test_suggest_draws_typed_values_inside_the_bounds_that_apply_accepts(method):
    # Prepare: a real Optuna trial; several draws so a value outside [low, high] would show up.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = S.load_space(method)
    for _ in range(5):
        trial = study.ask()
        # Execute
        values = S.suggest(trial, space)
        # Assert: keyed by --set key, the right type, in range, and the trial's params are the same.
        assert set(values) == set(space) and values == trial.params
        for key, v in values.items():
            d = space[key]
            if d.kind == "categorical":
                assert v in d.choices
            else:
                assert type(v) is (int if d.kind == "int" else float), (key, v)
                assert d.low <= v <= d.high, (key, v)
        cfg = C.apply(C.default_config(), values)
        for key, v in values.items():
            section, _, name = key.rpartition(".")
            assert getattr(cfg.methods[section], name) == v
        study.tell(trial, 0.0)


def test_suggest_respects_step(tmp_path):
    p = write(tmp_path, "fedeq.max_iter = {low = 5, high = 40, step = 5}\nfedeq.rho = {low = 0.25, high = 1.25, step = 0.25}\n")
    space = S.load_space("fedeq", path=p)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(10):
        v = S.suggest(study.ask(), space)
        assert (v["fedeq.max_iter"] - 5) % 5 == 0
        # 0.25 grid: rho * 4 is a whole number in 1..5.
        assert math.isclose(v["fedeq.rho"] * 4, round(v["fedeq.rho"] * 4))


def test_space_keys_in_full_and_short_form():
    space = S.load_space("fedeq", params=["rho", "max_iter"])
    assert S.space_keys(space) == ["fedeq.rho", "fedeq.max_iter"]
    assert S.space_keys(space, short="fedeq") == ["rho", "max_iter"]
