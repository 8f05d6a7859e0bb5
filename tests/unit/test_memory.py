"""bench.loop.memory: exact byte counts of the CPU definition, hook hygiene, and peak RSS.

All tensors are float32 (4 bytes an element) unless said otherwise. Which tensors an op saves for
backward is PyTorch's choice; each test states what torch 2.13 saves, as observed with a plain
`saved_tensors_hooks` probe, so that a change in torch shows up here as an explained failure.
"""
from __future__ import annotations

import os
import subprocess
import sys
import typing

import numpy as np
import pytest
import torch
import torch.nn.modules.module as nn_module
import torch.optim.optimizer as optim_module
from torch import nn

from bench.loop import memory
from bench.loop.memory import CudaMeter, LiveMeter, PartsMeter, make_meter, peak_rss_bytes
from bench.loop.memory import cuda as cuda_meter

X_BYTES = 32 * 100 * 4  # 12800: a (32, 100) float32 activation
LINEAR_100_50 = (100 * 50 + 50) * 4  # 20200: weight + bias of nn.Linear(100, 50)


def _global_hook_counts() -> tuple[int, int, int]:
    return (
        len(nn_module._global_forward_pre_hooks),
        len(optim_module._global_optimizer_pre_hooks),
        len(optim_module._global_optimizer_post_hooks),
    )


def _saved_tensors_hooks_active() -> bool:
    # Private, but the only direct way to see whether a saved-tensors hook pair is still pushed.
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


# ------------------------------------------------------------------------- saved tensors
def test_saved_bytes_follow_the_live_curve():
    x = torch.randn(32, 100, requires_grad=True)
    with PartsMeter() as m:
        y = torch.exp(x)  # exp saves its output y: 32*100*4 = 12800 (x itself is not saved)
        assert m.live_saved_bytes == X_BYTES
        z = torch.exp(y)  # saves z: another 12800
        assert m.live_saved_bytes == 2 * X_BYTES
        z.sum().backward()  # sum saves no tensor; backward frees the graph's saved tensors
        assert m.live_saved_bytes == 0
        del y, z
    assert m.peak_saved_bytes == 25600  # 12800 + 12800, both live before backward
    assert m.live_saved_bytes == 0
    # no module ran and no optimizer stepped: peak is the saved part only
    assert (m.param_bytes, m.grad_bytes, m.optimizer_bytes) == (0, 0, 0)
    assert m.peak_bytes == 25600


def test_graph_dropped_without_backward_is_freed():
    # exp saves its own output. If the handle held the output itself, output -> grad_fn ->
    # handle -> output would be a cycle Python's GC cannot see through (the graph is C++), and
    # the 12800 bytes would leak; the meter holds a detached alias, so `del` frees them.
    x = torch.randn(32, 100, requires_grad=True)
    with PartsMeter() as m:
        y = torch.exp(x)
        assert m.live_saved_bytes == X_BYTES
        del y
        assert m.live_saved_bytes == 0
    assert m.peak_saved_bytes == X_BYTES


def test_same_storage_saved_twice_counts_once():
    x = torch.randn(32, 100, requires_grad=True)
    with PartsMeter() as m:
        y = x * x  # mul saves self and other: torch packs x twice (same storage) -> 12800 once
        assert m.live_saved_bytes == X_BYTES
        # Two disjoint halves of x are two views of ONE storage: the whole 12800-byte storage
        # stays allocated, and it is already counted, so nothing is added.
        y2 = x[:, :50] * x[:, 50:]
        assert m.live_saved_bytes == X_BYTES
        del y, y2
    assert m.peak_saved_bytes == 12800  # not 25600 (or 51200 for the four packs)


def test_no_grad_saves_nothing():
    x = torch.randn(32, 100, requires_grad=True)
    lin = nn.Linear(100, 50)
    with PartsMeter() as m:
        with torch.no_grad():
            torch.exp(torch.tanh(lin(x)))  # no graph is recorded, so nothing is packed
    assert m.peak_saved_bytes == 0
    assert m.param_bytes == LINEAR_100_50  # the module still ran: its params count
    assert m.peak_bytes == LINEAR_100_50


