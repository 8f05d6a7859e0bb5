"""LiveMeter (`--cpu-memory live`, the default on CPU): parameters + the peak of the live bytes of
every CPU storage an operator allocates while the meter is active (the package docstring)."""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.loop.memory.base import MemoryMeter

_ALIASING: dict[Any, bool] = {}  # operator -> whether a return aliases an input (from its schema)


class _LiveStorages(TorchDispatchMode):
    """Live bytes of the CPU storages that operators allocate while it is active, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}  # data_ptr -> nbytes of the storages allocated here, alive
        self.live = 0
        self.peak = 0
        self.active = True

    def _freed(self, ptr: int) -> None:
        if self.active:
            self.live -= self.sizes.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliases = _ALIASING.get(func)
        if aliases is None:
            # In-place ops, out= and views return (part of) an input: their schema says so, except
            # _unsafe_view's (a view declared as a new tensor, for autograd's sake).
            aliases = _ALIASING[func] = (any(r.alias_info is not None for r in func._schema.returns)
                                         or func._schema.name == "aten::_unsafe_view")
        if aliases:
            return out
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.layout != torch.strided:
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if not ptr or ptr in self.sizes:
                continue
            self.sizes[ptr] = storage.nbytes()
            self.live += self.sizes[ptr]
            if self.live > self.peak:
                self.peak = self.live
            weakref.finalize(storage, self._freed, ptr)
        return out


class LiveMeter(MemoryMeter):
    """Params + the peak of what operators allocate on the CPU while it is active."""

    def _reset(self) -> None:
        super()._reset()
        self._storages: _LiveStorages | None = None

    def _install(self) -> None:
        self._storages = _LiveStorages()
        self._storages.__enter__()

    def _uninstall_own(self) -> None:
        if self._storages is not None and self._storages.active:
            self._storages.active = False  # storages freed later change nothing
            self._storages.__exit__(None, None, None)

    @property
    def peak_bytes(self) -> int:
        return self._param_bytes + (self._storages.peak if self._storages is not None else 0)
