"""bench/report/sweep.py on a hand-built study: trials are shown by validation accuracy and the best
trial's rerun by test accuracy, each labelled; every trial's curve is drawn, the unfinished dashed;
swept values have 4 significant digits; Optuna's figures are shown as logged, importances only from
MIN_IMPORTANCE_TRIALS completed trials. Expected numbers are the arithmetic on the histories below."""
import base64

import pytest

from bench.report import figures as F
from bench.report import sweep as S
from bench.report.model import Group, Image, Provenance, ReportData, RunRecord

LR = "0.0646642271741456"  # as MLflow holds a swept float: str() of the value, 17 digits


def run(method, seed, history, status="FINISHED", number="0", lr=LR, clients=None):
    """A child run with `history` {metric: [values of rounds 1, 2, ...]}; a trial's params as the sweep logs them."""
    params = {"trial_number": number, "trial.fedavg.lr": lr, "trial.fedavg.local_epochs": "3"}
    return RunRecord(run_id=f"{method}-{seed}", parent_id="p", method=method, seed=seed, status=status,
                     dataset="synthetic", partition="6 clients", fingerprint="f", model="mlp", params=params,
                     history={k: [(i + 1, v) for i, v in enumerate(vs)] for k, vs in history.items()},
                     clients=clients)


def client(cid, val, test):
    return {"cid": cid, "group": "train", "test_acc": test, "test_n": 10, "val_acc": val, "val_n": 5}


BEST = "best (trial 0) on test"


def make_study():
    """Trial 0 (seeds 0 and 1), trial 1 pruned at round 1, trial 2 whose seed 1 failed, and trial 0's
    rerun on test: its acc/val equal to trial 0's (the same values and seeds: the curve that used to
    hide trial 0's), its test acc/weighted and acc/mean different."""
    val0, val1 = {"acc/val": [0.2, 0.6], "bytes/cumulative": [1e6, 2e6]}, {"acc/val": [0.4, 0.8],
                                                                            "bytes/cumulative": [1e6, 2e6]}
    runs = [
        run("trial 0", 0, val0, clients=[client(0, 0.25, 0.95)]),
        run("trial 0", 1, val1, clients=[client(0, 0.35, 0.95)]),
        run("trial 1", 0, {"acc/val": [0.1], "bytes/cumulative": [1e6]}, status="PRUNED", number="1", lr="0.0443"),
        run("trial 2", 0, {"acc/val": [0.3, 0.5], "bytes/cumulative": [1e6, 2e6]}, number="2", lr="0.1"),
        run("trial 2", 1, {"acc/val": [0.1], "bytes/cumulative": [1e6]}, status="FAILED", number="2", lr="0.1"),
        run(BEST, 0, {**val0, "acc/weighted": [0.5, 0.9], "acc/mean": [0.45, 0.85]}, clients=[client(0, 0.25, 0.75)]),
        run(BEST, 1, {**val1, "acc/weighted": [0.7, 0.7], "acc/mean": [0.65, 0.65]}, clients=[client(0, 0.35, 0.55)]),
    ]
    return Group("synthetic", "6 clients", runs, seeds=[0, 1], methods=["trial 0", "trial 1", "trial 2", BEST])


PARENT = Provenance("p", "sweep fedavg", "FINISHED", "python -m bench.sweep --method fedavg --trials 3", "abc",
                    {"study": "fedavg-synthetic", "best.fedavg.lr": LR, "best.fedavg.local_epochs": "3",
                     "best.trial_number": "0"}, {}, metrics={"best/value": 0.7, "best/test_acc": 0.75})


def by_name(figs):
    return {f.name: f for f in figs}


def series(fig, label):
    (s,) = [s for s in fig.series if s.label == label]
    return s


# -- figures ------------------------------------------------------------------------------------------


