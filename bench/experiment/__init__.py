"""The library every command uses: check a config, load its data, run a method x seed inside its
MLflow run, summarize over seeds, and compare methods the way `python -m bench.run` does.

The command lines (`bench.run`, `bench.data`, `bench.sweep`) only parse arguments and call one
function here; a sweep or a test calls the same functions, so there is one way to run an experiment.

    cfg = experiment.validate(config.from_cli(None, {"methods": "fedavg,fedrep"}, []))
    rows, parent_run_id = experiment.compare(cfg, command="python -m bench.run --methods fedavg,fedrep")
    print(experiment.format_table(rows))

One module per job: load.py (validate and load), sizing.py (the memory estimate a run is refused
by), summary.py (rows and the terminal table), runs.py (run and compare), resume.py (--resume).
This package re-exports the functions the commands call. It may import bench.loop, bench.report,
bench.tracking, bench.config and bench.cli, never bench.tuning or bench.perf (tests/unit/test_layers.py).
"""
from bench.experiment.load import check_models, describe_data, load_checked, load_dataset, make_backend, validate
from bench.experiment.resume import RESUME_KEYS, recorded_config
from bench.experiment.runs import Progress, compare, recorded_line, report, report_command, run_one
from bench.experiment.summary import format_table, summarize

__all__ = ["RESUME_KEYS", "Progress", "check_models", "compare", "describe_data", "format_table", "load_checked", "load_dataset",
           "make_backend", "recorded_config", "recorded_line", "report", "report_command", "run_one", "summarize", "validate"]
