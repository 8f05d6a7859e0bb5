"""The lowest layer: the vocabulary `methods/`, `datasets/` and `bench/` share.

It imports nothing of the project (tests/unit/test_layers.py enforces the layers):
    errors.py    BenchError, one-line messages with the valid choices
    files.py     reading user-given paths: one BenchError line per way a path can be wrong
    registry.py  name -> object registries that fail helpfully
    seeding.py   named random streams derived from (seed, stream, *ids)
    types.py     Message, State, Metrics, ClientTensors, Task, MethodSpec
"""

if __name__ != "fedeq_bench.core":  # the checkout's folder imported by its folder name
    raise ImportError(f"this is fedeq-bench's core/ folder; import it as fedeq_bench.core "
                      f"(imported as {__name__!r}, every module would load twice, with two registries)")

