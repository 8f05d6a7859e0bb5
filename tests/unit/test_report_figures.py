"""bench/report/figures.py and bench/report/html.py on a hand-built group: every figure's numbers are the
arithmetic on the runs' histories, the SVG and plotly renderings hold one element per series, and the
HTML page escapes what it shows and refers to nothing outside itself."""
import json
import re
import xml.etree.ElementTree as ET

import pytest

from bench.report import figures as F
from bench.report.model import Cell, Group, Provenance, ReportData, RunRecord, Table


def run(method, seed, history, clients=None, status="FINISHED"):
    """A child run with `history` {metric: [values of rounds 1, 2, ...]}."""
    return RunRecord(run_id=f"{method}-{seed}", parent_id="p", method=method, seed=seed, status=status,
                     dataset="synthetic", partition="6 clients", fingerprint="f", model="mlp", params={},
                     history={k: [(i + 1, v) for i, v in enumerate(vs)] for k, vs in history.items()},
                     clients=clients)


def client(cid, group, acc):
    return {"cid": cid, "group": group, "test_acc": acc, "test_n": 10, "val_acc": acc, "val_n": 5}


DEQ_0 = {"deq/nstep_mean": [10.0, 8.0], "deq/residual_max": [1e-2, 1e-3],
         "deq/b_nstep_mean": [6.0, 4.0], "deq/b_residual_max": [1e-3, 1e-4]}
DEQ_1 = {"deq/nstep_mean": [12.0, 6.0], "deq/residual_max": [3e-2, 1e-3],
         "deq/b_nstep_mean": [8.0, 4.0], "deq/b_residual_max": [2e-3, 2e-4]}


def make_group(deq=True):
    """fedeq and fedavg, seeds 0 and 1, two rounds; a FAILED fedavg seed 2 whose numbers must show
    nowhere (999)."""
    runs = [
        run("fedeq", 0, {"acc/weighted": [0.5, 0.7], "bytes/cumulative": [1e6, 2e6],
                         "mem/peak_train_bytes": [3e6, 5e6], **(DEQ_0 if deq else {})},
            clients=[client(0, "train", 0.6), client(1, "train", 0.8), client(5, "unseen", 0.4)]),
        run("fedeq", 1, {"acc/weighted": [0.3, 0.9], "bytes/cumulative": [1e6, 2.5e6],
                         "mem/peak_train_bytes": [4e6, 2e6], **(DEQ_1 if deq else {})},
            clients=[client(0, "train", 0.7), client(1, "train", 0.9), client(5, "unseen", 0.5)]),
        run("fedavg", 0, {"acc/weighted": [0.4, 0.6], "bytes/cumulative": [4e6, 8e6],
                          "mem/peak_train_bytes": [1e6, 1e6]}, clients=[client(0, "train", 0.55)]),
        run("fedavg", 1, {"acc/weighted": [0.2, 0.4], "bytes/cumulative": [4e6, 8e6],
                          "mem/peak_train_bytes": [2e6, 2e6]}, clients=[client(0, "train", 0.45)]),
        run("fedavg", 2, {"acc/weighted": [999.0], "bytes/cumulative": [999.0],
                          "mem/peak_train_bytes": [999.0]}, clients=[client(0, "train", 999.0)],
            status="FAILED"),
    ]
    return Group("synthetic", "6 clients", runs, seeds=[0, 1, 2], methods=["fedeq", "fedavg"])


def by_name(figs):
    return {f.name: f for f in figs}


def series(fig, label):
    (s,) = [s for s in fig.series if s.label == label]
    return s


# -- what each figure shows -----------------------------------------------------------------------


def test_accuracy_vs_round_is_mean_with_min_max_band_over_finished_seeds():
    figs = by_name(F.group_figures(make_group()))
    fig = figs["acc_vs_round"]
    assert [s.label for s in fig.series] == ["fedeq", "fedavg"]
    s = series(fig, "fedeq")
    assert s.x == [1, 2]
    assert s.y == pytest.approx([(0.5 + 0.3) / 2, (0.7 + 0.9) / 2])
    assert s.lo == [0.3, 0.7] and s.hi == [0.5, 0.9]
    # fedavg: seeds 0 and 1 only; the FAILED seed 2 (999) is not averaged in.
    assert series(fig, "fedavg").y == pytest.approx([(0.4 + 0.2) / 2, (0.6 + 0.4) / 2])
    assert "seed 0: 0.7" in s.hover[1] and "seed 1: 0.9" in s.hover[1] and "round 2" in s.hover[1]
    assert "min..max" in fig.title