def _deq_update(no_grad_iterations: int) -> PartsMeter:
    torch.manual_seed(0)
    f = nn.Linear(50, 50)
    injection = torch.randn(32, 50)
    opt = torch.optim.SGD(f.parameters(), lr=0.01)
    with PartsMeter() as m:
        z = torch.zeros(32, 50)
        with torch.no_grad():  # the fixed-point solve: no graph, whatever the iteration count
            for _ in range(no_grad_iterations):
                z = torch.tanh(f(z) + injection)
        z = torch.tanh(f(z) + injection)  # one step under autograd
        z.pow(2).sum().backward()
        opt.step()
    return m


def test_no_grad_iterations_do_not_change_saved_bytes():
    few, many = _deq_update(5), _deq_update(50)
    # The grad step saves: linear (addmm) saves its input z (32*50*4 = 6400; the weight, a
    # parameter, is not saved since z needs no grad); `+ injection` saves nothing; tanh saves
    # its output (6400); pow(2) saves its input, which IS tanh's output storage -> not again.
    assert few.peak_saved_bytes == many.peak_saved_bytes == 12800
    assert few.param_bytes == many.param_bytes == (50 * 50 + 50) * 4  # 10200
    assert few.grad_bytes == many.grad_bytes == 10200  # plain SGD: no state
    assert few.optimizer_bytes == many.optimizer_bytes == 0
    assert few.peak_bytes == many.peak_bytes == 10200 + 10200 + 0 + 12800  # 33200


def test_storage_less_tensors_count_zero():
    with PartsMeter() as m:
        t = torch.randn(10, device="meta", requires_grad=True)
        torch.exp(t)  # saves a meta output: storage data_ptr 0, no memory
        sparse = torch.randn(4, 4).to_sparse()
        dense = torch.randn(4, 3, requires_grad=True)
        torch.sparse.mm(sparse, dense).sum().backward()  # saves only the sparse operand
        assert dense.grad is not None
    assert m.peak_saved_bytes == 0


def test_inplace_modification_of_a_saved_tensor_still_raises():
    # torch skips its version check for tensors that went through saved-tensor hooks; the meter
    # restores it, so training under the meter fails exactly where it fails without it.
    x = torch.randn(5, requires_grad=True)
    with PartsMeter():
        y = torch.exp(x)
        y.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_gradients_are_unchanged_by_the_meter_including_double_backward():
    def grads() -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        x = torch.randn(8, 4, requires_grad=True)
        y = torch.exp(torch.tanh(x)).pow(2).sum()
        (g,) = torch.autograd.grad(y, x, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), x)
        return g.detach(), gg

    plain = grads()
    with PartsMeter():
        metered = grads()
    assert torch.equal(plain[0], metered[0]) and torch.equal(plain[1], metered[1])


# ---------------------------------------------------------- parameters, grads, optimizer state
@pytest.mark.parametrize("input_requires_grad", [False, True])
def test_linear_sgd_momentum(input_requires_grad: bool):
    torch.manual_seed(0)
    lin = nn.Linear(100, 50)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(32, 100, requires_grad=input_requires_grad)
    with PartsMeter() as m:
        lin(x).sum().backward()
        opt.step()
    assert m.param_bytes == LINEAR_100_50  # (100*50 + 50) * 4 = 20200
    assert m.grad_bytes == LINEAR_100_50  # one grad per param, same shapes
    assert m.optimizer_bytes == LINEAR_100_50  # one momentum_buffer per param
    # addmm(bias, x, weight.t()) saves x (for the weight grad) = 32*100*4 = 12800. When x needs
    # a grad it also saves weight.t(), a view of the weight's storage: excluded as a parameter
    # (it would add 20000). The bias is not saved; sum saves nothing.
    assert m.peak_saved_bytes == X_BYTES
    assert m.peak_bytes == 3 * LINEAR_100_50 + X_BYTES  # 60600 + 12800 = 73400


