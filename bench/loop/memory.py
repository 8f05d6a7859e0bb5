"""Peak training memory of one client's local update (`mem/peak_train_bytes`) and the worker's
peak resident set (`mem/peak_rss_bytes`).

Use it around exactly one local update; the training code calls nothing, the meter observes
through global hooks while it is active:

    with MemoryMeter(device) as m:
        method.local_update(...)
    record({PEAK_TRAIN_METRIC: m.peak_bytes, PEAK_RSS_METRIC: peak_rss_bytes()})

Definition on CPU, parts (`live=False`, `--cpu-memory parts`; any device that is not CUDA)
--------------------------------------------------------------------------------------------
The CPU allocator keeps no peak statistic, and the process RSS mixes the update with everything
else the worker holds (datasets, other clients' models, allocator caches, the Python heap).
So we count the parts that dominate training memory, from the tensors themselves:

    peak = parameter bytes + gradient bytes + optimizer-state bytes + peak saved-for-backward bytes

* parameters: every `nn.Parameter` and buffer (e.g. BatchNorm running statistics) owned directly
  by a module whose forward runs while the meter is active (seen by the global forward pre-hook;
  a module that runs is counted, its idle siblings are not). Buffers count as parameter bytes.
* gradients: at every optimizer step (global step pre-hook) the `.grad` tensors of the params in
  the param_groups of every optimizer that has stepped in this update and is still alive; the
  largest such sum is kept. Several optimizers (e.g. Ditto's personal and global model) are
  summed because their gradients can be live at the same time.
* optimizer state: after every step (global step post-hook) the tensors in `optimizer.state` of
  those optimizers (momentum buffers, Adam moments and its 4-byte `step` scalars); the largest
  sum is kept.
* saved tensors: `torch.autograd.graph.saved_tensors_hooks` is active for the whole context. Each
  saved tensor is wrapped in a handle; a storage adds its `nbytes` to a live counter when the
  first handle to it appears and subtracts them when its last handle is freed (i.e. when
  autograd releases the graph after backward, or the graph is dropped). The counter is therefore
  the true live curve of activation memory, and its maximum is `peak_saved_bytes`. Storages of
  the parameters/buffers above are not counted again.

All counts are per *untyped storage*, each counted once: a view or slice of a tensor counts its
whole storage (that is what stays allocated), and a storage saved by several ops counts once.
Gradients and optimizer state are observed only when an optimizer steps; without a step they
are 0. The four maxima can occur at different moments, so the sum is a slight upper bound of
the true simultaneous peak, but it is deterministic, device-independent and it moves with what a
method changes (more iterations under autograd, bigger optimizer state, frozen parts).

Definition on CPU, live (`live=True`, `--cpu-memory live`: bench's runs use it by default)
-------------------------------------------------------------------------------------------
The parts above leave out tensors that no backward needs: a DEQ solver's iterates and Anderson
history (built under `no_grad`), a proximal term's temporaries, the returned state. For FeDEQ those
are most of the update (on an H200 the CUDA allocator read 9.8x the parts' count). With `live=True`
a `TorchDispatchMode` sees every operator call. An operator whose schema says no output aliases
an input (not in place, not `out=`, not a view; `_unsafe_view` is a view its schema does not
declare) returned new storages: their bytes join a live counter, and a `weakref.finalize` on each
storage takes them off when the storage is freed (a storage's Python object lives as long as the
storage, so the finalizer fires at the real free). Then

    peak = bytes of params/buffers of the modules that ran + peak of the live counter

which is what the CUDA definition below measures, less allocator rounding and the scratch a kernel
allocates inside itself. It costs 2.2-3.2x the metered update's time (FedRep on `mlp`, FeDEQ), which
`--cpu-memory parts` saves; the breakdown properties (`grad_bytes`, ...) stay 0 with `live=True`.

Definition on CUDA
------------------
The caching allocator keeps an exact high-water mark. On enter we reset it and record
`memory_allocated` as the baseline; then

    peak = max_memory_allocated - baseline + bytes of params/buffers of the modules that ran

The last term adds back the model, which is normally already on the device before the update
starts (and so sits in the baseline). It assumes exactly that: parameters created inside the
context would be counted twice. On CUDA only the forward pre-hook is installed;
`grad_bytes`, `optimizer_bytes` and `peak_saved_bytes` stay 0 (the allocator already covers them).
Before its first baseline on a device, a thread runs one tiny matmul forward and backward
(`warm_cuda`): cuBLAS allocates a workspace per handle and stream through the caching allocator on
first use (32 MiB on an H200; one for this thread, one for autograd's device thread), and without
the warm-up the first method metered in a process was charged ~68 MB that the next one was not.

Caveats
-------
* Only modules called as `module(x)` are seen; calling `module.forward(x)` directly skips hooks.
* Any `saved_tensors_hooks` pushed by the training code (e.g. non-reentrant checkpointing)
  take precedence inside their scope, so only what *they* save reaches our hook, which matches
  what actually stays in memory for checkpointing.
* PyTorch refuses `torch.func.{grad, vjp, jacrev, hessian}` while any saved-tensor hooks are
  active (RuntimeError "don't yet support saved tensor hooks"). `torch.func.jvp`,
  `torch.autograd.grad` and `torch.autograd.functional.*` work.
* PyTorch skips its in-place version check for tensors that went through saved-tensor hooks; the
  handle re-implements that check, so an in-place modification of a saved tensor still raises on
  backward, as it does without the meter.
* Only one meter may be active at a time in a process (the hooks are global); nesting raises.
"""
from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