def test_accuracy_vs_mb_puts_mean_cumulative_megabytes_on_x():
    s = series(by_name(F.group_figures(make_group()))["acc_vs_mb"], "fedeq")
    assert s.x == pytest.approx([(1e6 + 1e6) / 2 / 1e6, (2e6 + 2.5e6) / 2 / 1e6])  # [1.0, 2.25]
    assert s.y == pytest.approx([0.4, 0.8])


def test_a_round_some_seed_did_not_log_is_left_out_of_the_curve():
    g = make_group()
    g.runs[1].history["acc/weighted"] = [(2, 0.9)]  # fedeq seed 1 has no round 1
    s = series(by_name(F.group_figures(g))["acc_vs_round"], "fedeq")
    assert s.x == [2] and s.y == pytest.approx([(0.7 + 0.9) / 2])


def test_peak_memory_is_the_highest_round_per_run_then_mean_over_seeds():
    fig = by_name(F.group_figures(make_group()))["peak_memory"]
    assert fig.kind == "bar"
    s = series(fig, "fedeq")
    # seed 0: max(3, 5) = 5 MB; seed 1: max(4, 2) = 4 MB
    assert s.x == ["fedeq"] and s.y == pytest.approx([(5 + 4) / 2])
    assert s.lo == pytest.approx([4.0]) and s.hi == pytest.approx([5.0])
    assert series(fig, "fedavg").y == pytest.approx([(1 + 2) / 2])


def test_client_accuracy_pools_seeds_and_keeps_unseen_clients_apart():
    fig = by_name(F.group_figures(make_group()))["client_acc"]
    assert [s.label for s in fig.series] == ["fedeq", "fedeq (unseen)", "fedavg"]
    assert series(fig, "fedeq").y == [0.6, 0.8, 0.7, 0.9]
    unseen = series(fig, "fedeq (unseen)")
    assert unseen.y == [0.4, 0.5] and unseen.x == ["fedeq", "fedeq"] and unseen.variant == "unseen"
    assert series(fig, "fedavg").y == [0.55, 0.45]  # not the failed run's 999
    assert "client 5, seed 1" in unseen.hover[1]


def test_deq_figures_show_forward_and_adjoint_only_for_methods_that_log_them():
    figs = by_name(F.group_figures(make_group()))
    steps, res = figs["deq_steps"], figs["deq_residual"]
    assert [s.label for s in steps.series] == ["fedeq forward", "fedeq adjoint"]
    assert series(steps, "fedeq forward").y == pytest.approx([(10 + 12) / 2, (8 + 6) / 2])
    assert series(steps, "fedeq adjoint").y == pytest.approx([(6 + 8) / 2, (4 + 4) / 2])
    assert series(steps, "fedeq adjoint").variant == "adjoint"
    assert series(res, "fedeq forward").hi == pytest.approx([3e-2, 1e-3]) and res.ylog


def test_no_deq_metrics_no_deq_figure():
    names = [f.name for f in F.group_figures(make_group(deq=False))]
    assert names == ["acc_vs_round", "acc_vs_mb", "peak_memory", "client_acc"]


def test_method_names_are_not_assumed_and_missing_data_drops_the_figure():
    # A sweep's methods are "trial N"; runs without clients.csv have no client figure.
    g = Group("synthetic", "p", [run("trial 3", 0, {"acc/weighted": [0.5], "bytes/cumulative": [1e6]}),
                                 run("trial 10", 0, {"acc/weighted": [0.6], "bytes/cumulative": [2e6]})],
              seeds=[0], methods=["trial 3", "trial 10"])
    figs = by_name(F.group_figures(g))
    assert list(figs) == ["acc_vs_round", "acc_vs_mb"]
    assert [s.label for s in figs["acc_vs_mb"].series] == ["trial 3", "trial 10"]
    assert figs["acc_vs_mb"].series[0].color != figs["acc_vs_mb"].series[1].color


