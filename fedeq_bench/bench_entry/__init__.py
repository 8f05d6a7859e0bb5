"""The installed top-level `bench` package: `python -m bench.run` outside a checkout.

pyproject.toml installs this one file as `bench`; it makes `bench` the harness package itself
(`fedeq_bench.bench`), so `bench.run`, `bench.sweep`, ... are found in the harness's folder. In a
checkout the folder `bench/` is found first (the current directory leads sys.path) and this file is
not used.
"""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("fedeq_bench.bench")
