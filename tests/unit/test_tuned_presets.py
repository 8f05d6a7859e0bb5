"""bench/tuning/presets.py: the tuned preset a sweep writes is TOML that `bench.run --config` loads,
an existing preset is updated (other methods' tables kept), and a file that is not a tuned preset is
refused with one line, never overwritten."""
import os
from dataclasses import dataclass, field

import pytest

from bench import config as C
from bench.tuning import presets
from fedeq_bench.core.errors import BenchError


@dataclass
class Outcome:  # the fields of study.StudyOutcome that presets reads
    method: str
    best_params: dict
    objectives: tuple = ("acc",)
    extra: dict = field(default_factory=dict)


def cfg(dataset="synthetic"):
    return C.apply(C.default_config(), {"dataset": dataset, "rounds": 3, "seeds": "0,1"})


def test_written_preset_loads_with_the_best_values_and_a_second_sweep_keeps_the_first(tmp_path):
    path = str(tmp_path / "tuned" / "synthetic.toml")
    assert presets.write(cfg(), [Outcome("fedeq", {"fedeq.rho": 0.05, "fedeq.max_iter": 12})], path) == path
    presets.write(cfg(), [Outcome("fedrep", {"fedrep.lr": 0.02})], path)
    loaded = C.apply(C.default_config(), C.load_toml(path))
    assert loaded.methods["fedeq"].rho == 0.05 and loaded.methods["fedeq"].max_iter == 12  # kept
    assert loaded.methods["fedrep"].lr == 0.02
    assert loaded.run.methods == ("fedeq", "fedrep") and loaded.run.dataset == "synthetic"
    with open(path) as f:
        assert f.readline().startswith(presets.HEADER)


def test_a_diverged_value_is_written_as_toml_inf_and_loading_it_is_refused(tmp_path):
    path = str(tmp_path / "t.toml")
    presets.write(cfg(), [Outcome("fedeq", {"fedeq.rho": float("inf")})], path)
    assert "rho = inf" in open(path).read()
    with pytest.raises(BenchError, match=r"^fedeq.rho must be a finite number > 0, got inf$"):
        C.check_config(C.apply(C.default_config(), C.load_toml(path)))


def test_nothing_to_write_writes_nothing(tmp_path):
    path = tmp_path / "t.toml"
    assert presets.write(cfg(), [Outcome("fedeq", {})], str(path)) is None
    assert not path.exists()


@pytest.mark.parametrize("content", ["[run]\nrounds = 5\n", "# Best values of Optuna sweeps (python -m bench.sweep)\n[run\n",
                                     b"\xff\xfe not text"])
def test_a_file_that_is_not_a_tuned_preset_is_refused_before_the_work_and_kept(tmp_path, content):
    path = tmp_path / "mine.toml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = path.read_bytes()
    with pytest.raises(BenchError, match=r"^--tuned-out '.*mine.toml' exists and is not a tuned preset"):
        presets.check_out(str(path))
    with pytest.raises(BenchError):
        presets.write(cfg(), [Outcome("fedeq", {"fedeq.rho": 0.1})], str(path))
    assert path.read_bytes() == before


def test_a_folder_or_a_symlink_at_the_path_is_refused(tmp_path):
    (tmp_path / "d.toml").mkdir()
    with pytest.raises(BenchError, match=", not a regular file; remove it"):
        presets.check_out(str(tmp_path / "d.toml"))
    target = tmp_path / "elsewhere.toml"
    presets.write(cfg(), [Outcome("fedeq", {"fedeq.rho": 0.1})], str(target))
    os.symlink(target, tmp_path / "link.toml")
    with pytest.raises(BenchError, match=", not a regular file; remove it"):
        presets.check_out(str(tmp_path / "link.toml"))


def test_default_path_is_the_dataset_name_made_safe():
    assert presets.default_path("synthetic") == os.path.join("configs", "tuned", "synthetic.toml")
    assert presets.default_path("npz:/data/my split.npz") == os.path.join("configs", "tuned", "my_split.npz.toml")
