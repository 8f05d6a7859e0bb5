"""bench/config.py: strict keys and types, presets, precedence (environment included), per-method
inheritance, and the command-line flags generated from the dataclasses (bench/cli.py)."""
import dataclasses

import pytest

from fedeq_bench.bench import cli

from fedeq_bench.bench import config as C
from fedeq_bench.core.errors import BenchError


def test_defaults_cover_every_registered_method_and_dataset():
    from fedeq_bench.datasets.base import DATASETS
    from fedeq_bench.methods import METHODS

    cfg = C.default_config()
    assert set(cfg.methods) == set(METHODS.names())
    assert set(cfg.datasets) == set(DATASETS.names())


def test_set_parses_types_per_key():
    cfg = C.apply(C.default_config(), C.parse_set(
        ["rounds=7", "run.lr=0.5", "fedrep.head_epochs=3", "seeds=1,2,3", "model=none", "fraction=1"]))
    assert cfg.run.rounds == 7 and cfg.run.lr == 0.5 and cfg.run.seeds == (1, 2, 3)
    assert cfg.methods["fedrep"].head_epochs == 3
    assert cfg.run.model is None and cfg.run.fraction == 1.0 and isinstance(cfg.run.fraction, float)


@pytest.mark.parametrize("item, fragment", [
    ("fedrep.head_epoch=3", "unknown key 'fedrep.head_epoch'; fedrep keys: fedrep.batch_size, fedrep.head_epochs"),
    ("roundz=3", "unknown key 'roundz'; run keys:"),
    ("nosuch.x=1", "unknown key 'nosuch.x': sections are run,"),
    ("rounds=abc", "rounds expects int, got 'abc'"),
    ("rounds=1.5", "rounds expects int"),
    ("lr=fast", "lr expects float"),
    ("backend=mpi", "backend must be one of ray, serial, got 'mpi'"),
    ("seeds=1,x", "seeds expects comma list of int"),
])
def test_bad_keys_and_types_name_the_problem(item, fragment):
    with pytest.raises(BenchError) as e:
        C.apply(C.default_config(), C.parse_set([item]))
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_set_without_equals_is_rejected():
    with pytest.raises(BenchError, match="--set expects key=value"):
        C.parse_set(["rounds"])


def test_toml_preset_is_typed_and_strict(tmp_path):
    good = tmp_path / "p.toml"
    good.write_text('[run]\nrounds = 4\nseeds = [3, 4]\nlr = 1\n[fedrep]\nhead_epochs = 2\n')
    cfg = C.apply(C.default_config(), C.load_toml(str(good)))
    assert cfg.run.rounds == 4 and cfg.run.seeds == (3, 4) and cfg.run.lr == 1.0
    assert cfg.methods["fedrep"].head_epochs == 2
    bad = tmp_path / "b.toml"
    bad.write_text('[run]\nrounds = "four"\n')
    with pytest.raises(BenchError, match="run.rounds expects int"):
        C.apply(C.default_config(), C.load_toml(str(bad)))
    with pytest.raises(BenchError, match="not found"):
        C.load_toml(str(tmp_path / "missing.toml"))
    (tmp_path / "x.toml").write_text("rounds = 3\n")
    with pytest.raises(BenchError, match=r"must be a \[table\]"):
        C.load_toml(str(tmp_path / "x.toml"))


def test_method_values_inherit_from_run_unless_set():
    cfg = C.apply(C.default_config(), {"lr": "0.2", "local_epochs": "3", "fedavg.lr": "0.01"})
    pairing = {"explicit": "mlp", "deq": "deq_mlp"}
    fedavg = C.resolve_method(cfg, "fedavg", pairing)
    fedrep = C.resolve_method(cfg, "fedrep", pairing)
    assert (fedavg.lr, fedavg.local_epochs) == (0.01, 3)
    assert (fedrep.lr, fedrep.local_epochs, fedrep.batch_size) == (0.2, 3, 32)


def test_model_resolves_method_then_run_then_dataset_pairing():
    pairing = {"explicit": "mlp", "deq": "deq_mlp"}
    cfg = C.default_config()
    assert C.resolve_method(cfg, "fedavg", pairing).model == "mlp"  # the pairing's explicit model
    assert C.resolve_method(cfg, "fedeq", pairing).model == "deq_mlp"  # FeDEQ trains the DEQ one
    cfg = C.apply(cfg, {"model": "cnn"})
    assert C.resolve_method(cfg, "fedavg", pairing).model == "cnn"  # --model beats the pairing
    cfg = C.apply(cfg, {"fedavg.model": "resnet20"})
    assert C.resolve_method(cfg, "fedavg", pairing).model == "resnet20"  # METHOD.model beats --model


