"""Deep equilibrium machinery: fixed-point solvers chosen by name and implicit backward.

Public interface (used by methods/nets and methods/fedeq.py):

    z, stats = solve(f, z0, solver="anderson", max_iter=20, tol=1e-3,   # stats: STATS_KEYS, (batch,)
                     stop_mode="rel")   # "abs": ||f(z) - z||; anderson option variant="reference"
    layer = DEQ(func, solver=..., max_iter=..., tol=..., backward="implicit" | "jfb" | "phantom", ...)
    layer.configure(max_iter=30)  # validated; unknown names fail with the valid choices
    z = layer(x_inj, z0)          # layer.last_stats holds the forward solver's statistics
                                  # (layer.last_backward_stats: the implicit backward's adjoint solve)

`DEQDivergence` (a BenchError) is raised on NaN/inf or a residual above `diverge_above`.
Solvers are torchdeq 0.1.0's behind one signature (methods/deq/solvers.py says why and where we
add to them); the DEQ layer and its backward modes are in methods/deq/layer.py.
"""
from fedeq_bench.methods.deq.layer import BACKWARDS, DEQ
from fedeq_bench.methods.deq.solvers import (
    SOLVERS,
    STATS_KEYS,
    STOP_MODES,
    DEQDivergence,
    residual,
    solve,
)

__all__ = [
    "BACKWARDS",
    "DEQ",
    "DEQDivergence",
    "SOLVERS",
    "STATS_KEYS",
    "STOP_MODES",
    "residual",
    "solve",
]
