"""fedeq-bench's library namespace: `fedeq_bench.core`, `fedeq_bench.methods`, `fedeq_bench.datasets`.

Their folders sit at the top of the checkout (`core/`, `methods/`, `datasets/`); pyproject.toml
maps them under this namespace (setuptools' package-dir, in an editable install and in a wheel), so
no other distribution's import name (Hugging Face's `datasets`, say) is shadowed or overwritten.
The harness that runs experiments is the separate package `bench` (docs/architecture.md).
"""
