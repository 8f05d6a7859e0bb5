"""The round loop and its machinery: `engine.run_method` runs one method x seed (schedule, broadcast,
local updates, aggregate, evaluate) over a `Backend` (backends.py: Serial; ray_backend.py: Ray actors,
with actor.py, early_pool.py, cluster.py, addresses.py and ray_loopback.py to start and reach them),
with the client-state store (store.py), the only codec of what crosses the network (wire.py), the
memory meters (memory/), checkpoints (checkpoint.py), divergence checks and actor-fault bounds.
It imports the library (fedeq_bench.*), bench.config, bench.cli and bench.tracking; never the
experiment library, the reports, tuning or perf (tests/unit/test_layers.py).
"""