def test_pareto_figures_plot_every_seed_the_mean_and_the_front():
    """k = 1: accuracy is each run's last acc/weighted. By hand: fedeq seeds (2.0 MB, 0.7), (2.5 MB, 0.9),
    mean (2.25, 0.8); fedavg (8, 0.6), (8, 0.4), mean (8, 0.5); the FAILED seed 2 (999) nowhere. On MB,
    fedeq dominates fedavg: the front is fedeq alone. On memory (fedeq peaks 5 and 4 MB, mean 4.5;
    fedavg 1 and 2, mean 1.5) both are on it: a staircase (1.5, 0.5) -> (4.5, 0.5) -> (4.5, 0.8)."""
    figs = by_name(F.pareto_figures(make_group(), 1))
    assert list(figs) == ["acc_vs_total_mb", "acc_vs_memory"]
    mb = figs["acc_vs_total_mb"]
    assert mb.kind == "scatter" and [s.label for s in mb.series] == ["fedeq", "fedeq mean", "fedavg", "fedavg mean",
                                                                     "Pareto front"]
    assert (series(mb, "fedeq").x, series(mb, "fedeq").y) == ([2.0, 2.5], [0.7, 0.9])
    assert (series(mb, "fedavg").x, series(mb, "fedavg").y) == ([8.0, 8.0], [0.6, 0.4])
    assert series(mb, "fedeq mean").x == [2.25] and series(mb, "fedeq mean").y == [pytest.approx(0.8)]
    assert series(mb, "Pareto front").x == [2.25] and series(mb, "Pareto front").y == [pytest.approx(0.8)]
    front = series(figs["acc_vs_memory"], "Pareto front")
    assert front.x == [1.5, 4.5, 4.5] and front.y == pytest.approx([0.5, 0.5, 0.8])
    # k = 2: the mean of both rounds, (0.5 + 0.7) / 2 = 0.6 and (0.3 + 0.9) / 2 = 0.6 for fedeq.
    assert series(by_name(F.pareto_figures(make_group(), 2))["acc_vs_total_mb"], "fedeq").y == \
        pytest.approx([0.6, 0.6])


def test_a_sweep_plots_validation_accuracy():
    # Trials log acc/val, not acc/weighted (bench/tuning/study.py TEST_METRICS); the sweep report asks for it.
    g = Group("synthetic", "p", [run("trial 0", 0, {"acc/val": [0.2, 0.6], "bytes/cumulative": [1e6, 2e6]}),
                                 run("trial 0", 1, {"acc/val": [0.4, 0.8], "bytes/cumulative": [1e6, 2e6]})],
              seeds=[0, 1], methods=["trial 0"])
    assert F.group_figures(g) == []
    fig = by_name(F.group_figures(g, accuracy="acc/val"))["acc_vs_mb"]
    assert fig.ylabel == "acc/val" and fig.series[0].y == pytest.approx([(0.2 + 0.4) / 2, (0.6 + 0.8) / 2])


def test_a_group_with_only_failed_runs_has_no_figures():
    g = make_group()
    for r in g.runs:
        r.status = "FAILED"
    assert F.group_figures(g) == []


# -- renderers --------------------------------------------------------------------------------------


SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize("name", ["acc_vs_round", "acc_vs_mb", "peak_memory", "client_acc", "deq_steps",
                                  "deq_residual", "acc_vs_total_mb", "acc_vs_memory"])
def test_svg_parses_with_one_element_per_series_and_is_deterministic(name):
    pytest.importorskip("matplotlib")
    fig = by_name(F.group_figures(make_group()) + F.pareto_figures(make_group(), 1))[name]
    svg = F.to_svg(fig)
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    ids = [e.get("id") for e in root.iter() if (e.get("id") or "").startswith("series-")]
    assert sorted(ids) == sorted(f"series-{i}" for i in range(len(fig.series)))
    assert fig.title in "".join(root.itertext())  # svg.fonttype none: titles stay text
    assert F.to_svg(fig) == svg  # no date, fixed hash salt