def test_flatten_gives_strings_for_mlflow():
    flat = C.flatten(C.default_config(), ["fedrep"], "synthetic")
    assert flat["run.rounds"] == str(C.RunConfig().rounds)
    assert flat["run.methods"] == "fedavg,fedrep"
    assert flat["fedrep.head_epochs"] == "10"
    assert not any(k.startswith("fedavg.") for k in flat)
    assert "synthetic.alpha" in flat


# -- the environment (MLflow's conventions) --------------------------------------------------------

def test_env_gives_tracking_uri_and_experiment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-env.db")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "env-exp")
    run = C.from_cli(None, {}, []).run
    assert (run.tracking_uri, run.experiment) == ("sqlite:///from-env.db", "env-exp")


def test_env_unset_or_empty_leaves_the_defaults(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "")
    run = C.from_cli(None, {}, []).run
    assert (run.tracking_uri, run.experiment) == ("sqlite:///mlflow.db", "fedeq-bench")


def test_precedence_env_below_config_file_below_flag_below_set(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    preset = tmp_path / "p.toml"
    preset.write_text('[run]\ntracking_uri = "sqlite:///file.db"\n')
    assert C.from_cli(str(preset), {}, []).run.tracking_uri == "sqlite:///file.db"  # --config > env
    flag = {"tracking_uri": "sqlite:///flag.db"}
    assert C.from_cli(str(preset), flag, []).run.tracking_uri == "sqlite:///flag.db"  # flag > --config
    sets = ["tracking_uri=sqlite:///set.db"]
    assert C.from_cli(str(preset), flag, sets).run.tracking_uri == "sqlite:///set.db"  # --set > flag
    assert C.from_cli(None, {"tracking_uri": None}, []).run.tracking_uri == "sqlite:///env.db"  # untyped flag


# -- flags generated from the dataclasses ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Toy:
    rounds: int = 3
    """How many rounds;
    raising it costs time."""
    mode: str | None = None
    verbose: bool = False
    """Say more."""


def test_field_docs_are_the_string_under_each_field():
    assert C.field_docs(Toy) == {"rounds": "How many rounds; raising it costs time.", "verbose": "Say more."}
    docs = C.field_docs(C.RunConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(C.RunConfig)}  # every run field is documented
    assert docs["rounds"].startswith("Communication rounds")


def toy_parser():
    p = cli.Parser(prog="toy")
    return p, cli.add_config_flags(p, Toy)


def test_generated_flags_default_to_none_and_stay_strings():
    p, keys = toy_parser()
    assert keys == ["rounds", "mode", "verbose"]
    assert cli.config_flags(p.parse_args([]), keys) == {"rounds": None, "mode": None, "verbose": None}
    args = p.parse_args(["--rounds", "7", "--mode", "x", "--no-verbose"])
    assert cli.config_flags(args, keys) == {"rounds": "7", "mode": "x", "verbose": False}


def test_help_shows_each_docstring_and_default():
    p, _ = toy_parser()
    text = " ".join(p.format_help().split())
    assert "--rounds INT How many rounds; raising it costs time. (default: 3)" in text
    assert "--verbose, --no-verbose Say more. (default: False)" in text


def test_unknown_flag_is_one_line_exit_2(capsys):
    p, _ = toy_parser()
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--roundz", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: unrecognized arguments: --roundz 3 (see toy --help)")


def test_a_flag_of_the_wrong_type_names_key_and_type():
    p = cli.Parser(prog="t")
    keys = cli.add_config_flags(p, C.RunConfig, ["rounds", "dataset"])
    flags = cli.config_flags(p.parse_args(["--rounds", "1.5"]), keys)
    with pytest.raises(BenchError, match=r"^rounds expects int, got '1.5'$"):
        C.from_cli(None, flags, [])


def test_help_default_names_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "env-exp")
    p = cli.Parser(prog="t")
    cli.add_config_flags(p, C.RunConfig, ["experiment"])
    assert "(default: env-exp, from $MLFLOW_EXPERIMENT_NAME)" in " ".join(p.format_help().split())


def test_unreadable_preset_files_are_one_line(tmp_path):
    """A Latin-1 file, a folder: one BenchError line each (a non-UTF-8 file was a UnicodeDecodeError
    traceback)."""
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"[run]\nrounds = 3  # \xe9t\xe9\n")
    with pytest.raises(BenchError, match=r"config file '.*latin1.toml' is not UTF-8 text \(byte 20: b'\\xe9'\); "
                                         r"TOML files are UTF-8"):
        C.load_toml(str(latin1))
    with pytest.raises(BenchError, match=r"config file '.*' is a folder; give a .toml file"):
        C.load_toml(str(tmp_path))
