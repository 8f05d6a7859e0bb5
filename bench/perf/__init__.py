"""The harness's own benchmarks: `python -m bench.perf` (__main__.py) times the round loop against a
plain PyTorch loop, whole processes (`--whole`), FeDEQ's local update (`--method fedeq`) and the
round time and memory against the number of clients (`--scale`, scale.py) and the FeDEQ paper's bytes
and memory claims on its presets (`--bytes-claim`, `--memory-claim`, claims.py); workloads.py holds the
other workloads. It may import bench.experiment and everything below it, never a command line or
bench.tuning (tests/unit/test_layers.py). Timing targets live here, never in unit tests.
"""