def test_every_trial_is_drawn_by_acc_val_and_the_unfinished_are_dashed():
    fig = by_name(S.sweep_figures(make_study()))["acc_vs_round"]
    assert [s.label for s in fig.series] == ["trial 0", "trial 1 (pruned)", "trial 2 (failed)",
                                             f"{BEST}: acc/weighted", f"{BEST}: acc/mean"]
    assert series(fig, "trial 0").y == pytest.approx([(0.2 + 0.4) / 2, (0.6 + 0.8) / 2])
    assert series(fig, "trial 0").variant == ""
    # A pruned trial's one round, and a failed trial over the rounds all its seeds logged (round 1).
    assert (series(fig, "trial 1 (pruned)").x, series(fig, "trial 1 (pruned)").y) == ([1], [0.1])
    assert series(fig, "trial 2 (failed)").y == pytest.approx([(0.3 + 0.1) / 2])
    plotly = {t["name"]: t for t in F.to_plotly(fig)["data"]}
    assert plotly["trial 1 (pruned)"]["line"]["dash"] == "dash" and plotly["trial 2 (failed)"]["line"]["dash"] == "dash"
    assert plotly["trial 0"]["line"]["dash"] == "solid"


def test_the_rerun_is_drawn_by_test_accuracy_never_by_its_validation_accuracy():
    fig = by_name(S.sweep_figures(make_study()))["acc_vs_round"]
    weighted, mean = series(fig, f"{BEST}: acc/weighted"), series(fig, f"{BEST}: acc/mean")
    assert weighted.y == pytest.approx([(0.5 + 0.7) / 2, (0.9 + 0.7) / 2]) and weighted.variant == ""
    assert mean.y == pytest.approx([(0.45 + 0.65) / 2, (0.85 + 0.65) / 2]) and mean.variant == "acc/mean"
    # Its acc/val equals trial 0's: no series carries it, so trial 0's curve is not hidden under a copy.
    assert [s for s in fig.series if s.y == series(fig, "trial 0").y] == [series(fig, "trial 0")]
    assert "acc/val (trials)" in fig.ylabel and "test" in fig.ylabel
    mb = by_name(S.sweep_figures(make_study()))["acc_vs_mb"]
    assert series(mb, "trial 1 (pruned)").x == [1.0] and series(mb, f"{BEST}: acc/weighted").x == [1.0, 2.0]


def test_per_client_accuracy_is_validation_for_trials_and_test_for_the_rerun():
    fig = by_name(S.sweep_figures(make_study()))["client_acc"]
    assert [s.label for s in fig.series] == ["trial 0", BEST]  # clients.csv of FINISHED runs only
    assert series(fig, "trial 0").y == [0.25, 0.35]  # val_acc (its test_acc column, 0.95, is never shown)
    assert series(fig, BEST).y == [0.75, 0.55]  # test_acc
    assert "validation" in series(fig, "trial 0").hover[0] and "test" in series(fig, BEST).hover[0]


# -- tables -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, shown", [(LR, "0.06466"), ("0.0443", "0.04430"), ("3", "3"), ("1e-05", "1.000e-05"),
                                         ("123456.0", "1.235e+05"), ("bsm", "bsm"), ("True", "True")])
def test_swept_values_have_4_significant_digits(text, shown):
    cell = S.swept(text)
    assert cell.text == shown
    if shown not in ("bsm", "True"):
        assert cell.value == float(text)  # exact behind the cell: the HTML table sorts by it


def test_the_best_values_table_headlines_the_rerun_s_test_acc_weighted():
    best, trials, runs = S.sweep_tables(make_study(), [PARENT])
    assert best.title.endswith(": best values")
    assert best.columns == ["study", "parent run", "best trial", "values", "acc/val", "test acc/weighted",
                            "test acc/mean"]
    (row,) = [[c.text for c in r] for r in best.rows]
    # final acc/weighted 0.9 and 0.7: mean 0.8, sample std sqrt(0.1^2 + 0.1^2) = 0.1414; acc/mean 0.85 and 0.65.
    assert row == ["fedavg-synthetic", "p", "0", "fedavg.local_epochs=3; fedavg.lr=0.06466", "0.7000",
                   "0.8000 ± 0.1414", "0.7500 ± 0.1414"]