def test_adam_state_includes_step_scalars():
    lin = nn.Linear(100, 50)
    opt = torch.optim.Adam(lin.parameters())
    with PartsMeter() as m:
        lin(torch.randn(32, 100)).sum().backward()
        opt.step()
    # exp_avg + exp_avg_sq per param (2 * 20200) plus a float32 `step` scalar tensor per param
    # (2 params * 4 bytes): 40400 + 8 = 40408
    assert m.optimizer_bytes == 2 * LINEAR_100_50 + 2 * 4
    assert m.peak_bytes == LINEAR_100_50 + LINEAR_100_50 + 40408 + X_BYTES  # 93608


def test_frozen_module_counts_params_but_no_grads():
    frozen = nn.Linear(100, 50).requires_grad_(False)
    head = nn.Linear(50, 10)
    net = nn.Sequential(frozen, head)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)  # frozen params are in it but get no grad
    with PartsMeter() as m:
        net(torch.randn(32, 100)).sum().backward()
        opt.step()
    head_bytes = (50 * 10 + 10) * 4  # 2040
    assert m.param_bytes == LINEAR_100_50 + head_bytes  # 22240: frozen params still resident
    assert m.grad_bytes == head_bytes  # frozen .grad is None: 0 of the 2040
    assert m.optimizer_bytes == 0  # SGD without momentum keeps no tensors
    # The frozen layer records no graph (nothing needs a grad). The head's addmm saves its input
    # h (32*50*4 = 6400) for the weight grad; h needs no grad, so weight.t() is not saved.
    assert m.peak_saved_bytes == 32 * 50 * 4
    assert m.peak_bytes == 22240 + 2040 + 0 + 6400  # 30680


def test_buffers_count_as_params_and_are_not_saved():
    bn = nn.BatchNorm1d(100)
    x = torch.randn(32, 100, requires_grad=True)
    with PartsMeter() as m:
        bn(x).sum().backward()
    # weight + bias (2*100*4 = 800) + running_mean + running_var (800) + num_batches_tracked
    # (one int64, 8): 1608
    assert m.param_bytes == 1608
    # native_batch_norm saves x (12800), weight, running_mean, running_var (parameter/buffer
    # storages: excluded) and save_mean + save_invstd (2*100*4 = 800): 13600
    assert m.peak_saved_bytes == X_BYTES + 800
    assert (m.grad_bytes, m.optimizer_bytes) == (0, 0)  # no optimizer step happened
    assert m.peak_bytes == 1608 + 13600


def test_tied_parameter_counts_once():
    a = nn.Linear(100, 100, bias=False)
    b = nn.Linear(100, 100, bias=False)
    b.weight = a.weight  # one storage, owned by two modules
    with PartsMeter() as m:
        b(a(torch.randn(4, 100)))
    assert m.param_bytes == 100 * 100 * 4  # 40000, not 80000


def test_two_live_optimizers_are_summed():
    # Ditto-like: two models, each with its own optimizer, gradients of both alive at once.
    a, b = nn.Linear(100, 50), nn.Linear(100, 10)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(32, 100)
    with PartsMeter() as m:
        a(x).sum().backward()
        opt_a.step()  # grads 20200, state 20200
        b(x).sum().backward()
        opt_b.step()  # a's grads were not cleared: 20200 + 4040 live together
    b_bytes = (100 * 10 + 10) * 4  # 4040
    assert m.grad_bytes == LINEAR_100_50 + b_bytes  # 24240
    assert m.optimizer_bytes == LINEAR_100_50 + b_bytes  # both momentum buffers persist


