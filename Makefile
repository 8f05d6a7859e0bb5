# Two entry points (README quick start): `make run` and `make test`. Both create .venv first.
# `make lint` is the lint and type check alone (part of `make test`).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
METHODS ?= fedeq,fedrep
ARGS ?=

.PHONY: setup run lint test perf bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: this version resolves to the CPU wheel; a looser spec pulls CUDA (GBs).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/python -m bench.run --methods $(METHODS) $(ARGS)

# ruff (pyflakes, isort, pyupgrade, bugbear: pyproject.toml) over everything, then mypy (mypy.ini) over
# the library and the harness. mypy cannot follow pyproject's package-dir mapping (core/ is
# fedeq_bench.core), so it reads a tree of links laid out as the wheel installs the packages.
TYPES := build/types
lint: setup
	$(BIN)/ruff check .
	rm -rf $(TYPES) && mkdir -p $(TYPES)/fedeq_bench && cp fedeq_bench/__init__.py $(TYPES)/fedeq_bench/
	for d in core methods datasets; do ln -s ../../../$$d $(TYPES)/fedeq_bench/$$d; done
	ln -s ../../bench $(TYPES)/bench
	cd $(TYPES) && ../../$(BIN)/mypy -p fedeq_bench.core -p fedeq_bench.methods -p fedeq_bench.datasets -p bench

# The README's test command (CI's .ci/run calls it): lint and types first, then every test.
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder tests $(ARGS)

perf: setup
	$(BIN)/python -m bench.perf $(ARGS)

# pytest-benchmark over the hot paths (tests/perf); saves each run under .benchmarks/ and compares
# with the last saved one (README: "Benchmarks"). Not part of `make test`.
bench: setup
	$(BIN)/python -m pytest tests/perf --benchmark-only --benchmark-autosave --benchmark-compare \
		--benchmark-columns=min,median,mean,stddev,rounds --benchmark-sort=name $(ARGS)

clean:
	rm -rf $(VENV) mlflow.db mlruns .pytest_cache .benchmarks build *.egg-info
