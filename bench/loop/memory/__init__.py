"""Peak training memory of one client's local update (`mem/peak_train_bytes`) and the worker's
peak resident set (`mem/peak_rss_bytes`).

Use it around exactly one local update; the training code calls nothing, the meter observes
through global hooks while it is active:

    with make_meter(device, modules=[net]) as m:     # LiveMeter on CPU (the default), CudaMeter on CUDA
        method.local_update(...)
    record({PEAK_TRAIN_METRIC: m.peak_bytes, PEAK_RSS_METRIC: peak_rss_bytes()})

Three meters, one class each (one module each in this package), all `MemoryMeter`s: `PartsMeter`
(parts.py), `LiveMeter` (live.py) and `CudaMeter` (cuda.py). `make_meter` is the one factory: a CUDA
device gets CudaMeter; on CPU `cpu="live"` (the default, as `--cpu-memory`'s) gets LiveMeter and
`cpu="parts"` PartsMeter. What they share (the parameter count, the one-meter-at-a-time rule) is
base.py's MemoryMeter.

Definition on CPU, parts (PartsMeter, `--cpu-memory parts`)
-----------------------------------------------------------
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

Definition on CPU, live (LiveMeter, `--cpu-memory live`: the default)
---------------------------------------------------------------------
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

Definition on CUDA (CudaMeter)
------------------------------
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

import torch
from torch import nn

from bench.loop.memory.base import MemoryMeter, active_meter
from bench.loop.memory.cuda import CudaMeter
from bench.loop.memory.live import LiveMeter
from bench.loop.memory.parts import PartsMeter

__all__ = ["CPU_METERS", "CudaMeter", "LiveMeter", "MemoryMeter", "PartsMeter", "active_meter", "make_meter",
           "peak_rss_bytes"]

PEAK_TRAIN_METRIC = "mem/peak_train_bytes"
PEAK_RSS_METRIC = "mem/peak_rss_bytes"

CPU_METERS = {"live": LiveMeter, "parts": PartsMeter}
"""`--cpu-memory` names: the meter a CPU update gets."""


def make_meter(device: str | torch.device = "cpu", modules: list[nn.Module] | None = None,
               cpu: str = "live") -> MemoryMeter:
    """The meter of one local update on `device`: CudaMeter on a CUDA device, else `CPU_METERS[cpu]`
    (LiveMeter by default). `modules`: the networks the update trains, when known (base.py)."""
    if torch.device(device).type == "cuda":
        return CudaMeter(device, modules)
    if cpu not in CPU_METERS:
        raise ValueError(f"unknown CPU memory meter {cpu!r}; choose from {', '.join(CPU_METERS)}")
    return CPU_METERS[cpu](device, modules)


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