import torch
import torch.nn.modules.module as nn_module
import torch.optim.optimizer as optim_module
from torch import nn
from torch.nn.parameter import is_lazy
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

PEAK_TRAIN_METRIC = "mem/peak_train_bytes"
PEAK_RSS_METRIC = "mem/peak_rss_bytes"

# The hooks are process-global, so at most one meter may observe at a time.
_active: MemoryMeter | None = None


def peak_rss_bytes() -> int:
    """The largest resident set size of this process so far, in bytes (0 where unknown).

    `ru_maxrss` is in KiB on Linux and in bytes on macOS. It is a high-water mark: it never goes
    down, so it describes the worker's whole life, not one update.
    """
    try:
        import resource
    except ImportError:  # Windows has no `resource`; the metric is then unavailable.
        return 0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


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


_warmed: set[tuple[int, int]] = set()  # (thread, device index) whose cuBLAS workspaces exist


def warm_cuda(device: torch.device) -> None:
    """Allocate what the first CUDA matmuls of this thread allocate once (cuBLAS and cuBLASLt
    workspaces for this thread's and autograd's handles), so a meter's baseline already holds them."""
    key = (threading.get_ident(), device.index or 0)
    if key in _warmed or not torch.cuda.is_available():
        return
    with torch.enable_grad():
        w = torch.ones(8, 8, device=device, requires_grad=True)
        # mm and addmm (Linear with a bias: cuBLASLt), forward and backward (autograd's thread)
        (torch.nn.functional.linear(w, w, w[0]) @ w).sum().backward()
    torch.cuda.synchronize(device)
    _warmed.add(key)


