"""PartsMeter (`--cpu-memory parts`): parameters + gradients + optimizer state + the peak of the
tensors saved for backward, each counted from the tensors themselves (the package docstring)."""
from __future__ import annotations

import weakref
from functools import partial
from typing import Any

import torch
import torch.optim.optimizer as optim_module

from bench.loop.memory.base import MemoryMeter, _unique_bytes


class _SavedLedger:
    """The live curve of saved-for-backward bytes, shared by the meter and its handles.

    Handles reference the ledger, not the meter, so a graph that outlives the context (and is
    freed later) only lowers `live`; the recorded peak of a finished meter never changes.
    """

    __slots__ = ("refs", "exclude", "live", "peak", "active")

    def __init__(self, exclude: dict[int, int]):
        self.refs: dict[int, list[int]] = {}  # storage data_ptr -> [handle count, nbytes]
        self.exclude = exclude  # parameter/buffer storages (data_ptr -> nbytes), not counted
        self.live = 0
        self.peak = 0
        self.active = True  # False after exit: late packs (none expected) are not counted


class _Saved:
    """What autograd stores instead of a saved tensor while the meter is active."""

    __slots__ = ("tensor", "version", "key", "ledger")

    def __init__(self, tensor: torch.Tensor, version: int, key: int, ledger: _SavedLedger | None):
        self.tensor = tensor
        self.version = version
        self.key = key
        self.ledger = ledger

    def __del__(self) -> None:
        ledger = self.ledger
        if ledger is None:
            return
        entry = ledger.refs[self.key]
        entry[0] -= 1
        if not entry[0]:  # last handle of this storage: autograd no longer keeps it alive
            del ledger.refs[self.key]
            ledger.live -= entry[1]


def _pack(ledger: _SavedLedger, t: torch.Tensor) -> _Saved:
    # Hold a *detached* alias: an op that saves its own output (exp, tanh, sigmoid, ...) would
    # otherwise form the cycle output -> grad_fn -> handle -> output, which Python's GC cannot
    # see through autograd's C++ nodes, so a graph dropped without backward would leak. autograd
    # restores grad_fn/requires_grad on unpack itself (double backward works).
    alias = t.detach()
    version = t._version
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
        return _Saved(alias, version, 0, None)
    ptr = storage.data_ptr()
    if not ptr or ptr in ledger.exclude or not ledger.active:  # meta/empty, or a parameter
        return _Saved(alias, version, 0, None)
    entry = ledger.refs.get(ptr)
    if entry is None:  # first reference: the storage starts counting
        nbytes = storage.nbytes()
        ledger.refs[ptr] = [1, nbytes]
        ledger.live += nbytes
        if ledger.live > ledger.peak:
            ledger.peak = ledger.live
    else:
        entry[0] += 1
    return _Saved(alias, version, ptr, ledger)


def _unpack(saved: _Saved) -> torch.Tensor:
    t = saved.tensor
    # autograd skips its version-counter check when saved-tensor hooks are used; keep it, so the
    # meter never lets a gradient be computed from data modified in place.
    if t._version != saved.version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            f"inplace operation: [{t.type()} {list(t.shape)}] is at version {t._version}; "
            f"expected version {saved.version} instead (reported by bench.loop.memory.MemoryMeter)"
        )
    return t


class PartsMeter(MemoryMeter):
    """Params + grads + optimizer state + peak saved-for-backward bytes (any device but CUDA)."""

    def _reset(self) -> None:
        super()._reset()
        self._optimizers: dict[int, weakref.ref] = {}  # id -> optimizer that stepped
        self._grad_bytes = 0
        self._optimizer_bytes = 0
        self._ledger = _SavedLedger(self._params)
        self._saved_hooks: Any = None

    def _install(self) -> None:
        self._handles.append(optim_module.register_optimizer_step_pre_hook(self._on_step_pre))
        self._handles.append(optim_module.register_optimizer_step_post_hook(self._on_step_post))
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(partial(_pack, self._ledger), _unpack)
        self._saved_hooks.__enter__()

    def _uninstall_own(self) -> None:
        if self._saved_hooks is not None:
            hooks, self._saved_hooks = self._saved_hooks, None
            hooks.__exit__(None, None, None)
        self._ledger.active = False


    def _live_optimizers(self, optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
        self._optimizers[id(optimizer)] = weakref.ref(optimizer)
        alive = []
        for key, ref in list(self._optimizers.items()):
            opt = ref()
            if opt is None:
                del self._optimizers[key]  # freed: neither its grads' owner nor its state remain
            else:
                alive.append(opt)
        return alive

    def _on_step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Before the step every gradient it consumes exists; zero_grad(set_to_none) may drop
        # them right after, so this is the moment to look.
        grads = (
            p.grad
            for opt in self._live_optimizers(optimizer)
            for group in opt.param_groups
            for p in group["params"]
        )
        self._grad_bytes = max(self._grad_bytes, _unique_bytes(grads))

    def _on_step_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # State is created lazily by the first step, so it is complete only after it.
        state = (
            v
            for opt in self._live_optimizers(optimizer)
            for per_param in opt.state.values()
            for v in per_param.values()
        )
        self._optimizer_bytes = max(self._optimizer_bytes, _unique_bytes(state))


    @property
    def grad_bytes(self) -> int:
        """Largest gradient bytes seen at an optimizer step (0 without steps)."""
        return self._grad_bytes

    @property
    def optimizer_bytes(self) -> int:
        """Largest optimizer-state bytes seen after a step (0 without steps)."""
        return self._optimizer_bytes

    @property
    def peak_saved_bytes(self) -> int:
        """Peak of the live saved-for-backward bytes, parameters excluded."""
        return self._ledger.peak

    @property
    def live_saved_bytes(self) -> int:
        """Saved-for-backward bytes still held by graphs recorded under this meter, now."""
        return self._ledger.live

    @property
    def peak_bytes(self) -> int:
        return self._param_bytes + self._grad_bytes + self._optimizer_bytes + self._ledger.peak