# ----------------------------------------------------------------------------- hook hygiene
def test_hooks_removed_on_exit_and_on_exception():
    before = _global_hook_counts()
    lin = nn.Linear(100, 50)
    x = torch.randn(32, 100, requires_grad=True)

    with PartsMeter() as ok:
        assert _global_hook_counts() == (before[0] + 1, before[1] + 1, before[2] + 1)
        assert _saved_tensors_hooks_active()
        lin(x).sum().backward()
    assert _global_hook_counts() == before and not _saved_tensors_hooks_active()

    with pytest.raises(ValueError, match="boom"):
        with PartsMeter() as failed:
            y = torch.exp(lin(x))  # params 20200; saves x, weight.t() (excluded), exp output
            raise ValueError("boom")
    assert _global_hook_counts() == before and not _saved_tensors_hooks_active()
    assert memory.active_meter() is None
    frozen_numbers = (failed.param_bytes, failed.peak_saved_bytes, failed.peak_bytes)
    assert frozen_numbers == (LINEAR_100_50, X_BYTES + 32 * 50 * 4, 20200 + 12800 + 6400)

    # Work after exit is invisible to the finished meters.
    other = nn.Linear(100, 20)
    opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    torch.exp(other(x)).sum().backward()
    opt.step()
    assert (failed.param_bytes, failed.peak_saved_bytes, failed.peak_bytes) == frozen_numbers
    assert (failed.grad_bytes, failed.optimizer_bytes) == (0, 0)
    assert ok.peak_bytes == LINEAR_100_50 + X_BYTES  # no step inside: 20200 + 12800
    del y  # the graph from inside the failed meter frees its handles late: live drops only
    assert failed.live_saved_bytes == 0 and failed.peak_saved_bytes == X_BYTES + 6400


def test_nested_meters_raise():
    before = _global_hook_counts()
    outer = PartsMeter()
    with outer:
        with pytest.raises(RuntimeError, match="not re-entrant"):
            with PartsMeter():
                pass
        with pytest.raises(RuntimeError, match="not re-entrant"):
            with outer:  # the same meter again
                pass
        torch.exp(torch.randn(32, 100, requires_grad=True))  # the outer one still measures
        assert outer.peak_saved_bytes == X_BYTES
    assert _global_hook_counts() == before and memory.active_meter() is None


def test_sequential_uses_are_independent():
    lin = nn.Linear(100, 50)
    x = torch.randn(32, 100)
    with PartsMeter() as first:
        lin(x).sum().backward()
    with PartsMeter() as second:
        torch.exp(torch.randn(8, 10, requires_grad=True))  # saves 8*10*4 = 320, no module
    assert (first.param_bytes, first.peak_saved_bytes) == (LINEAR_100_50, X_BYTES)
    assert (second.param_bytes, second.peak_saved_bytes) == (0, 320)

    reused = PartsMeter()
    for _ in range(2):  # entering again starts from zero, it does not accumulate
        with reused:
            lin(x).sum().backward()
        assert reused.peak_bytes == LINEAR_100_50 + X_BYTES  # 33000


# ----------------------------------------------------------------------------------- CUDA
# ------------------------------------------------------------------ LiveMeter (--cpu-memory live)
def test_live_counts_every_storage_operators_allocate_while_it_is_alive():
    lin = nn.Linear(10, 10)  # params (100 + 10) * 4 = 440 bytes, before the meter (as a method's net)
    with LiveMeter("cpu", modules=[lin]) as live:
        with torch.no_grad():  # nothing here is saved for backward: the parts count sees none of it
            a = torch.ones(1000)        # 4,000 B live
            del a                       # freed: 0
            b = torch.ones(500)         # 2,000
            c = b.view(2, 250)          # a view of b's storage: nothing new
            b.add_(1)                   # in place: nothing new
            torch.add(b, 1, out=b)      # out=: nothing new
            d = torch.empty(250)        # 1,000: 3,000 live, below the 4,000 peak
        assert live.peak_bytes == 440 + 4000
        e = torch.ones(1500)            # 6,000 more: 9,000 live
    assert live.peak_bytes == 440 + 9000 and not hasattr(live, "grad_bytes")  # the breakdown is PartsMeter's
    del b, c, d, e  # freed after exit: the finished meter's numbers stay
    assert live.peak_bytes == 440 + 9000 and memory.active_meter() is None
    with PartsMeter("cpu", modules=[lin]) as parts:  # params + grads + opt + saved
        with torch.no_grad():
            torch.ones(1000)
    assert parts.peak_bytes == 440


