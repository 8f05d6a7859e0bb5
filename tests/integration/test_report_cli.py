"""`python -m bench.report` as a user runs it (subprocess) on real MLflow stores: the numbers in
report.md read back and compared with MLflow's, bad input as one line and exit 2, a sweep's report."""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_report(args, cwd, timeout=180):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    return subprocess.run([sys.executable, "-m", "bench.report", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def markdown_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """{title: rows as {column: cell text}} of every table in report.md (a `**title**` line, a blank
    line, then `| ... |` lines); bold (a best value) stripped."""
    out, lines = {}, text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("**") and line.endswith("**") and i + 2 < len(lines) and lines[i + 2].startswith("| "):
            split = lambda row: [c.strip().strip("*") for c in re.split(r"(?<!\\)\|", row)[1:-1]]  # noqa: E731
            head, body = split(lines[i + 2]), []
            for row in lines[i + 4:]:
                if not row.startswith("| "):
                    break
                body.append(dict(zip(head, split(row), strict=True)))
            out[line.strip("*")] = body
    return out


def mean_of(cell: str) -> float:
    return float(cell.split(" ± ")[0])


def test_report_md_holds_the_mlflow_numbers(report_store, tmp_path):
    out = tmp_path / "out"
    proc = bench_report(["--experiment", "report-test", "--tracking-uri", report_store["uri"], "--out", str(out)],
                        tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [f"report: {out}/index.html", f"markdown: {out}/report.md"]
    text = (out / "report.md").read_text()
    found = markdown_tables(text)
    rows: dict[str, dict[str, str]] = {}
    for part, columns in (("accuracy", ["method", "model", "seeds", "acc/weighted last-k", "acc/weighted final",
                                        "acc/weighted best round", "acc/mean", "acc/bottom10", "acc/unseen"]),
                          ("communication", ["method", "MB up/round", "MB down/round", "MB up", "MB down",
                                             "MB total", "MB to target", "bytes vs FeDEQ"]),
                          ("cost", ["method", "peak train MB", "memory vs FeDEQ", "GFLOP/update", "FLOPs vs FeDEQ",
                                    "params shared", "params personal", "wall s"])):
        (title,) = [t for t in found if t.endswith(f": {part}")]
        assert [r["method"] for r in found[title]] == ["fedeq", "fedavg", "fedrep"]
        assert list(found[title][0]) == columns
        for r in found[title]:
            rows.setdefault(r["method"], {}).update(r)
    assert "**At a glance.** Accuracy is acc/weighted, the mean of the last 1 evaluated round" in text

    client = MlflowClient(tracking_uri=report_store["uri"])
    exp = client.get_experiment_by_name("report-test")
    children = [r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get("mlflow.parentRunId") == report_store["parent"]]
    for method, row in rows.items():
        runs = [r for r in children if r.data.params["method"] == method]
        assert len(runs) == 2
        for col in ("acc/weighted final", "acc/mean", "acc/bottom10", "acc/unseen"):
            metric = col.removesuffix(" final")
            want = statistics.mean(r.data.metrics[metric] for r in runs)
            assert mean_of(row[col]) == pytest.approx(want, abs=5e-5), (method, col)  # 4 decimals
            assert row[col].endswith(f" ± {statistics.stdev(r.data.metrics[metric] for r in runs):.4f}")
        mb = statistics.mean(r.data.metrics["bytes/cumulative"] for r in runs) / 1e6
        assert mean_of(row["MB total"]) == pytest.approx(mb, rel=5e-4)  # 4 significant digits at least
        history = lambda r, k: [m.value for m in client.get_metric_history(r.info.run_id, k)]  # noqa: E731
        for col, metric, reduce in (("MB up", "bytes/up", sum), ("MB down", "bytes/down", sum),
                                    ("peak train MB", "mem/peak_train_bytes", max)):
            want = statistics.mean(reduce(history(r, metric)) for r in runs) / 1e6
            assert mean_of(row[col]) == pytest.approx(want, rel=5e-4), (method, col)
        assert row["params shared"] == runs[0].data.params["params/shared"]
    # Every figure the report names is an SVG file beside it.
    figures = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.svg)\)", text)
    assert figures and all((out / f).read_text().lstrip().startswith(("<?xml", "<svg")) for f in figures)
    assert (out / "index.html").stat().st_size > 0
    # Every run, with the command that reruns it.
    (runs_title,) = [t for t in found if t.endswith(": every run")]
    assert {(r["method"], r["seed"], r["status"]) for r in found[runs_title]} == {
        (m, s, "FINISHED") for m in ("fedeq", "fedavg", "fedrep") for s in ("0", "1")}
    # The recorded command less its --methods and --seeds, then the run's own, each flag once, with
    # `python` as the interpreter's path (tests/unit/test_commands.py has the path rules).
    rest = " ".join(w for w in report_store["command"].split()[3:] if w not in ("--methods", "fedeq,fedavg,fedrep",
                                                                                 "--seeds", "0,1"))
    rerun = re.search(r"(\S*python\S*) -m bench\.run (.*?) --methods fedrep --seeds 1\b", text)
    assert rerun and rerun.group(2) == rest, (rest, rerun and rerun.group(0))
    assert os.path.samefile(rerun.group(1), sys.executable)


def test_unknown_experiment_is_one_line_and_exit_2(report_store, tmp_path):
    proc = bench_report(["--experiment", "nope", "--tracking-uri", report_store["uri"]], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: unknown MLflow experiment 'nope' in {report_store['uri']}; experiments there: Default, report-test"]
    assert not (tmp_path / "reports").exists()


def test_an_experiment_with_no_runs_is_one_line_and_exit_2(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(tracking_uri=uri).create_experiment("empty", artifact_location=str(tmp_path / "artifacts"))
    proc = bench_report(["--experiment", "empty", "--tracking-uri", uri], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: experiment 'empty' in {uri} has no comparison runs (tag kind=comparison, written by "
        f"python -m bench.run); it has no runs"]


def test_a_sweep_report_lists_its_trials(tmp_path):
    from bench import config as C
    from bench import experiment, report
    from bench.tuning import study

    (tmp_path / "space.toml").write_text("fedavg.lr = {low = 0.01, high = 0.3, log = true}\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("sweep-test", artifact_location=str(tmp_path / "artifacts"))  # not the cwd's mlruns/
    cfg = experiment.validate(C.apply(C.default_config(), {
        "methods": "fedavg", "dataset": "synthetic", "clients": 6, "rounds": 2, "backend": "serial", "seeds": "0",
        "tracking_uri": uri, "experiment": "sweep-test"}))
    opts = study.SweepOptions(trials=2, space=str(tmp_path / "space.toml"), pruner="none",
                              storage=f"sqlite:///{tmp_path}/optuna.db", tuned_out=str(tmp_path / "tuned.toml"))
    (outcome,), _ = study.sweep(cfg, opts, command="python -m bench.sweep --method fedavg --trials 2")

    out = tmp_path / "sweep-report"
    proc = bench_report(["--sweep", outcome.study_name, "--experiment", "sweep-test", "--tracking-uri", uri,
                         "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""  # no progress bars, no log lines
    found = markdown_tables((out / "report.md").read_text())
    (trials,) = [rows for t, rows in found.items() if t.endswith(": trials")]
    exp = client.get_experiment_by_name("sweep-test")
    by_number = {r.data.params["trial_number"]: r for r in client.search_runs([exp.experiment_id], "tags.kind = 'trial'")}
    assert [r["trial"] for r in trials] == ["0", "1"]
    for row in trials:
        run = by_number[row["trial"]]
        # Swept values at 4 significant digits (MLflow holds str() of the float, 17 digits).
        assert row["state"] == "FINISHED" and row["fedavg.lr"] == f"{float(run.data.params['trial.fedavg.lr']):#.4g}"
        assert float(row["acc/val"]) == pytest.approx(run.data.metrics["acc/val"], abs=5e-5)
    (best,) = [rows for t, rows in found.items() if t.endswith(": best values")]
    assert list(best[0])[-3:] == ["acc/val", "test acc/weighted", "test acc/mean"]  # the headline first
    # The best trial, as the parent run recorded it; its acc/val is the highest (two trials may tie).
    assert best[0]["best trial"] == client.get_run(outcome.parent_run_id).data.params["best.trial_number"]
    top = max(r.data.metrics["acc/val"] for r in by_number.values())
    assert by_number[best[0]["best trial"]].data.metrics["acc/val"] == top
    assert float(best[0]["acc/val"]) == pytest.approx(top, abs=5e-5)
    assert float(best[0]["test acc/mean"]) == pytest.approx(outcome.test_acc, abs=5e-5)
    assert float(best[0]["test acc/weighted"]) == pytest.approx(outcome.test_weighted, abs=5e-5)
    assert (out / "index.html").exists()
    # Its accuracy figure draws every trial by acc/val and the best trial's rerun by test accuracy.
    (svg,) = (out / "figures").glob("*acc_vs_round.svg")
    best_label = f"best (trial {best[0]['best trial']}) on test"
    for label in ("trial 0", "trial 1", f"{best_label}: acc/weighted", f"{best_label}: acc/mean"):
        assert label in svg.read_text()
    # Optuna's figures, as the sweep logged them on the parent run; two completed trials: no importances.
    text = (out / "report.md").read_text()
    for name in ("optimization_history", "slice"):
        (png,) = (out / "figures").glob(f"*-{name}.png")
        assert png.read_bytes()[:4] == b"\x89PNG" and f"(figures/{png.name})" in text
    assert not list((out / "figures").glob("*param_importances*"))
    assert "left out: the study has 2 completed trial(s), and importances need at least 5" in text

    # Logged on the study's parent run, the report is one click away in the MLflow UI.
    report.log_artifacts(report.ReportPaths(str(out), str(out / "index.html"), str(out / "report.md")), client,
                         outcome.parent_run_id)
    logged = client.list_artifacts(outcome.parent_run_id, "report")
    assert sorted(f.path for f in logged) == ["report/figures", "report/index.html", "report/report.md"]
    figures = client.list_artifacts(outcome.parent_run_id, "report/figures")
    assert sorted(os.path.basename(f.path) for f in figures) == sorted(os.listdir(out / "figures"))


def test_unknown_study_lists_the_studies_there(report_store, tmp_path):
    proc = bench_report(["--sweep", "nope", "--experiment", "report-test", "--tracking-uri", report_store["uri"]],
                        tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: unknown study 'nope' in experiment 'report-test'")
