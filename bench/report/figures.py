"""The report's figures: one neutral spec per picture, built once from a `Group`, drawn twice.

`group_figures(group)` turns a group's FINISHED runs into `Figure`s (plain data: series of numbers,
labels, colours); `to_svg` draws one with matplotlib for `report.md` (a static file any Markdown viewer
shows, no browser needed) and `to_plotly` turns the same spec into a plotly.js figure for
`index.html` (hover shows method, round and each seed's value; zoom; legend entries toggle a
method). What a figure shows is decided here once, so the two renderers cannot disagree.

Curves are the mean over seeds at each round every seed of that method logged, with a band from the
lowest to the highest seed (with two or three seeds a min..max band shows every seed; a standard
deviation of two numbers says little). Nothing assumes method names: a sweep's "trial 7" is a method.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from bench.report.devices import SIM_TIME_CUMULATIVE
from bench.report.model import Group, RunRecord

# matplotlib's tab10, so a method has the same colour in the SVG and in the HTML.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
BAND = "mean over seeds, band: min..max"
ACC = "acc/weighted"
# DEQ solver statistics (methods/fedeq.py logs deq/... for the forward solve, deq/b_... for the
# adjoint solve of the implicit backward): (figure name, y label, log scale, forward, adjoint).
DEQ = (("deq_steps", "solver steps (mean over examples)", False, "deq/nstep_mean", "deq/b_nstep_mean"),
       ("deq_residual", "residual (max over examples)", True, "deq/residual_max", "deq/b_residual_max"))


@dataclass
class Series:
    """One method's curve, bar or set of points."""

    label: str
    """Legend entry: the method, with what tells apart two series of one method ("fedeq adjoint")."""
    x: list[Any]
    """Numbers (round, MB) for line figures; for bar and box figures the category (method) of each y."""
    y: list[float]
    lo: list[float] | None = None
    hi: list[float] | None = None
    """The band (line) or error bar (bar) around y: the lowest and highest seed."""
    hover: list[str] | None = None
    """Per point: what the HTML shows on hover (method, round, each seed's value)."""
    color: str = PALETTE[0]
    """The method's colour: every series of one method has it, in every figure of the group."""
    variant: str = ""
    """Empty for a method's main series; else what sets this one apart ("adjoint", "unseen",
    "never trained"): drawn dashed (lines) or with open markers (points), and in box figures given
    its own slot beside the main box."""


@dataclass
class Figure:
    name: str
    """File-name stem and HTML id part: acc_vs_total_mb, acc_vs_memory (the answer at a glance),
    acc_vs_round, acc_vs_mb, acc_vs_sim_time, peak_memory, client_acc, deq_steps, deq_residual."""
    title: str
    xlabel: str
    ylabel: str
    kind: str
    """"line" (x numeric, optional band), "bar" (one bar per category, error bar lo..hi), "box"
    (a box and every point per category; series of one category stand side by side) or "scatter"
    (points; a series with variant "mean" is one large open marker, "front" a dashed line)."""
    series: list[Series]
    ylog: bool = False


def group_figures(group: Group, accuracy: str = ACC) -> list[Figure]:
    """Every figure of one dataset and partition, from its FINISHED runs, in reading order. A figure
    whose metric no finished run logged (no clients.csv, no deq/*) is left out; failed and missing
    runs are the tables' business (they say so), a curve only shows what finished. `accuracy`: the
    metric of the accuracy figures; a sweep's report passes "acc/val" (trials log no test metrics)."""
    runs = [r for r in group.runs if r.status == "FINISHED"]
    by_method = {m: [r for r in runs if r.method == m] for m in group.methods}
    by_method = {m: rs for m, rs in by_method.items() if rs}
    color = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(by_method)}
    prefix = f"{group.dataset}: "
    figs = [
        _line("acc_vs_round", f"{prefix}accuracy vs round ({BAND})", "round", accuracy,
              [_curve(m, rs, accuracy, color[m]) for m, rs in by_method.items()]),
        _line("acc_vs_mb", f"{prefix}accuracy vs MB sent ({BAND})", "cumulative MB sent (up + down)", accuracy,
              [_curve(m, rs, accuracy, color[m], x_metric="bytes/cumulative", x_scale=1e-6)
               for m, rs in by_method.items()]),
        # Simulated time on the clients' devices (runs recorded before devices existed have none: no figure).
        _line("acc_vs_sim_time", f"{prefix}accuracy vs simulated time ({BAND})", "cumulative simulated seconds",
              accuracy, [_curve(m, rs, accuracy, color[m], x_metric=SIM_TIME_CUMULATIVE, x_unit="simulated s")
                         for m, rs in by_method.items()]),
        _peak_memory(prefix, by_method, color),
        _client_acc(prefix, by_method, color),
    ]
    for name, ylabel, ylog, fwd, adj in DEQ:
        series = [_curve(f"{m} {side}", rs, metric, color[m], variant="" if side == "forward" else side)
                  for m, rs in by_method.items() for side, metric in (("forward", fwd), ("adjoint", adj))]
        figs.append(_line(name, f"{prefix}DEQ {ylabel.split(' (')[0]}, forward and adjoint ({BAND})",
                          "round", ylabel, series, ylog=ylog))
    return [f for f in figs if f is not None]


