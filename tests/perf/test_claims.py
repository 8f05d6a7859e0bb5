"""`python -m bench.perf --memory-claim`'s FeDEQ rows (bench/perf/claims.py), as a benchmark (`make bench`;
skipped by `make test`: one metered DEQ-ResNet-S update per adjoint solver takes a minute on 2 cores).

What it checks: the live meter sees FeDEQ's whole update, the no-grad solver work included. The
parameters and their gradients alone are 2 x 4 bytes per parameter of deq_resnet_s_ref (992,894, the
reference's count, tests/unit/test_presets.py); the adjoint solver changes the peak (GMRES keeps a
basis vector per product, Anderson a history of 5), so the two solvers' peaks differ.
"""
from __future__ import annotations

from bench.perf import claims

# The preset's own adjoint (normal_cg, the reference's) and the harness's default.
B_SOLVERS = ("preset", "gmres")


def test_fedeq_memory_claim_rows(benchmark):
    rows = benchmark.pedantic(claims.update_memory, args=(["femnist"], B_SOLVERS, ("fedeq",)), rounds=1,
                              iterations=1)
    assert [(r["method"], r["b_solver"], r["model"], r["batch"]) for r in rows] == [
        ("fedeq", b, "deq_resnet_s_ref", 10) for b in B_SOLVERS]
    for r in rows:
        assert r["peak"] > 2 * 4 * 992_894
        assert r["metrics"]["deq/b_nstep_mean"] >= 1  # the implicit backward ran its adjoint solve
    assert rows[0]["peak"] != rows[1]["peak"]
