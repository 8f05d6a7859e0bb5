"""What every memory meter shares: the parameters and buffers of the modules that ran, the rule that
one meter observes at a time (the hooks are process-global), and the context-manager protocol. A
meter subclass installs its own observation in `_install` and removes it in `_uninstall_own`."""
from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.modules.module as nn_module
from torch import nn
from torch.nn.parameter import is_lazy
from torch.utils.hooks import RemovableHandle

_active: MemoryMeter | None = None
"""The meter observing now, if any (at most one per process)."""


def active_meter() -> MemoryMeter | None:
    """The meter observing now, or None."""
    return _active


def _storages(t: torch.Tensor) -> Iterator[tuple[int, int]]:
    """(data_ptr, nbytes) of each storage that holds `t`'s data; none for meta/empty tensors.

    Sparse tensors have no storage of their own: their index and value tensors are counted
    (a sparse gradient from `nn.Embedding(sparse=True)` is real memory).
    """
    if t.layout is torch.strided:
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
            return
        ptr = s.data_ptr()
        if ptr:  # 0: meta tensor or zero-size storage, which hold no memory
            yield ptr, s.nbytes()
        return
    parts: tuple[torch.Tensor, ...]
    if t.layout is torch.sparse_coo:
        parts = (t._indices(), t._values())
    elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = (t.crow_indices(), t.col_indices(), t.values())
    elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
        parts = (t.ccol_indices(), t.row_indices(), t.values())
    else:
        return
    for p in parts:
        yield from _storages(p)


def _unique_bytes(tensors: Iterator[Any]) -> int:
    """Total bytes of the distinct storages behind `tensors` (non-tensors are ignored)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if t.layout is torch.strided:  # inline fast path: this runs over every param per step
            try:
                s = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            if s.data_ptr():
                seen[s.data_ptr()] = s.nbytes()
        else:
            for ptr, nbytes in _storages(t):
                seen[ptr] = nbytes
    return sum(seen.values())


class MemoryMeter:
    """with meter as m: <one local update>;  m.peak_bytes

    The numbers are final after exit; reading them inside the context gives the value so far.
    Entering the same meter again starts afresh. Use `make_meter` (the package) to get one.
    """

    def __init__(self, device: str | torch.device = "cpu", modules: Iterable[nn.Module] | None = None):
        """modules: the networks the update trains, when the caller knows them. Their parameters
        and buffers are counted on entry and the global forward pre-hook is not installed, which
        keeps every module call on torch's fast path (the hook costs ~15% on a small MLP)."""
        self.device = torch.device(device)
        self._given = list(modules) if modules is not None else None
        self._handles: list[RemovableHandle] = []
        self._reset()

    def _reset(self) -> None:
        self._params: dict[int, int] = {}  # storage data_ptr -> nbytes, params and buffers
        self._param_bytes = 0
        self._modules: dict[int, weakref.ref] = {}  # id -> module already collected

    def _install(self) -> None:
        """Start this meter's own observation (after the parameter hook)."""

    def _uninstall_own(self) -> None:
        """Stop this meter's own observation; safe to call more than once."""

    def _counts(self, t: torch.Tensor) -> bool:
        """Whether a parameter or buffer's memory is this meter's (CudaMeter: on its device)."""
        return True

    # ----------------------------------------------------------------- context management
    def __enter__(self) -> MemoryMeter:
        global _active
        if _active is not None:
            which = "this meter" if _active is self else "another MemoryMeter"
            raise RuntimeError(
                f"MemoryMeter is not re-entrant: {which} is already active; the hooks are "
                "process-global, so measure one local update at a time"
            )
        self._reset()
        _active = self
        try:
            if self._given is None:
                self._handles.append(nn_module.register_module_forward_pre_hook(self._on_forward))
            else:
                for root in self._given:
                    for m in root.modules():
                        self._on_forward(m, None)
            self._install()
        except BaseException:
            self._uninstall()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._uninstall()

    def _uninstall(self) -> None:
        """Remove every hook this meter installed; safe to call more than once."""
        global _active
        try:
            self._uninstall_own()
        finally:
            while self._handles:
                self._handles.pop().remove()
            if _active is self:
                _active = None

    def _on_forward(self, module: nn.Module, args: Any) -> None:
        ref = self._modules.get(id(module))
        if ref is not None and ref() is module:  # collected before: one dict lookup per call
            return
        lazy = False
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is None:
                continue
            if is_lazy(t):  # materialised by the module's own pre-hook, after ours: retry
                lazy = True
                continue
            if not self._counts(t):
                continue
            for ptr, nbytes in _storages(t):
                if ptr not in self._params:
                    self._params[ptr] = nbytes
                    self._param_bytes += nbytes
        if not lazy:
            self._modules[id(module)] = weakref.ref(module)

    # ----------------------------------------------------------------------- the results
    @property
    def param_bytes(self) -> int:
        """Bytes of the parameters and buffers of the modules that ran (storages counted once)."""
        return self._param_bytes

    @property
    def peak_bytes(self) -> int:
        """The peak training memory of the update, per the package docstring's definition."""
        raise NotImplementedError

    def metrics(self) -> dict[str, int]:
        """Both memory metrics, under their recorded names."""
        from bench.loop.memory import PEAK_RSS_METRIC, PEAK_TRAIN_METRIC, peak_rss_bytes

        return {PEAK_TRAIN_METRIC: self.peak_bytes, PEAK_RSS_METRIC: peak_rss_bytes()}
