"""bench/loop/actor.py: the actor pool bench.run starts from its flags before loading torch and the config.

When it starts, and that `compare` adopts it when the config asks for the same pool and stops it
(before starting the right one) when not; both give the same numbers as the serial backend.
"""
import sys

import pytest
import ray

from bench import cli, experiment
from bench import run as bench_run
from bench.loop import actor as A
from bench.loop.early_pool import early_pool
from tests.helpers import tiny_config, write_tiny_npz


def flags(argv):
    parser, keys = bench_run.build_parser()
    args = parser.parse_args(argv)
    return args.config, cli.config_flags(args, keys), args.set


@pytest.mark.parametrize("argv", [
    ["--backend", "serial"],                      # no Ray to start
    ["--set", "rounds=3"],                        # --set could name a pool key: the config decides
    ["--config", "configs/default.toml"],         # so could a preset
    ["--workers", "0"],                           # refused by the config's own check: it says so, later
    ["--lr", "inf"],
])
def test_no_early_pool_when_the_flags_alone_do_not_settle_it(argv):
    assert early_pool(*flags(argv)) is None


def test_the_flags_are_read_without_importing_torch(tmp_path):
    import subprocess

    code = ("import sys; from bench import run as R, cli, config as C; from bench.loop import actor as A; import bench.loop.early_pool\n"
            "p, k = R.build_parser(); a = p.parse_args(['--workers', '2', '--cpus-per-client', '0.5'])\n"
            "run = C.apply(C.Config(run=C.RunConfig(**C.env_defaults())), "
            "{n: v for n, v in cli.config_flags(a, k).items() if v is not None}).run\n"
            "print(A.pool_keys(run)); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == str({"backend": "ray", "address": None, "workers": 2, "cpus_per_client": 0.5,
                          "gpus_per_client": 0.0, "device": None})
    assert out[1] == "False"


@pytest.mark.ray
def test_compare_adopts_a_matching_pool_and_replaces_another(tmp_path):
    path = write_tiny_npz(tmp_path / "tiny.npz", clients=5)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    serial, _ = experiment.compare(experiment.validate(tiny_config(path, methods="fedavg", rounds=2, backend="serial",
                                                                  tracking_uri=uri)), quiet=True)
    cfg = experiment.validate(tiny_config(path, methods="fedavg", rounds=2, backend="ray", workers=2, tracking_uri=uri))

    adopted = early_pool(*flags(["--workers", "2"]))
    assert adopted.keys == A.pool_keys(cfg.run)
    same, _ = experiment.compare(cfg, quiet=True, early=adopted)
    assert adopted._taken  # compare took its pool (and closed it with the backend)

    other = early_pool(*flags(["--workers", "1"]))  # not what cfg asks for
    replaced, _ = experiment.compare(cfg, quiet=True, early=other)
    assert other._taken  # discarded: stopped before compare started the pool cfg asks for
    assert not ray.is_initialized()
    for rows in (same, replaced):  # summary Stats: the mean over the one seed, bit for bit
        for key in ("acc/mean", "acc/weighted", "mb_up", "mb_down"):
            assert [r[key].mean for r in rows] == [r[key].mean for r in serial], key
