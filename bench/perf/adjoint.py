"""`python -m bench.perf --adjoint`: the implicit backward's adjoint solvers, measured side by side.

For each DEQ model, on real Fashion-MNIST test images, at initialization and after `steps` SGD steps
(lr 0.01, batches of other images, the default solvers), one SGD step (forward, backward, optimizer
step) on a fixed check batch per backward setting: every registered `b_solver` with the layer's
b_max_iter / b_tol, then backward="jfb" and "phantom". Columns:

* cos: cosine between the step's gradient of the DEQ block's parameters and the exact implicit
  gradient at the same z* (the adjoint solved in float64 by scipy to a relative residual of 1e-8,
  `exact_adjoint`; every setting shares the same forward solve, hence the same z* and dL/dz*);
* products: adjoint products over the whole batch, VJPs (+ JVPs for normal_cg, whose first JVP forms
  its right-hand side); the fixed-point solvers' steps; phantom's unrolled applications of f;
* b_res: the adjoint's largest reported residual, in the solver's own unit (methods/deq/adjoint.py);
* s/step: seconds of the step without the meter (median of `repeats`);
* peak MB: the live meter's peak (bench/loop/memory/live.py: parameters plus every storage the step
  allocates while it is alive), a separate metered run of the same step.

Batches are the paper presets' (configs/paper/): FEMNIST 10 for deq_resnet_s(_ref), CIFAR 20 for
deq_resnet_m(_ref); deq_mlp takes the default run's 32 (configs/default.toml). The 3-channel 32x32
models get each 28x28 image zero-padded by 2 pixels on every side and repeated over 3 channels.
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.loop.memory import make_meter
from bench.report import text
from fedeq_bench.methods.deq import DEQ

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MODELS = ("deq_mlp", "deq_resnet_s", "deq_resnet_s_ref", "deq_resnet_m", "deq_resnet_m_ref")
DEFAULT_MODELS = ("deq_mlp", "deq_resnet_s", "deq_resnet_s_ref")  # the M models take ~10x longer each
BATCH = {"deq_mlp": 32, "deq_resnet_s": 10, "deq_resnet_s_ref": 10, "deq_resnet_m": 20, "deq_resnet_m_ref": 20}
LR = 0.01  # the paper presets' FEMNIST and CIFAR-10 lr
EXACT_RTOL = 1e-8  # ample for 4-decimal cosines; the unit tests ask 1e-10
MIN_COS = 0.99  # pick_default's bar on the gradient cosine to the exact solve


def fmnist_images(n: int, data_dir: Path = FMNIST_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n Fashion-MNIST test images as float32 (n, 1, 28, 28) in [0, 1], and their labels,
    read with the project's loader (datasets/fmnist.py)."""
    from fedeq_bench.core.errors import BenchError
    from fedeq_bench.datasets.fmnist import parse_idx, read_member, to_float

    files = [data_dir / f"t10k-{k}-idx{d}-ubyte.gz" for k, d in (("images", 3), ("labels", 1))]
    if not all(f.is_file() for f in files):
        raise BenchError(f"--adjoint needs the Fashion-MNIST test files in {data_dir} "
                         "(Debian package dataset-fashion-mnist)")
    images = parse_idx(read_member(files[0]), str(files[0]))[:n]
    labels = parse_idx(read_member(files[1]), str(files[1]))[:n]
    return torch.from_numpy(to_float(images)), torch.from_numpy(labels.astype(np.int64))