def pareto_figures(group: Group, k: int) -> list[Figure]:
    """The answer at a glance, drawn: accuracy (mean HEADLINE of the last k evaluated rounds) against
    total MB sent, against peak training memory and against a local update's FLOPs. Every FINISHED seed is a point, each method's mean a
    larger open marker, the Pareto front over the means (verdict.pareto, the same set the verdict names)
    a dashed staircase. A figure no run can fill (no memory logged) is left out."""
    from bench.report import tables as T  # the numbers: the tables' own functions, so the two agree
    from bench.report.verdict import pareto

    runs = [r for r in group.runs if r.status == "FINISHED"]
    methods = [m for m in group.methods if any(r.method == m for r in runs)]
    color = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}
    acc = lambda r: T.last_k_mean(r, T.HEADLINE, k)  # noqa: E731
    out = []
    for name, xlabel, cost in (("acc_vs_total_mb", "total MB sent (up + down)",
                                lambda r: r.final("bytes/cumulative") / 1e6),
                               ("acc_vs_memory", "peak training memory (MB)",
                                lambda r: T.peak(r, "mem/peak_train_bytes") / 1e6),
                               ("acc_vs_flops", "GFLOP per local update (mean over rounds)",
                                lambda r: T.per_round(r, "compute/flops_update") / 1e9)):
        series, means = [], {}
        for m in methods:
            pts = [(r.seed, cost(r), acc(r)) for r in T.finished(group, m)]
            pts = [p for p in pts if math.isfinite(p[1]) and math.isfinite(p[2])]
            if not pts:
                continue
            series.append(Series(m, [x for _, x, _ in pts], [y for _, _, y in pts],
                                 hover=[f"{m}, seed {s}<br>{xlabel} {x:.4g}<br>accuracy {y:.4f}" for s, x, y in pts],
                                 color=color[m]))
            mx, my = sum(x for _, x, _ in pts) / len(pts), sum(y for _, _, y in pts) / len(pts)
            means[m] = (my, mx)
            series.append(Series(f"{m} mean", [mx], [my], hover=[f"{m}, mean of {len(pts)} seed(s)<br>{xlabel} "
                                                               f"{mx:.4g}<br>accuracy {my:.4f}"],
                                 color=color[m], variant="mean"))
        if not series:
            continue
        front = sorted(pareto(means), key=lambda m: means[m][1])
        xs, ys = [], []
        for i, m in enumerate(front):  # a staircase: each front point holds its accuracy up to the next's cost
            if i:
                xs.append(means[m][1])
                ys.append(means[front[i - 1]][0])
            xs.append(means[m][1])
            ys.append(means[m][0])
        series.append(Series("Pareto front", xs, ys, hover=[f"Pareto front: {', '.join(front)}"] * len(xs),
                             color="#000000", variant="front"))
        last = f"the last {k} evaluated rounds" if k > 1 else "the last evaluated round"
        out.append(Figure(name, f"{group.dataset}: accuracy ({T.HEADLINE}, mean of {last}) vs "
                          f"{xlabel.split(' (')[0]} (points: seeds; open: mean)",
                          xlabel, f"{T.HEADLINE} last-{k} mean", "scatter", series))
    return out