class MemoryMeter:
    """with MemoryMeter(device) as m: <one local update>;  m.peak_bytes

    See the module docstring for the definition. The numbers are final after exit; reading them
    inside the context gives the value so far. Entering the same meter again starts afresh.
    """

    def __init__(self, device: str | torch.device = "cpu", modules: Iterable[nn.Module] | None = None,
                 live: bool = False):
        """modules: the networks the update trains, when the caller knows them. Their parameters
        and buffers are counted on entry and the global forward pre-hook is not installed, which
        keeps every module call on torch's fast path (the hook costs ~15% on a small MLP).
        live: on CPU, count every storage operators allocate (the module docstring's `live=True`)."""
        self.device = torch.device(device)
        self._given = list(modules) if modules is not None else None
        self._cuda = self.device.type == "cuda"
        self._live = live and not self._cuda
        self._handles: list[RemovableHandle] = []
        self._saved_hooks: Any = None
        self._reset()

    def _reset(self) -> None:
        self._params: dict[int, int] = {}  # storage data_ptr -> nbytes, params and buffers
        self._param_bytes = 0
        self._modules: dict[int, weakref.ref] = {}  # id -> module already collected
        self._optimizers: dict[int, weakref.ref] = {}  # id -> optimizer that stepped
        self._grad_bytes = 0
        self._optimizer_bytes = 0
        self._ledger = _SavedLedger(self._params)
        self._cuda_baseline = 0
        self._cuda_peak = 0
        self._storages: _LiveStorages | None = None  # live=True on CPU: the dispatch mode

    # ----------------------------------------------------------------- context management
    def __enter__(self) -> MemoryMeter:
        global _active
        if _active is not None:
            which = "this meter" if _active is self else "another MemoryMeter"
            raise RuntimeError(
                f"MemoryMeter is not re-entrant: {which} is already active; the hooks are "
                "process-global, so measure one local update at a time"
            )
        if self._cuda:
            if not torch.cuda.is_available():
                raise RuntimeError(f"MemoryMeter({str(self.device)!r}): CUDA is not available")
            if self.device.index is None:  # pin "cuda" to the device in use now
                self.device = torch.device("cuda", torch.cuda.current_device())
        self._reset()
        _active = self
        try:
            if self._given is None:
                self._handles.append(nn_module.register_module_forward_pre_hook(self._on_forward))
            else:
                for root in self._given:
                    for m in root.modules():
                        self._on_forward(m, None)
            if self._cuda:
                warm_cuda(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                self._cuda_baseline = torch.cuda.memory_allocated(self.device)
            elif self._live:
                self._storages = _LiveStorages()
                self._storages.__enter__()
            else:
                self._handles.append(
                    optim_module.register_optimizer_step_pre_hook(self._on_step_pre)
                )
                self._handles.append(
                    optim_module.register_optimizer_step_post_hook(self._on_step_post)
                )
                self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(
                    partial(_pack, self._ledger), _unpack
                )
                self._saved_hooks.__enter__()
        except BaseException:
            self._uninstall()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cuda and _active is self:
            self._cuda_peak = torch.cuda.max_memory_allocated(self.device)
        self._uninstall()

    def _uninstall(self) -> None:
        """Remove every hook this meter installed; safe to call more than once."""
        global _active
        try:
            if self._saved_hooks is not None:
                hooks, self._saved_hooks = self._saved_hooks, None
                hooks.__exit__(None, None, None)
            if self._storages is not None and self._storages.active:
                self._storages.active = False  # storages freed later change nothing
                self._storages.__exit__(None, None, None)
        finally:
            while self._handles:
                self._handles.pop().remove()
            self._ledger.active = False
            if _active is self:
                _active = None

    # ------------------------------------------------------------------------ the hooks
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
            if self._cuda and t.device != self.device:
                continue  # a CPU module in a CUDA update is not device memory
            for ptr, nbytes in _storages(t):
                if ptr not in self._params:
                    self._params[ptr] = nbytes
                    self._param_bytes += nbytes
        if not lazy:
            self._modules[id(module)] = weakref.ref(module)

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

    # ----------------------------------------------------------------------- the results
    @property
    def param_bytes(self) -> int:
        """Bytes of the parameters and buffers of the modules that ran (storages counted once)."""
        return self._param_bytes

    @property
    def grad_bytes(self) -> int:
        """Largest gradient bytes seen at an optimizer step (0 on CUDA or without steps)."""
        return self._grad_bytes

    @property
    def optimizer_bytes(self) -> int:
        """Largest optimizer-state bytes seen after a step (0 on CUDA or without steps)."""
        return self._optimizer_bytes

    @property
    def peak_saved_bytes(self) -> int:
        """Peak of the live saved-for-backward bytes, parameters excluded (0 on CUDA)."""
        return self._ledger.peak

    @property
    def live_saved_bytes(self) -> int:
        """Saved-for-backward bytes still held by graphs recorded under this meter, now."""
        return self._ledger.live

    @property
    def peak_bytes(self) -> int:
        """The peak training memory of the update, per the module docstring's definition."""
        if self._cuda:
            top = self._cuda_peak
            if _active is self:  # read inside the context: the peak so far
                top = torch.cuda.max_memory_allocated(self.device)
            return max(0, top - self._cuda_baseline) + self._param_bytes
        if self._storages is not None:
            return self._param_bytes + self._storages.peak
        return self._param_bytes + self._grad_bytes + self._optimizer_bytes + self._ledger.peak

    def metrics(self) -> dict[str, int]:
        """Both memory metrics, under their recorded names."""
        return {PEAK_TRAIN_METRIC: self.peak_bytes, PEAK_RSS_METRIC: peak_rss_bytes()}