@pytest.mark.parametrize("name", ["acc_vs_round", "peak_memory", "client_acc", "deq_residual", "acc_vs_memory"])
def test_plotly_has_one_trace_per_series_plus_its_band(name):
    fig = by_name(F.group_figures(make_group()) + F.pareto_figures(make_group(), 1))[name]
    out = F.to_plotly(fig)
    main = [t for t in out["data"] if t.get("fill") != "toself"]
    bands = [t for t in out["data"] if t.get("fill") == "toself"]
    assert [t["name"] for t in main] == [s.label for s in fig.series]
    assert len(bands) == (len(fig.series) if fig.kind == "line" else 0)
    for t, s in zip(main, fig.series, strict=True):
        assert t["y"] == s.y and t["hovertext"] == s.hover
    json.dumps(out, allow_nan=False)  # valid JSON for the page


def test_plotly_band_is_hi_then_lo_reversed_and_nan_becomes_a_gap():
    fig = F.Figure("f", "t", "x", "y", "line", [F.Series("m", [1, 2], [0.5, float("nan")], [0.4, 0.1],
                                                         [0.6, 0.3])])
    band, line = F.to_plotly(fig)["data"]
    assert band["x"] == [1, 2, 2, 1] and band["y"] == [0.6, 0.3, 0.1, 0.4]
    assert line["y"] == [0.5, None]


def test_bar_error_bars_reach_min_and_max():
    fig = by_name(F.group_figures(make_group()))["peak_memory"]
    (bar,) = [t for t in F.to_plotly(fig)["data"] if t["name"] == "fedeq"]
    assert bar["error_y"]["array"] == pytest.approx([5.0 - 4.5]) and bar["error_y"]["arrayminus"] == \
        pytest.approx([4.5 - 4.0])


# -- the HTML page ----------------------------------------------------------------------------------


def test_html_escapes_text_marks_best_cells_and_refers_to_nothing_outside(tmp_path):
    pytest.importorskip("plotly")
    from bench.report import html

    g = make_group()
    g.runs[0].method = g.runs[1].method = "<b>x</b></script>"
    g.methods[0] = "<b>x</b></script>"
    table = Table("methods", ["method", "acc/weighted"],
                  [[Cell("<b>x</b></script>"), Cell("0.80 +- 0.1", 0.8, best=True)],
                   [Cell("fedavg"), Cell("0.50 +- 0.1", 0.5)]], notes=["a <note>"])
    prov = Provenance("p1", "run-1", "FINISHED", "python -m bench.run --methods a&b", "abc123",
                      {"rounds": "3", "methods": "<all>"}, {"python": "3.11"})
    data = ReportData("demo", "exp", "sqlite:///x.db", [prov], [g])
    provenance = [Table("runs", ["command"], [[Cell("python -m bench.run")]]),
                  Table("run-1", ["what", "value"], [[Cell("command"), Cell(prov.command)],
                                                     [Cell("status"), Cell("FINISHED")]])]
    path = html.write(data, [(g, [table], F.group_figures(g))], provenance, tmp_path / "out" / "index.html")
    page = (tmp_path / "out" / "index.html").read_text()
    assert path == str(tmp_path / "out" / "index.html")
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert page.count("</script>") == 2  # plotly.js and ours: the method name did not close one
    assert '<td class="num best" data-v="0.8">0.80 +- 0.1</td>' in page
    assert "<li>a &lt;note&gt;</li>" in page
    assert "<td><code>python -m bench.run</code></td>" in page  # a command column
    assert "<td><code>python -m bench.run --methods a&amp;b</code></td>" in page  # a (what, value) row
    assert "<td>FINISHED</td>" in page
    assert "<td><code>methods</code></td><td>&lt;all&gt;</td>" in page  # the config, folded in a <details>
    for fig in F.group_figures(g):
        assert f'id="s0-{fig.name}"' in page
    # Nothing the browser would fetch: no src/href attribute to anything but an anchor in the page.
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page.split("<script>", 1)[0] +
                      page.split("</head>", 1)[1].split("<script>const FIGURES")[0])
    assert refs and all(r.startswith("#") for r in refs)
    assert "<link" not in page