def _line(name, title, xlabel, ylabel, series, ylog=False) -> Figure | None:
    series = [s for s in series if s is not None]
    return Figure(name, title, xlabel, ylabel, "line", series, ylog) if series else None


def _curve(label: str, runs: list[RunRecord], metric: str, color: str, variant: str = "",
           x_metric: str | None = None, x_scale: float = 1.0, x_unit: str = "MB") -> Series | None:
    """Mean, min and max over `runs` (a method's seeds) of `metric` at every round all of them logged
    it (and `x_metric`, when x is that metric's mean, in `x_unit`, instead of the round). None when no
    run logged it."""
    runs = [r for r in runs if r.history.get(metric)]
    if not runs:
        return None
    ys = [dict(r.history[metric]) for r in runs]
    xs = [dict(r.history.get(x_metric, [])) for r in runs] if x_metric else None
    rounds = set.intersection(*(set(h) for h in ys + (xs or [])))
    lo: list[float] = []
    hi: list[float] = []
    hover: list[str] = []
    s = Series(label, [], [], lo, hi, hover, color, variant)
    for rnd in sorted(rounds):
        vals = [h[rnd] for h in ys]
        mean = sum(vals) / len(vals)
        x = sum(h[rnd] for h in xs) / len(xs) * x_scale if xs else rnd
        s.x.append(x)
        s.y.append(mean)
        lo.append(min(vals))
        hi.append(max(vals))
        where = f"round {rnd}" + (f", {x:.4g} {x_unit}" if xs else "")
        seeds = "<br>".join(f"seed {r.seed}: {v:.4g}" for r, v in zip(runs, vals, strict=True))
        hover.append(f"{label}, {where}<br>{metric} mean {mean:.4g}<br>{seeds}")
    return s if s.x else None


def _peak_memory(prefix: str, by_method: dict[str, list[RunRecord]], color: dict[str, str]) -> Figure | None:
    """Per method, the highest mem/peak_train_bytes of any round, in MB: mean over seeds, error bar
    min..max."""
    series = []
    for m, rs in by_method.items():
        peaks = [(r.seed, max(v for _, v in r.history["mem/peak_train_bytes"]) / 1e6)
                 for r in rs if r.history.get("mem/peak_train_bytes")]
        if not peaks:
            continue
        vals = [v for _, v in peaks]
        mean = sum(vals) / len(vals)
        seeds = "<br>".join(f"seed {s}: {v:.4g} MB" for s, v in peaks)
        series.append(Series(m, [m], [mean], [min(vals)], [max(vals)],
                             [f"{m}<br>peak training memory mean {mean:.4g} MB<br>{seeds}"], color[m]))
    if not series:
        return None
    return Figure("peak_memory", f"{prefix}peak training memory per client update (mean over seeds, "
                  "bar: min..max)", "method", "peak training memory (MB)", "bar", series)


def _client_acc(prefix: str, by_method: dict[str, list[RunRecord]], color: dict[str, str]) -> Figure | None:
    """Per method, every client's final test accuracy (clients.csv), all seeds pooled: one box per
    method and client group (clients trained on; clients never sampled; clients held out of training)."""
    series = []
    for m, rs in by_method.items():
        for group in ("train", "never_trained", "unseen"):
            pts = [(r.seed, c) for r in rs for c in (r.clients or [])
                   if c["group"] == group and math.isfinite(float(c["test_acc"]))]
            if not pts:
                continue
            variant = "" if group == "train" else group.replace("_", " ")
            label = f"{m} ({variant})" if variant else m
            series.append(Series(
                label, [m] * len(pts), [float(c["test_acc"]) for _, c in pts],
                hover=[f"{label}<br>client {c['cid']}, seed {s}<br>test acc {float(c['test_acc']):.4g}"
                       for s, c in pts],
                color=color[m], variant=variant))
    if not series:
        return None
    return Figure("client_acc", f"{prefix}final test accuracy per client (all seeds; open markers: "
                  "clients not trained on)", "method", "client test accuracy", "box", series)


