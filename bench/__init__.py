"""fedeq-bench's harness: everything that runs, measures, records and reports experiments; nothing
method-specific (methods and datasets are the library, `fedeq_bench.methods` and `.datasets`).

Sub-packages by concern, each importing only the levels below it (tests/unit/test_layers.py):

    run.py, sweep.py, data.py, __main__.py   command lines: parse arguments, call one function
    tuning/       Optuna studies over the library (objectives, storage, presets, search spaces)
    perf/         the harness's own benchmarks (`python -m bench.perf`)
    experiment/   the library every command uses: validate, load, run and compare, summaries, resume
    report/       comparison reports read from MLflow with its client (no torch, no engine)
    loop/         the round loop and its machinery: engine, backends, actors, wire, memory, ...
    tracking/     MLflow: the run lifecycle, store checks, provenance
    config.py     the run/method/dataset config dataclasses, presets, --set
    cli.py        command-line plumbing: flags from dataclasses, one-line errors, exit codes, signals
    quick_exit.py a command's exit without the interpreter's teardown (its measured gain in its doc)

docs/architecture.md is the design these follow.
"""
import os as _os

CHECKOUT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
"""The folder holding `bench/`: the checkout's root, where configs/ lives (site-packages when
installed from a wheel, which ships no configs/)."""