def test_live_sees_what_backward_and_the_optimizer_allocate_and_changes_no_number():
    torch.manual_seed(0)
    lin = nn.Linear(100, 50)
    x = torch.randn(32, 100)
    states = {}
    for live in (False, True):
        net = nn.Linear(100, 50)
        net.load_state_dict(lin.state_dict())
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        with make_meter("cpu", modules=[net], cpu="live" if live else "parts") as m:
            torch.exp(net(x)).sum().backward()
            opt.step()
        states[live] = ({k: v.clone() for k, v in net.state_dict().items()}, m.peak_bytes)
    (w_parts, parts), (w_live, live) = states[False], states[True]
    assert all(torch.equal(w_parts[k], w_live[k]) for k in w_parts)  # metering changes no number
    # parts: params + grads + momentum (20,200 each) + saved peak (x, 12,800, and exp's output, 6,400).
    assert parts == 3 * LINEAR_100_50 + X_BYTES + 32 * 50 * 4
    # live: params + the peak of what the update allocated. Backward holds at most exp's output
    # (6,400, saved) + a scalar ones (4) + exp's grad (6,400) + the new grads (20,200) = 33,004; the
    # step then holds the grads and the new momentum buffers, 40,400, once backward freed the rest.
    # x existed before and is not the update's; the parts count it as saved.
    assert live == LINEAR_100_50 + 2 * LINEAR_100_50


def test_live_fedeq_update_counts_the_solver_working_set_the_parts_leave_out():
    # FeDEQ on deq_mlp, 40 Fashion-MNIST-like samples, batch 10 (bench/perf/workloads.py; the peaks
    # are per batch, so 40 samples give the parts meter the same peak as 480): its Anderson history
    # and iterates are built under no_grad, which the parts meter does not see. The history alone is
    # X and F, m = 5 iterates of (10, 128) float32: 2 x 5 x 10 x 128 x 4 = 51,200 B. Measured on
    # torch 2.13 with the default adjoint (normal_cg): parts 2,189,452 B, live 2,953,944 B (on 480
    # samples: the same parts, live 3,051,184 B; torch's profiler, profile_memory=True, gives the same
    # peak of live allocations); on an H200 the CUDA allocator read 9.8x the parts on another task.
    from bench.perf.workloads import update_setup

    update, algo = update_setup("fedeq", "deq_mlp", 40)
    update()
    with PartsMeter("cpu", modules=[algo.net]) as parts:
        update()
    with LiveMeter("cpu", modules=[algo.net]) as live:
        update()
    assert live.param_bytes == parts.param_bytes
    assert live.peak_bytes >= parts.peak_bytes + 2 * 5 * 10 * 128 * 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CUDA-less error")
def test_cuda_meter_without_cuda_raises_clearly():
    before = _global_hook_counts()
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        with CudaMeter("cuda"):
            pass
    assert memory.active_meter() is None and _global_hook_counts() == before


