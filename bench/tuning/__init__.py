"""Optuna sweeps over the experiment library: study.py (one study per method, `sweep`), objectives.py
(what a trial is scored by, on validation only), storage.py (Optuna's storage, pruners, running
trials to a budget, failing what a dead process left), pareto.py (a multi-objective front and the
study's figures), presets.py (the tuned preset `bench.run --config` loads) and spaces.py (search
spaces as data, configs/sweeps/). It may import bench.experiment and everything below it, never a
command line or bench.perf (tests/unit/test_layers.py).
"""