def as_input(x: torch.Tensor, model: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(images shaped for `model`, its input shape): 3x32x32 for the M models (pad 2, repeat channels)."""
    if model.startswith("deq_resnet_m"):
        x = F.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    return x, tuple(x.shape[1:])


def exact_adjoint(func: nn.Module, z_star: torch.Tensor, x: torch.Tensor, v: torch.Tensor,
                  rtol: float = EXACT_RTOL) -> tuple[torch.Tensor, float]:
    """The exact implicit gradient of func's parameters at z*: g = (I - J^T)^-1 v solved in float64
    by scipy's BiCGStab on VJPs (scipy's GMRES where it stalls) to a relative residual of rtol;
    returns (flattened gradient, true residual)."""
    import scipy.sparse.linalg as sla

    f64 = copy.deepcopy(func).double()
    z = z_star.detach().double().requires_grad_()
    fz = f64(z, x.detach().double())
    shape, n = v.shape, v.numel()

    def matvec(u):
        u = torch.from_numpy(np.ascontiguousarray(u, dtype=np.float64)).view(shape)
        return (u - torch.autograd.grad(fz, z, u, retain_graph=True)[0]).numpy().ravel()

    b = v.detach().double().numpy().ravel()
    op = sla.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    g, info = sla.bicgstab(op, b, rtol=rtol, atol=0.0, maxiter=300)
    if info != 0:
        g, info = sla.gmres(op, b, rtol=rtol, atol=0.0, restart=300, maxiter=2)
    res = float(np.linalg.norm(matvec(g) - b) / np.linalg.norm(b))
    grads = torch.autograd.grad(fz, list(f64.parameters()), torch.from_numpy(g).view(shape))
    return torch.cat([t.flatten() for t in grads]), res


def settings() -> list[tuple[str, dict]]:
    """(row label, DEQ.configure kwargs): every registered b_solver, then jfb and phantom."""
    from fedeq_bench.methods.deq.adjoint import ADJOINT_SOLVERS

    rows = [(f"implicit, {name}", {"backward": "implicit", "b_solver": name}) for name in ADJOINT_SOLVERS.names()]
    return rows + [("jfb", {"backward": "jfb"}), ("phantom", {"backward": "phantom"})]


def _products(cfg: dict, stats: dict | None, phantom_steps: int) -> str:
    if cfg["backward"] == "jfb":
        return "0"
    if cfg["backward"] == "phantom":
        return f"{phantom_steps} f"
    n = int(stats["nstep"].max()) if stats else 0
    return f"{n}+{n + 1}" if cfg["b_solver"] == "normal_cg" else str(n)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def _deq(model: nn.Module) -> DEQ:
    """The model's DEQ layer (every DEQ model here has it at body.deq)."""
    layer = model.get_submodule("body.deq")
    assert isinstance(layer, DEQ), type(layer)
    return layer


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, capture: bool = False) -> dict:
    """One SGD step on (x, y); with capture, also the DEQ's injection, z0 and dL/dz, and the DEQ
    block's gradient before the update."""
    layer, out = _deq(model), {}
    handle = None
    if capture:
        def hook(mod, args, kwargs, z):
            out["x"], out["z0"] = args[0].detach(), kwargs.get("z0")
            z.register_hook(lambda g: out.__setitem__("v", g.detach()))

        handle = layer.register_forward_hook(hook, with_kwargs=True)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    opt.zero_grad(set_to_none=True)
    try:
        F.cross_entropy(model(x), y).backward()
    finally:
        if handle is not None:
            handle.remove()
    out["grad"] = torch.cat([p.grad.flatten() for p in layer.func.parameters() if p.grad is not None])
    opt.step()
    return out


def model_rows(model_name: str, images: torch.Tensor, labels: torch.Tensor, steps: int, repeats: int,
               seed: int = 0) -> list[tuple]:
    """The table's rows for one model: per phase (init, after `steps` steps), the exact solve, then
    each backward setting."""
    from fedeq_bench.methods.nets import build_model

    batch = BATCH[model_name]
    x_all, shape = as_input(images, model_name)
    check_x, check_y = x_all[:batch], labels[:batch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(model_name, shape, 10).train()
    layer = _deq(model)
    defaults = layer.settings()
    rows: list[tuple] = []
    for phase in ("init", f"after {steps} steps"):
        if phase != "init":
            layer.configure(**defaults)
            for i in range(steps):
                sl = slice(batch * (i + 1), batch * (i + 2))
                _step(model, x_all[sl], labels[sl])
        start = copy.deepcopy(model.state_dict())
        ref = _step(model, check_x, check_y, capture=True)  # the default settings' step: z*, dL/dz*
        model.load_state_dict(start)
        with torch.no_grad():
            z_star = layer(ref["x"], z0=ref["z0"])
        exact, exact_res = exact_adjoint(layer.func, z_star, ref["x"], ref["v"])
        for label, cfg in settings():
            layer.configure(**{**defaults, **cfg})
            model.load_state_dict(start)
            meter = make_meter("cpu", modules=[model])
            with meter:
                got = _step(model, check_x, check_y)
            stats = layer.last_backward_stats if cfg["backward"] == "implicit" else None
            times = []
            for _ in range(repeats):
                model.load_state_dict(start)
                t0 = time.perf_counter()
                _step(model, check_x, check_y)
                times.append(time.perf_counter() - t0)
            b_res = f"{float(stats['residual'].max()):.1e}" if stats else "-"
            rows.append((model_name, batch, phase, label, f"{_cos(got['grad'], exact):.4f}",
                         _products(cfg, stats, layer.phantom_steps), b_res, f"{statistics.median(times):.3f}",
                         f"{meter.peak_bytes / 1e6:.1f}"))
            print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)  # progress
        model.load_state_dict(start)
        layer.configure(**defaults)
        if exact_res > 1e-6:  # a cosine to 4 decimals needs no more
            rows.append((model_name, batch, phase, f"(exact solve reached only {exact_res:.1e})", *["-"] * 5))
    return rows


