"""A study's HTML report in headless Chromium (as tests/integration/test_report_browser.py opens a
comparison's): a real two-trial study whose trial 1 is pruned, with Optuna's figures logged. Every
plotly figure is drawn, the pruned trial's curve among them and dashed, the best trial's rerun drawn by
test accuracy; Optuna's PNGs load from the page itself; nothing is requested, nothing is wider than
the 1280 px viewport. Skipped without a browser, as that file's tests are."""
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.integration.test_report_browser import need_browser, opened


class PruneTrialOne(optuna.pruners.BasePruner):
    """Prunes trial 1 at its first report, no other: one pruned trial whatever the values."""

    def prune(self, study, trial):
        return trial.number == 1


def test_a_sweep_report_draws_every_trial_and_optuna_s_figures_in_chromium(tmp_path):
    need_browser()
    pytest.importorskip("matplotlib")  # Optuna's figures are drawn with it
    from bench import config as C
    from bench import experiment, report
    from bench.tuning import study

    (tmp_path / "space.toml").write_text("fedavg.lr = {low = 0.01, high = 0.3, log = true}\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(tracking_uri=uri).create_experiment("sweep-test", artifact_location=str(tmp_path / "artifacts"))
    cfg = experiment.validate(C.apply(C.default_config(), {
        "methods": "fedavg", "dataset": "synthetic", "clients": 6, "rounds": 2, "backend": "serial", "seeds": "0",
        "tracking_uri": uri, "experiment": "sweep-test"}))
    opts = study.SweepOptions(trials=2, space=str(tmp_path / "space.toml"), pruner=PruneTrialOne(),
                              storage=f"sqlite:///{tmp_path}/optuna.db", tuned_out=str(tmp_path / "tuned.toml"))
    (outcome,), _ = study.sweep(cfg, opts)
    paths = report.build(uri, "sweep-test", sweep=outcome.study_name, out=str(tmp_path / "report"))

    index = Path(paths.html)
    with opened(index) as (page, errors, requests):
        page.wait_for_function(
            "() => Array.from(document.querySelectorAll('div.plot')).every("
            "d => d.querySelector('.main-svg') && d.querySelector('g.trace'))", timeout=30_000)
        traces = page.evaluate(
            "() => Object.fromEntries(Array.from(document.querySelectorAll('div.plot')).map(d => [d.id, "
            "d.data.filter(t => t.showlegend !== false).map(t => [t.name, t.line ? t.line.dash : null])]))")
        images = page.evaluate(
            "() => Array.from(document.querySelectorAll('figure img')).map(i => [i.alt, i.naturalWidth])")
        text = page.evaluate("() => document.body.innerText")
        wide = page.evaluate("() => Array.from(document.querySelectorAll('body *')).filter("
                             "e => e.getBoundingClientRect().right > window.innerWidth + 0.5).map(e => e.tagName)")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)  # for a look after a failure

    assert errors == []
    assert set(requests) == {index.as_uri()}
    best = "best (trial 0) on test"  # the one completed trial
    assert dict(traces["s0-acc_vs_round"]) == {"trial 0": "solid", "trial 1 (pruned)": "dash",
                                               f"{best}: acc/weighted": "solid", f"{best}: acc/mean": "dash"}
    # Optuna's history and slice, drawn from the page's own data: URIs; one completed trial: no importances.
    assert [alt for alt, width in images if width > 0] == [
        "Optuna: acc/val (validation) of each completed trial and the best so far",
        "Optuna: acc/val against each swept value, one point per completed trial"]
    assert "left out: the study has 1 completed trial(s), and importances need at least 5" in text
    assert wide == []

