"""bench/config.py: strict keys and types, presets, precedence (environment included), per-method
inheritance, and the command-line flags generated from the dataclasses (bench/cli.py)."""
import dataclasses
import glob
import os
import typing

import pytest

from bench import cli
from bench import config as C
from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.ranges import numeric_kind, range_of, ranged

CONFIGS = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "configs"))


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


def test_config_files_layer_in_the_order_given(tmp_path):
    """`--config A --config B` (a study's settings, then the tuned preset of its sweeps): B's keys over
    A's, A's keys that B leaves out kept, method tables merged key by key."""
    from bench import run

    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('[run]\nrounds = 40\nlr = 0.01\n[fedrep]\nhead_epochs = 1\nlr = 0.2\n')
    b.write_text('[run]\nlr = 0.03\n[fedrep]\nlr = 0.07\n')
    cfg, _ = run.resolve_config(["--config", str(a), "--config", str(b), "--methods", "fedrep"])
    assert (cfg.run.rounds, cfg.run.lr) == (40, 0.03)
    assert (cfg.methods["fedrep"].head_epochs, cfg.methods["fedrep"].lr) == (1, 0.07)
    cfg, _ = run.resolve_config(["--config", str(b), "--config", str(a), "--methods", "fedrep"])
    assert (cfg.run.lr, cfg.methods["fedrep"].lr) == (0.01, 0.2)  # the other order: A's over B's


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
    with pytest.raises(BenchError, match=r"config file '.*' is a folder; expected a .toml file"):
        C.load_toml(str(tmp_path))


# -- ranges: one declared range per numeric field, checked at every level (core/ranges.py) ----------

def unranged(cls) -> list[str]:
    """The numeric fields of config dataclass `cls` that declare no range."""
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if numeric_kind(hints[f.name]) and range_of(f) is None]


def config_classes():
    """RunConfig, every registered method's Config and every dataset's config class."""
    from fedeq_bench.datasets.base import DATASETS
    from fedeq_bench.methods import METHODS

    return ([("run", C.RunConfig)] + [(n, METHODS.get(n).Config) for n in METHODS.names()]
            + [(n, DATASETS.get(n).config) for n in DATASETS.names()])