def test_the_trials_table_shows_values_at_4_digits_and_where_unfinished_trials_stopped():
    _, trials, _ = S.sweep_tables(make_study(), [PARENT])
    rows = {r[0].text: {c: cell.text for c, cell in zip(trials.columns, r, strict=True)} for r in trials.rows}
    assert list(rows) == ["0", "1", "2"]  # the rerun is not a trial
    assert rows["0"]["fedavg.lr"] == "0.06466" and rows["1"]["fedavg.lr"] == "0.04430"
    assert rows["0"]["fedavg.local_epochs"] == "3"
    assert rows["0"]["acc/val"] == "0.7000 ± 0.1414" and rows["0"]["state"] == "FINISHED"
    assert rows["1"]["acc/val"] == "0.1000 (round 1, PRUNED)" and rows["2"]["state"] == "FAILED"


def test_every_run_shows_acc_val_for_trials_and_test_accuracy_for_the_rerun_each_in_its_column():
    _, _, runs = S.sweep_tables(make_study(), [PARENT])
    assert runs.columns == ["run", "seed", "status", "run id", "acc/val", "test acc/weighted"]
    rows = {(r[0].text, r[1].text): (r[4].text, r[5].text) for r in runs.rows}
    assert rows[("trial 0", "1")] == ("0.8000", "—")
    assert rows[(BEST, "0")] == ("—", "0.9000")  # its acc/val (0.6) is not shown
    assert rows[("trial 1", "0")] == ("—", "—")
    assert any(PARENT.command in n and "resumes the study" in n for n in runs.notes)


# -- Optuna's figures ---------------------------------------------------------------------------------

PNGS = {"optimization_history": b"\x89PNG history", "param_importances": b"\x89PNG importances",
        "slice": b"\x89PNG slice"}


def finished_trials(n):
    runs = [run(f"trial {i}", 0, {"acc/val": [0.5]}, number=str(i)) for i in range(n)]
    runs.append(run(f"trial {n}", 0, {"acc/val": [0.1]}, status="PRUNED", number=str(n)))
    return Group("synthetic", "p", runs, seeds=[0], methods=list(dict.fromkeys(r.method for r in runs)))


def test_importances_are_shown_from_5_completed_trials_and_a_sentence_says_why_not_below():
    assert S.MIN_IMPORTANCE_TRIALS == 5
    below = {i.name: i for i in S.optuna_images(finished_trials(4), PNGS)}  # 4 completed + 1 pruned
    assert list(below) == ["optimization_history", "param_importances", "slice"]
    assert below["optimization_history"].png == PNGS["optimization_history"] and below["slice"].png == PNGS["slice"]
    assert below["param_importances"].png is None  # logged (by an older sweep) and still left out
    assert "4 completed trial(s)" in below["param_importances"].note and "at least 5" in below["param_importances"].note
    at = {i.name: i for i in S.optuna_images(finished_trials(5), PNGS)}
    assert at["param_importances"].png == PNGS["param_importances"]
    (none,) = S.optuna_images(finished_trials(5), {})
    assert none.png is None and "none logged" in none.note


def test_the_pareto_front_figure_is_shown_when_logged():
    names = [i.name for i in S.optuna_images(finished_trials(5), {**PNGS, "pareto_front": b"\x89PNG front"})]
    assert names == ["optimization_history", "param_importances", "slice", "pareto_front"]


def test_images_are_written_as_png_files_and_inlined_in_the_html(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("plotly")
    from bench.report import html, markdown

    g = finished_trials(2)
    data = ReportData("fedavg-synthetic", "exp", "sqlite:///x.db", [PARENT], [g], images=PNGS)
    (section,) = S.sections(data)
    assert [f.name for f in section[2] if isinstance(f, Image)] == ["optimization_history", "param_importances",
                                                                     "slice"]
    md = (tmp_path / "out" / "report.md")
    markdown.write(data, [section], [], tmp_path / "out")
    text = md.read_text()
    assert "![Optuna: acc/val (validation) of each completed trial and the best so far](figures/synthetic-p-" \
           "optimization_history.png)" in text
    assert (tmp_path / "out" / "figures" / "synthetic-p-slice.png").read_bytes() == PNGS["slice"]
    assert "*Optuna: parameter importances (fANOVA on acc/val)*: left out: the study has 2 completed trial(s)" in text
    page = open(html.write(data, [section], [], tmp_path / "out" / "index.html")).read()
    assert f'src="data:image/png;base64,{base64.b64encode(PNGS["slice"]).decode()}"' in page
    assert "left out: the study has 2 completed trial(s)" in page
    assert "param_importances.png" not in page
