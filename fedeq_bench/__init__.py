"""fedeq-bench's one installed namespace.

The folders users see (`core/`, `methods/`, `datasets/`, `bench/`) sit at the top of the checkout;
installed, they are `fedeq_bench.core`, `fedeq_bench.methods`, `fedeq_bench.datasets` and
`fedeq_bench.bench` (pyproject.toml maps them with setuptools' package-dir), so no other
distribution's import name (Hugging Face's `datasets`, say) is shadowed or overwritten. The only
other top-level name installed is `bench`, the command's entry (`python -m bench.run`).
"""
import os as _os

# In a checkout (no install, or an editable one) the subpackages are this folder's siblings: look
# there too. Installed from a wheel they are inside this folder and nothing is added.
_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "core")):
    __path__.append(_os.path.dirname(_here))  # noqa: F821 - a package's __path__