def test_cuda_arithmetic_with_a_fake_allocator(monkeypatch: pytest.MonkeyPatch):
    # Without a GPU, fake the allocator statistics to check the formula and that only the
    # forward pre-hook is installed on CUDA.
    stats = {"allocated": 1000, "max": 1000}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: stats["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: stats["max"])
    monkeypatch.setattr(cuda_meter, "warm_cuda", lambda device: None)  # real matmuls: test_cuda_first_meter_...
    before = _global_hook_counts()
    with CudaMeter("cuda") as m:
        assert _global_hook_counts() == (before[0] + 1, before[1], before[2])
        assert not _saved_tensors_hooks_active()
        torch.exp(nn.Linear(100, 50)(torch.randn(32, 100)))  # CPU module: not device memory
        stats["max"] = 5000
        assert m.peak_bytes == 4000  # read inside: peak so far
    stats["max"] = 9000  # after exit the recorded value stays
    assert m.peak_bytes == 5000 - 1000 + 0  # max - baseline + device params (none)
    assert m.param_bytes == 0 and not hasattr(m, "grad_bytes")  # the allocator covers grads, state, saved
    assert _global_hook_counts() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_real_allocator():
    lin = nn.Linear(1000, 1000).cuda()  # on the device before the meter: in the baseline
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(256, 1000, device="cuda")
    with CudaMeter("cuda") as m:
        lin(x).sum().backward()
        opt.step()
    params = (1000 * 1000 + 1000) * 4  # 4004000
    assert m.param_bytes == params
    # allocator growth holds at least grads + momentum (2 * params); the allocator rounds up
    assert m.peak_bytes >= 3 * params


FIRST_METER = """
import torch
from torch import nn
from bench.loop.memory import CudaMeter
lin = nn.Linear(64, 64).cuda()
x = torch.randn(32, 64, device="cuda")
peaks = []
for _ in range(2):
    lin.zero_grad(set_to_none=True)  # each update allocates its grads, as a local update's first step does
    with CudaMeter("cuda", modules=[lin]) as m:
        lin(x).sum().backward()
    peaks.append(m.peak_bytes)
print(peaks[0], peaks[1])
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_first_meter_in_a_process_is_not_charged_cublas_workspaces():
    # A fresh process: its first matmuls allocate cuBLAS workspaces (32 MiB each on an H200). The
    # first meter must read about what the second reads: params 64*64+64 floats (16,640 B), the
    # grads (16,640 B) and activations, well under 1 MB; before warm_cuda the first read ~68 MB.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", FIRST_METER], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])})
    assert out.returncode == 0, out.stderr
    first, second = map(int, out.stdout.split())
    assert 2 * 16_640 <= min(first, second) and max(first, second) < 10**6


# ------------------------------------------------------------------------------------- RSS
def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_peak_rss_grows_with_a_touched_buffer():
    before_peak = peak_rss_bytes()
    before_now = _current_rss_bytes()
    assert before_peak > 0
    buf = np.ones(200_000_000 // 8)  # 200 MB of float64, every page written by ones()
    after_peak = peak_rss_bytes()
    del buf
    assert after_peak >= before_peak  # a high-water mark never goes down
    # The peak may already sit above the current RSS (earlier, freed allocations), so compare
    # with the RSS right before: resident went up by ~200 MB, allow 50 MB for slack.
    assert after_peak >= before_now + 150_000_000


def test_make_meter_is_the_one_factory_with_the_runs_default():
    """One default, the run's (`--cpu-memory live`): make_meter's `cpu` default and RunConfig's agree."""
    import dataclasses

    from bench.config import RunConfig
    from bench.loop.memory import CPU_METERS

    default = {f.name: f.default for f in dataclasses.fields(RunConfig)}["cpu_memory"]
    assert type(make_meter("cpu")) is CPU_METERS[default] is LiveMeter
    assert type(make_meter("cpu", cpu="parts")) is PartsMeter
    assert type(make_meter("cuda:0", cpu="parts")) is CudaMeter  # the allocator whatever the CPU choice
    assert set(CPU_METERS) == set(typing.get_args(RunConfig.__annotations__["cpu_memory"]) or CPU_METERS)
    with pytest.raises(ValueError, match="unknown CPU memory meter 'rss'; choose from live, parts"):
        make_meter("cpu", cpu="rss")