def _categories(fig: Figure) -> list[str]:
    """Bar and box figures: the categories (methods) in first-seen order."""
    return list(dict.fromkeys(x for s in fig.series for x in s.x))


def to_svg(fig: Figure) -> str:
    """The figure drawn by matplotlib as an SVG document. The same figure gives the same bytes (fixed
    hash salt, no date), and series i is the element with id `series-i` (its line, bar or points)."""
    import matplotlib
    from matplotlib.figure import Figure as MplFigure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    with matplotlib.rc_context({"svg.hashsalt": "fedeq-bench", "svg.fonttype": "none"}):
        mfig = MplFigure(figsize=(7, 4.2), layout="constrained")
        ax = mfig.add_subplot()
        if fig.kind == "scatter":
            for i, s in enumerate(fig.series):
                if s.variant == "front":
                    ax.plot(s.x, s.y, color=s.color, linestyle="--", linewidth=1, marker="x", markersize=5,
                            label=s.label, gid=f"series-{i}")
                elif s.variant == "mean":
                    ax.scatter(s.x, s.y, s=110, marker="D", facecolors="none", edgecolors=s.color, linewidths=1.6,
                               gid=f"series-{i}", zorder=3)
                else:
                    ax.scatter(s.x, s.y, s=22, color=s.color, label=s.label, gid=f"series-{i}", zorder=2)
        elif fig.kind == "line":
            for i, s in enumerate(fig.series):
                if s.lo is not None and s.hi is not None:
                    ax.fill_between(s.x, s.lo, s.hi, color=s.color, alpha=0.18, linewidth=0)
                ax.plot(s.x, s.y, color=s.color, linestyle="--" if s.variant else "-", marker="o",
                        markersize=3, label=s.label, gid=f"series-{i}")
        else:
            cats = _categories(fig)
            # Series of one category stand side by side within a slot of width 0.8.
            slots = {c: [i for i, s in enumerate(fig.series) if c in s.x] for c in cats}
            for i, s in enumerate(fig.series):
                cat = s.x[0]
                k, n = slots[cat].index(i), len(slots[cat])
                pos = cats.index(cat) - 0.4 + 0.8 * (k + 0.5) / n
                width = 0.8 / n * 0.7
                if fig.kind == "bar":
                    err = None
                    if s.lo:
                        assert s.hi is not None  # a bar's error bar has both ends
                        err = [[s.y[0] - s.lo[0]], [s.hi[0] - s.y[0]]]
                    bars = ax.bar([pos], s.y, width=width, color=s.color, yerr=err, capsize=4)
                    bars.patches[0].set_gid(f"series-{i}")
                else:
                    ax.boxplot([s.y], positions=[pos], widths=width, showfliers=False,
                               medianprops={"color": s.color}, boxprops={"color": s.color},
                               whiskerprops={"color": s.color}, capprops={"color": s.color})
                    # Deterministic spread of the points across the box (golden-ratio sequence).
                    jitter = [pos + width * 0.8 * ((j * 0.618034) % 1 - 0.5) for j in range(len(s.y))]
                    ax.scatter(jitter, s.y, s=12, facecolors="none" if s.variant else s.color,
                               edgecolors=s.color, linewidths=0.8, label=s.label, gid=f"series-{i}",
                               zorder=3)
            ax.set_xticks(range(len(cats)), cats, rotation=30 if len(cats) > 6 else 0)
            ax.set_xlim(-0.6, len(cats) - 0.4)
        if fig.kind == "line" and _integer_x(fig):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds: no tick at round 1.5
        if fig.ylog:
            ax.set_yscale("log")
        ax.set_title(fig.title, fontsize=9)
        ax.set_xlabel(fig.xlabel)
        ax.set_ylabel(fig.ylabel)
        ax.grid(alpha=0.3)
        if fig.kind not in ("bar", "box"):  # a bar or box figure's ticks name its methods (and a legend of
            ax.legend(fontsize=7, loc="best")  # every method x client group squeezed 14 methods' axes to nothing)
        buf = io.StringIO()
        mfig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def to_plotly(fig: Figure) -> dict:
    """The figure as plotly.js JSON ({"data", "layout"}): one trace per series (named by its label;
    hover shows its `hover` text), plus for each line series with a band one more trace, the band,
    filled, without legend entry or hover, toggled with its series (same legendgroup). NaN becomes
    None (a gap), so json.dumps gives valid JSON."""
    data: list[dict[str, Any]] = []
    for s in fig.series:
        common = {"name": s.label, "legendgroup": s.label, "x": _finite(s.x), "y": _finite(s.y),
                  "hovertext": s.hover, "hovertemplate": "%{hovertext}<extra></extra>"}
        if fig.kind == "scatter":
            if s.variant == "front":
                data.append({**common, "type": "scatter", "mode": "lines+markers",  # a front of one: a marker
                             "line": {"color": s.color, "dash": "dash", "width": 1},
                             "marker": {"color": s.color, "size": 6, "symbol": "x-thin-open"}})
            else:  # a method's mean toggles with its seeds (one legend group, one legend entry)
                group = s.label[:-len(" mean")] if s.variant == "mean" else s.label
                data.append({**common, "type": "scatter", "mode": "markers", "legendgroup": group,
                             "showlegend": s.variant != "mean",
                             "marker": {"color": s.color, "size": 14 if s.variant else 7,
                                        "symbol": "diamond-open" if s.variant else "circle",
                                        "line": {"width": 2 if s.variant else 0, "color": s.color}}})
        elif fig.kind == "line":
            if s.lo is not None and s.hi is not None:
                data.append({"type": "scatter", "name": f"{s.label} band", "legendgroup": s.label,
                             "x": _finite(s.x + s.x[::-1]), "y": _finite(s.hi + s.lo[::-1]),
                             "fill": "toself", "fillcolor": _rgba(s.color, 0.18), "line": {"width": 0},
                             "mode": "lines", "hoverinfo": "skip", "showlegend": False})
            data.append({**common, "type": "scatter", "mode": "lines+markers",
                         "line": {"color": s.color, "dash": "dash" if s.variant else "solid"},
                         "marker": {"size": 5}})
        elif fig.kind == "bar":
            data.append({**common, "type": "bar", "marker": {"color": s.color}})
            if s.lo is not None and s.hi is not None:
                data[-1]["error_y"] = {"type": "data", "symmetric": False,
                                       "array": _finite([h - y for h, y in zip(s.hi, s.y, strict=True)]),
                                       "arrayminus": _finite([y - lo for y, lo in zip(s.y, s.lo, strict=True)])}
        else:
            # offsetgroup: a method's boxes of one variant share a slot, so with two variants each
            # method has two boxes side by side (not one slot per trace, mostly empty).
            data.append({**common, "type": "box", "boxpoints": "all", "jitter": 0.5, "pointpos": 0,
                         "hoveron": "points", "line": {"color": s.color}, "fillcolor": _rgba(s.color, 0.1),
                         "marker": {"color": s.color, "size": 5,
                                    "symbol": "circle-open" if s.variant else "circle"},
                         "offsetgroup": s.variant or "main"})
    axis = {"zeroline": False, "automargin": True}
    layout: dict[str, Any]
    layout = {"title": {"text": fig.title, "font": {"size": 13}}, "hovermode": "closest",
              "xaxis": {**axis, "title": {"text": fig.xlabel}},
              "yaxis": {**axis, "title": {"text": fig.ylabel}, **({"type": "log"} if fig.ylog else {})},
              "margin": {"t": 50, "r": 10}, "height": 420, "legend": {"font": {"size": 11}},
              "showlegend": fig.kind != "bar"}
    if fig.kind == "line" and _integer_x(fig) and max(x for s in fig.series for x in s.x) <= 12:
        layout["xaxis"]["dtick"] = 1  # a few rounds: one tick each, none at round 1.5
    if fig.kind == "box":
        layout["boxmode"] = "group"
    elif fig.kind == "bar":
        layout["barmode"] = "overlay"  # one bar per category, centred: not a slot per trace
    return {"data": data, "layout": layout}


def _integer_x(fig: Figure) -> bool:
    """x is a count (rounds), not a measurement (MB)."""
    return all(isinstance(x, int) for s in fig.series for x in s.x)


def _finite(values: list) -> list:
    return [None if isinstance(v, float) and not math.isfinite(v) else v for v in values]


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"