MONOTONE = ("gmres", "normal_cg")
"""The adjoint solvers whose residual ||v - (I - J^T) g|| can never rise from one product to the next
on any nonsingular system: GMRES minimizes it over its Krylov space, CG on the normal equations (CGNR)
minimizes it over its own. So neither can diverge, where BiCGStab and the fixed-point solvers can (a
block that training made expansive: methods/deq/adjoint.py)."""


def pick_default(rows: list[tuple], min_cos: float = MIN_COS) -> str:
    """The rule the default b_solver follows, applied to the table's rows:

    1. only the solvers that cannot diverge (MONOTONE) are candidates: a default must not fail a run;
    2. the rows where at least one implicit solver reaches cosine >= min_cos decide; where none does,
       the system is beyond every solver's product budget and no solver is accurate there;
    3. among the candidates with cosine >= min_cos in every deciding row, the least peak memory summed
       over those rows, ties (within 0.1 MB per row) broken by the least s/step summed."""
    per: dict[str, list[tuple]] = {}
    for row in rows:
        if row[3].startswith("implicit, "):
            per.setdefault(row[3].removeprefix("implicit, "), []).append(row)
    cases: dict[tuple, list[tuple]] = {}
    for row in rows:
        if row[3].startswith("implicit, "):
            cases.setdefault(row[:3], []).append(row)
    deciding = {case for case, rs in cases.items() if any(float(r[4]) >= min_cos for r in rs)}
    undecided = sorted(f"{c[0]} {c[2]}" for c in set(cases) - deciding)
    ok = {name: [r for r in rs if r[:3] in deciding] for name, rs in per.items() if name in MONOTONE}
    ok = {name: rs for name, rs in ok.items() if rs and all(float(r[4]) >= min_cos for r in rs)}
    tail = "; rows no solver reaches the bar in (not deciding): " + (", ".join(undecided) or "none")
    if not ok:
        return f"no solver that cannot diverge ({', '.join(MONOTONE)}) reaches cosine {min_cos}" + tail
    mem = {name: sum(float(r[8]) for r in rs) for name, rs in ok.items()}
    secs = {name: sum(float(r[7]) for r in rs) for name, rs in ok.items()}
    least = min(mem.values())
    tied = [name for name in ok if mem[name] <= least + 0.1 * len(ok[name])]
    best = min(tied, key=lambda name: secs[name])
    return (f"rule (cannot diverge, cosine >= {min_cos} in every deciding row, least peak memory, ties by "
            f"time) picks {best}: " + ", ".join(f"{n} {mem[n]:.1f} MB / {secs[n]:.2f} s"
                                               for n in sorted(ok, key=mem.__getitem__)) + tail)


def adjoint_table(models: tuple[str, ...] = DEFAULT_MODELS, steps: int = 3, repeats: int = 1,
                  threads: int | None = None) -> str:
    """The Markdown table `python -m bench.perf --adjoint` prints."""
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        images, labels = fmnist_images(max(BATCH[m] for m in models) * (steps + 1))
        body = []
        for m in models:
            t0 = time.perf_counter()
            body += model_rows(m, images, labels, steps, repeats)
            print(f"{m}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        title = (f"Adjoint solvers: one SGD step (lr {LR}) on Fashion-MNIST test images, "
                 f"{torch.get_num_threads()} thread(s); s/step median of {repeats}")
        columns = ["model", "batch", "phase", "backward", "cos", "products", "b_res", "s/step", "peak MB"]
        table = text.table(columns, body, right=[False, True, False, False, True, True, True, True, True])
        return title + "\n" + table + "\n\n" + pick_default(body)
    finally:
        torch.set_num_threads(prev)
