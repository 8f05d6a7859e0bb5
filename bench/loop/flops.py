"""FLOPs of a client's work, counted with PyTorch's own FLOP formulas (torch.utils.flop_counter).

`Counter` is a dispatch mode that sees every aten operator while it is active, forward and backward,
under no_grad too, so a DEQ's solver iterations and its adjoint solve are counted as they ran: the
count is exact for the solver steps taken. Each operator is counted by `flop_registry`, the formulas
FlopCounterMode uses (matrix products, convolutions, attention: 2 FLOPs per multiply-add; elementwise
operators are not counted), so the counts are the matrix arithmetic that dominates a network's cost.

Why not FlopCounterMode itself: its module tracker installs global backward hooks that fail on
`torch.autograd.grad` called inside a backward pass, which is how a DEQ's adjoint takes its
vector-Jacobian products ("A leaf node was passed to _will_engine_execute_node ..."). This counter
keeps only its total; tests/unit/test_flops.py checks it equals FlopCounterMode's total on networks
FlopCounterMode can count, so a torch upgrade that changes either side fails there. It uses
`TorchDispatchMode`, as the live memory meter does (bench/loop/memory/live.py).

Like memory, FLOPs are counted on a client's first local update (every one with
`memory_every_round`) and first evaluation; later rounds reuse the client's last count
(bench/loop/engine.py).
"""
from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class Counter(TorchDispatchMode):
    """`with Counter() as c: ...` then `c.total`: the FLOPs counted inside the block."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out
