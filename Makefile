# Two entry points (README quick start): `make run` and `make test`. Both create .venv first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
METHODS ?= fedeq,fedrep
ARGS ?=

.PHONY: setup run test perf bench clean

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

test: setup
	$(BIN)/python -m pytest -q tests $(ARGS)

perf: setup
	$(BIN)/python -m bench.perf $(ARGS)

# pytest-benchmark over the hot paths (tests/perf); saves each run under .benchmarks/ and compares
# with the last saved one (README: "Benchmarks"). Not part of `make test`.
bench: setup
	$(BIN)/python -m pytest tests/perf --benchmark-only --benchmark-autosave --benchmark-compare \
		--benchmark-columns=min,median,mean,stddev,rounds --benchmark-sort=name $(ARGS)

clean:
	rm -rf $(VENV) mlflow.db mlruns .pytest_cache .benchmarks build *.egg-info