@pytest.mark.parametrize("section, cls", config_classes(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_numeric_field_declares_a_range(section, cls):
    """A numeric field added without `ranged(...)` fails here, so no field can skip the check."""
    assert unranged(cls) == [], f"{section}: declare these fields with ranged(default, gt/ge/lt/le=...)"


def test_the_walk_sees_numeric_fields_and_flags_an_undeclared_one():
    # The walk would pass vacuously if it saw no numeric field; RunConfig has these (and more).
    hints = typing.get_type_hints(C.RunConfig)
    numeric = {f.name for f in dataclasses.fields(C.RunConfig) if numeric_kind(hints[f.name])}
    assert {"rounds", "lr", "fraction", "seeds", "clients", "state_budget_gb"} <= numeric
    assert "dataset" not in numeric and "memory_every_round" not in numeric  # str and bool are not numbers

    @dataclasses.dataclass(frozen=True)
    class Toy:
        rate: float = 0.5
        steps: int | None = None
        ok: float = ranged(1.0, gt=0)
        name: str = "x"

    assert unranged(Toy) == ["rate", "steps"]


def test_defaults_satisfy_their_own_ranges_and_a_bad_default_fails_at_definition():
    C.check_config(C.default_config())  # every section at its defaults
    with pytest.raises(ValueError, match="outside its own range"):
        ranged(0.0, gt=0)
    with pytest.raises(ValueError, match="outside its own range"):
        ranged(float("nan"))
    with pytest.raises(ValueError, match="outside its own range"):
        ranged((0, -1), ge=0)


PRESETS = sorted(p for p in glob.glob(os.path.join(CONFIGS, "**", "*.toml"), recursive=True)
                 if os.path.basename(os.path.dirname(p)) != "sweeps")  # spaces: tests/unit/test_spaces.py


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_every_shipped_preset_loads_within_the_ranges(path):
    C.check_config(C.apply(C.default_config(), C.load_toml(path)))


def bench_run_in_process(argv, tmp_path, capsys):
    """`python -m bench.run ARGV` in this process: (exit code, stderr lines); nothing may be recorded."""
    from bench import run as bench_run

    code = bench_run.main(["--backend", "serial", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", *argv])
    return code, capsys.readouterr().err.strip().splitlines()


# (argv, the one error line without "error: "). Every level a number can be set at: a flag, --set of a
# run key, a method key and a dataset key; the --config levels are in the next test.
BAD_NUMBERS = [
    # flags
    (["--lr", "inf"], "lr must be a finite number > 0, got inf"),
    (["--lr", "1e400"], "lr must be a finite number > 0, got inf"),  # parses to inf
    (["--lr", "-0"], "lr must be > 0, got -0.0"),
    (["--fraction", "nan"], "fraction must be in (0, 1], got nan"),
    (["--rounds", "0"], "rounds must be >= 1, got 0"),
    (["--rounds", "2.5"], "rounds expects int, got '2.5'"),
    (["--seeds", "0,-1"], "seeds must be integers in [0, 4294967295], got -1"),
    (["--seeds", "4294967296"], "seeds must be integers in [0, 4294967295], got 4294967296"),
    (["--val-frac", "1"], "val_frac must be in [0, 1), got 1.0"),
    (["--cpus-per-client=-inf"], "cpus_per_client must be a finite number >= 0, got -inf"),
    (["--state-budget-gb", "nan"],
     "state_budget_gb must be a finite number >= 0 (0: every client state on disk), got nan"),
    (["--checkpoint-every", "-1"], "checkpoint_every must be >= 0 (0: no checkpoints), got -1"),
    # --set run keys, bare or written run.KEY
    (["--set", "lr=nan"], "lr must be a finite number > 0, got nan"),
    (["--set", "run.lr=-inf"], "run.lr must be a finite number > 0, got -inf"),
    (["--set", "frac_unseen=inf"], "frac_unseen must be in [0, 1), got inf"),
    (["--set", "eval_every=0"], "eval_every must be >= 1, got 0"),
    (["--set", "eval_clients=0"], "eval_clients must be >= 1, got 0"),
    (["--set", "workers=0"], "workers must be >= 1, got 0"),
    (["--set", "gpus_per_client=NaN"], "gpus_per_client must be a finite number >= 0, got nan"),
    (["--set", "local_epochs=-1"], "local_epochs must be >= 1, got -1"),
    (["--set", "batch_size=true"], "batch_size expects int, got 'true'"),
    # --set method keys: the shared per-method overrides and each method's own fields
    (["--set", "fedavg.lr=nan"], "fedavg.lr must be a finite number > 0, got nan"),
    (["--set", "fedrep.lr=infinity"], "fedrep.lr must be a finite number > 0, got inf"),
    (["--set", "local.batch_size=0"], "local.batch_size must be >= 1, got 0"),
    (["--set", "fedrod.local_epochs=-1"], "fedrod.local_epochs must be >= 1, got -1"),
    (["--set", "fedeq.rho=inf"], "fedeq.rho must be a finite number > 0, got inf"),
    (["--set", "fedeq.tol=0"], "fedeq.tol must be > 0, got 0.0"),
    (["--set", "fedeq.b_tol=-1e-3"], "fedeq.b_tol must be > 0, got -0.001"),
    (["--set", "fedeq.max_iter=0"], "fedeq.max_iter must be >= 1, got 0"),
    (["--set", "fedeq.b_max_iter=0"], "fedeq.b_max_iter must be >= 1, got 0"),
    (["--set", "fedeq.dual_init=nan"], "fedeq.dual_init must be a finite number, got nan"),
    (["--set", "fedeq.personal_epochs=2.5"], "fedeq.personal_epochs expects int, got '2.5'"),
    (["--set", "fedeq.shared_epochs=-1"], "fedeq.shared_epochs must be >= 0, got -1"),
    (["--set", "pfedme.beta=inf"], "pfedme.beta must be in (0, 2], got inf"),
    (["--set", "pfedme.eta=-0.1"], "pfedme.eta must be > 0, got -0.1"),
    (["--set", "pfedme.lam=0"], "pfedme.lam must be > 0, got 0.0"),
    (["--set", "pfedme.personal_lr=nan"], "pfedme.personal_lr must be a finite number > 0, got nan"),
    (["--set", "pfedme.mu=-inf"], "pfedme.mu must be a finite number >= 0, got -inf"),
    (["--set", "pfedme.K=0"], "pfedme.K must be >= 1, got 0"),
    (["--set", "knnper.mix=1.5"], "knnper.mix must be in [0, 1], got 1.5"),
    (["--set", "knnper.k=0"], "knnper.k must be >= 1, got 0"),
    (["--set", "knnper.temperature=0"], "knnper.temperature must be > 0, got 0.0"),
    (["--set", "knnper.scale=inf"], "knnper.scale must be a finite number > 0, got inf"),
    (["--set", "apfl.alpha=nan"], "apfl.alpha must be in [0, 1], got nan"),
    (["--set", "apfl.alpha_lr=-inf"], "apfl.alpha_lr must be a finite number > 0, got -inf"),
    (["--set", "ditto.lam=-1"], "ditto.lam must be >= 0, got -1.0"),
    (["--set", "ditto.personal_epochs=-1"], "ditto.personal_epochs must be >= 0, got -1"),
    (["--set", "fedprox.mu=inf"], "fedprox.mu must be a finite number >= 0, got inf"),
    (["--set", "fedavg_ft.switch_round=0"], "fedavg_ft.switch_round must be >= 1, got 0"),
    (["--set", "fedavg_ft.finetune_epochs=-1"], "fedavg_ft.finetune_epochs must be >= 0, got -1"),
    (["--set", "fedbabu.finetune_epochs=-1"], "fedbabu.finetune_epochs must be >= 0, got -1"),
    (["--set", "lg_fedavg.global_layers=0"], "lg_fedavg.global_layers must be >= 1, got 0"),
    (["--set", "fedrep.head_epochs=-1"], "fedrep.head_epochs must be >= 0, got -1"),
    (["--set", "fedper.unseen_head_epochs=-1"], "fedper.unseen_head_epochs must be >= 0, got -1"),
    # --set dataset keys
    (["--set", "synthetic.alpha=nan"], "synthetic.alpha must be a finite number >= 0, got nan"),
    (["--set", "synthetic.beta=-1"], "synthetic.beta must be >= 0, got -1.0"),
    (["--set", "synthetic.train_frac=1"], "synthetic.train_frac must be in (0, 1), got 1.0"),
    (["--set", "femnist.train_frac=inf"], "femnist.train_frac must be in (0, 1), got inf"),
    (["--set", "shakespeare.min_samples=1"], "shakespeare.min_samples must be >= 2, got 1"),
    (["--set", "shakespeare.max_samples_per_client=-1"], "shakespeare.max_samples_per_client must be >= 0, got -1"),
]


@pytest.mark.parametrize("argv, line", BAD_NUMBERS, ids=[" ".join(a) for a, _ in BAD_NUMBERS])
def test_a_bad_number_at_any_level_is_one_line_exit_2(argv, line, tmp_path, capsys):
    code, err = bench_run_in_process(argv, tmp_path, capsys)
    assert (code, err) == (2, [f"error: {line}"])
    assert not (tmp_path / "mlflow.db").exists()  # rejected before anything was recorded


BAD_PRESETS = [
    ("[run]\nlr = inf\n", "run.lr must be a finite number > 0, got inf"),  # TOML's own inf and nan literals
    ("[run]\nlr = -inf\n", "run.lr must be a finite number > 0, got -inf"),
    ("[run]\nfraction = nan\n", "run.fraction must be in (0, 1], got nan"),
    ("[run]\nlr = 1" + "0" * 400 + "\n", "run.lr must be a finite number > 0, got inf"),  # an int past float's range
    ("[run]\nrounds = 2.5\n", "run.rounds expects int, got 2.5"),
    ("[run]\ncheckpoint_every = true\n", "run.checkpoint_every expects int, got True"),
    ("[run]\nseeds = [0, -1]\n", "run.seeds must be integers in [0, 4294967295], got -1"),
    ("[fedavg]\nlr = nan\n", "fedavg.lr must be a finite number > 0, got nan"),
    ("[fedeq]\nrho = +inf\n", "fedeq.rho must be a finite number > 0, got inf"),
    ("fedeq.tol = -nan\n", "fedeq.tol must be a finite number > 0, got nan"),  # a dotted key is a table too
    ("[fedeq]\nmax_iter = 2.5\n", "fedeq.max_iter expects int, got 2.5"),
    ("[pfedme]\nbeta = 1e400\n", "pfedme.beta must be in (0, 2], got inf"),
    ("[synthetic]\nalpha = -0.5\n", "synthetic.alpha must be >= 0, got -0.5"),
]


@pytest.mark.parametrize("text, line", BAD_PRESETS, ids=[t.strip() for t, _ in BAD_PRESETS])
def test_a_bad_number_in_a_preset_is_one_line_exit_2(text, line, tmp_path, capsys):
    preset = tmp_path / "p.toml"
    preset.write_text(text)
    code, err = bench_run_in_process(["--config", str(preset)], tmp_path, capsys)
    assert (code, err) == (2, [f"error: {line}"])
    assert not (tmp_path / "mlflow.db").exists()


def test_a_tuned_preset_with_a_bad_number_is_refused_and_a_good_one_loads(tmp_path, capsys):
    # Laid out as bench.tuning.presets.write writes configs/tuned/<dataset>.toml (tomli-w writes a
    # float's repr, so a diverged study's inf lands in the file as TOML's `inf`).
    tuned = tmp_path / "tuned" / "synthetic.toml"
    tuned.parent.mkdir()
    head = "# Best values of Optuna sweeps\n\n[run]\nmethods = [\"fedeq\"]\ndataset = \"synthetic\"\n\n[fedeq]\n"
    tuned.write_text(head + "lr = 0.03\nrho = inf\n")
    code, err = bench_run_in_process(["--config", str(tuned)], tmp_path, capsys)
    assert (code, err) == (2, ["error: fedeq.rho must be a finite number > 0, got inf"])
    tuned.write_text(head + "lr = 0.03\nrho = 0.5\n")
    cfg = C.apply(C.default_config(), C.load_toml(str(tuned)))
    assert cfg.methods["fedeq"].rho == 0.5 and cfg.methods["fedeq"].lr == 0.03


def test_validate_checks_a_config_built_in_code():
    """A library caller (a sweep, a notebook) that replaces fields directly meets the same rule."""
    from bench.experiment import validate

    cfg = C.default_config()
    bad_run = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, lr=float("inf")))
    with pytest.raises(BenchError, match=r"^lr must be a finite number > 0, got inf$"):
        validate(bad_run)
    methods = {**cfg.methods, "fedavg": dataclasses.replace(cfg.methods["fedavg"], lr=float("nan"))}
    with pytest.raises(BenchError, match=r"^fedavg.lr must be a finite number > 0, got nan$"):
        validate(dataclasses.replace(cfg, methods=methods))
    datasets = {**cfg.datasets, "synthetic": dataclasses.replace(cfg.datasets["synthetic"], alpha=-1.0)}
    with pytest.raises(BenchError, match=r"^synthetic.alpha must be >= 0, got -1.0$"):
        validate(dataclasses.replace(cfg, datasets=datasets))
    with pytest.raises(BenchError, match=r"^rounds must be an integer >= 1, got 2.5$"):  # a float in an int field
        validate(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, rounds=2.5)))
    with pytest.raises(BenchError, match=r"^seeds is empty"):  # validate's non-range checks stay
        validate(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seeds=())))


def test_values_on_the_edges_of_their_ranges_are_accepted():
    cfg = C.apply(C.default_config(), {
        "fraction": "1", "val_frac": "0", "frac_unseen": "0", "local_epochs": "1", "checkpoint_every": "0",
        "state_budget_gb": "0", "cpus_per_client": "0.5", "lr": "1e-300", "seeds": "0",
        "fedeq.dual_init": "-0.5", "pfedme.beta": "2", "knnper.mix": "0", "apfl.alpha": "1", "fedprox.mu": "0",
        "synthetic.alpha": "0", "shakespeare.max_samples_per_client": "0",
    })
    C.check_config(cfg)
    assert (cfg.run.fraction, cfg.methods["pfedme"].beta, cfg.methods["fedeq"].dual_init) == (1.0, 2.0, -0.5)
