"""The answer at a glance: the Pareto sets on accuracy vs cost and the one-paragraph verdict a
comparison report shows above its tables, computed with the tables' own functions so the two agree."""
from __future__ import annotations

import math

from bench.report import devices as D
from bench.report import tables as T
from bench.report.model import Group
from bench.report.tables import HEADLINE, REFERENCE, fmt, last_k, last_k_mean, method_means, peak, per_round


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """The names whose (accuracy, cost) no other point dominates (at least as accurate and at most as
    costly, better in one), in the order given; points with a nan left out."""
    ok = {m: p for m, p in points.items() if not any(math.isnan(x) for x in p)}
    return [m for m, (a, c) in ok.items()
            if not any(a2 >= a and c2 <= c and (a2 > a or c2 < c) for m2, (a2, c2) in ok.items() if m2 != m)]


def distance(points: dict[str, tuple[float, float]], front: list[str], m: str) -> tuple[float, float | None]:
    """How far the dominated point m is from the front: (the most accuracy a front point gains at no more
    cost, the least cost ratio at which a front point is at least as accurate; None for a cost of 0)."""
    a, c = points[m]
    gain = max(points[f][0] - a for f in front if points[f][1] <= c)
    ratios = [points[f][1] / c for f in front if points[f][0] >= a] if c > 0 else []
    return gain, (min(ratios) if ratios else None)


def _front_sentence(points: dict[str, tuple[float, float]], cost: str, unit: str) -> str:
    front = pareto(points)
    off = []
    for m in points:
        if m in front or m not in points or any(math.isnan(x) for x in points[m]):
            continue
        gain, ratio = distance(points, front, m)
        off.append(f"{m} {gain:.4f} below it at no more {unit}" + (
            f" (or {ratio:.2f}x its {unit} for its accuracy)" if ratio is not None else ""))
    return (f"Pareto set on accuracy vs {cost}: {', '.join(front)}"
            + (f"; off it: {'; '.join(off)}." if off else "; no method is off it."))


def _devices_sentences(group: Group, k: int, target: float) -> list[str]:
    """Where runs simulated edge devices: the method first to the target accuracy in simulated time (the
    devices table's `sim s to target`, with FeDEQ's multiple), and, when a method leaves clients out for
    want of memory, how many each method excludes. Nothing for runs without device simulation."""
    out = []
    tgt = T.target_of(group, target, k) if D.logged(group, D.SIM_TIME_CUMULATIVE) else None
    if tgt is not None:
        def seconds(r):
            s = T.mb_to_target(r, tgt[0], k, D.SIM_TIME_CUMULATIVE, 1.0)
            return math.nan if s is None else s

        reach = method_means(group, seconds)  # the methods whose every seed reaches the target
        if reach:
            first = min(reach, key=reach.__getitem__)
            text = (f"First to the target accuracy ({tgt[0]:.4f}) in simulated time: {first} "
                    f"({reach[first]:.2f} s")
            ref = reach.get(REFERENCE)
            if ref and first != REFERENCE:
                text += f", {reach[first] / ref:.2f}x {REFERENCE}'s time"
            elif ref is None and REFERENCE in group.methods:
                text += f"; {REFERENCE} does not reach it in every seed"
            out.append(text + ").")
        else:
            out.append(f"No method reaches the target accuracy ({tgt[0]:.4f}) in every seed, so none is first "
                       "in simulated time.")
    excluded = method_means(group, lambda r: r.final(D.EXCLUDED_MEMORY))
    if any(v > 0 for v in excluded.values()):
        out.append("Clients excluded by memory (device memory below the method's peak training memory; mean over "
                   f"seeds): {', '.join(f'{m} {round(v, 2):g}' for m, v in excluded.items())}.")
    return out


def verdict(group: Group, k: int | None = None, target: float = 0.95) -> str:
    """One paragraph, generated from the numbers: the best method on accuracy (mean last-k HEADLINE),
    bytes (MB total), memory (peak train MB) and compute (GFLOP/update, where runs counted FLOPs),
    with FeDEQ's multiples, where runs simulated edge devices the first method to the target accuracy
    (`target` x the best mean last-k HEADLINE, as MB to target) in simulated time and the clients each
    method excludes by memory, and the Pareto sets on accuracy vs each cost, with how far each method
    off them is. Empty without FINISHED runs."""
    k, _ = last_k(group, k)
    acc = method_means(group, lambda r: last_k_mean(r, HEADLINE, k))
    mb = method_means(group, lambda r: r.final("bytes/cumulative") / 1e6)
    mem = method_means(group, lambda r: peak(r, "mem/peak_train_bytes") / 1e6)
    flops = method_means(group, lambda r: per_round(r, "compute/flops_update") / 1e9)
    if not acc:
        return ""
    parts = [f"Accuracy is {HEADLINE}, the mean of the last {k} evaluated round{'s' if k > 1 else ''} "
             f"(mean over seeds)."]
    best = max(acc, key=acc.__getitem__)
    parts.append(f"Most accurate: {best} ({acc[best]:.4f}).")
    for what, means, unit, shown in (("Fewest MB sent", mb, "bytes", "MB"), ("Least peak training memory", mem,
                                      "memory", "MB"), ("Fewest FLOPs per local update", flops, "FLOPs", "GFLOP")):
        if not means:
            continue
        low = min(means, key=means.__getitem__)
        text = f"{what}: {low} ({fmt(means[low], 'mb')} {shown}"
        ref = means.get(REFERENCE)
        if ref and low != REFERENCE:
            text += f", {means[low] / ref:.2f}x {REFERENCE}'s {unit}"
        parts.append(text + ").")
    parts += _devices_sentences(group, k, target)
    for means, cost, unit in ((mb, "MB total", "MB"), (mem, "peak train MB", "memory"),
                              (flops, "GFLOP/update", "FLOPs")):
        points = {m: (acc[m], means[m]) for m in acc if m in means}
        if points:
            parts.append(_front_sentence(points, cost, unit))
    return " ".join(parts)
