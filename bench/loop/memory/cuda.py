"""CudaMeter: the CUDA caching allocator's high-water mark over the update, less its baseline, plus
the parameters of the modules that ran (the package docstring)."""
from __future__ import annotations

import threading

import torch

from bench.loop.memory import base
from bench.loop.memory.base import MemoryMeter

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


class CudaMeter(MemoryMeter):
    """max_memory_allocated - baseline + params of the modules that ran, on one CUDA device."""

    def _reset(self) -> None:
        super()._reset()
        self._cuda_baseline = 0
        self._cuda_peak = 0

    def _counts(self, t: torch.Tensor) -> bool:
        return t.device == self.device  # a CPU module in a CUDA update is not device memory

    def __enter__(self) -> CudaMeter:
        if base.active_meter() is None:  # else the base refuses with its one message
            if not torch.cuda.is_available():
                raise RuntimeError(f"MemoryMeter({str(self.device)!r}): CUDA is not available")
            if self.device.index is None:  # pin "cuda" to the device in use now
                self.device = torch.device("cuda", torch.cuda.current_device())
        super().__enter__()
        return self

    def _install(self) -> None:
        warm_cuda(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._cuda_baseline = torch.cuda.memory_allocated(self.device)

    def __exit__(self, *exc: object) -> None:
        if base.active_meter() is self:
            self._cuda_peak = torch.cuda.max_memory_allocated(self.device)
        super().__exit__(*exc)

    @property
    def peak_bytes(self) -> int:
        top = self._cuda_peak
        if base.active_meter() is self:  # read inside the context: the peak so far
            top = torch.cuda.max_memory_allocated(self.device)
        return max(0, top - self._cuda_baseline) + self._param_bytes
