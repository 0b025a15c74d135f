"""Benchmark: the symplectic adjoint against torchdiffeq's backprop and continuous adjoint.

Protocol (README, measurement protocol): an MLP vector field 16 -> 64 -> 64 -> 16 (tanh), batch
128, float32, ``torch.set_num_threads(1)``; rk4 with 50/100/200 fixed steps on
``[0, 1]`` and dopri5 at ``rtol = atol = 1e-6`` on ``[0, 10]`` (the smooth default-initialised
MLP needs only 3 steps on ``[0, 1]``). For each case and each method
(backprop = ``torchdiffeq.odeint``, ``odeint_adjoint``, symplectic ``"states"`` and
``"stages"``), one gradient of ``L = sum y(1)^2`` w.r.t. ``y0`` and the parameters:

* peak memory: ``torch.profiler`` with ``profile_memory=True``; the peak of the running
  sum of the allocator events (in time order) of one gradient, byte-reproducible;
* time: median of ``repeats`` (>= 5) gradients after a warm-up, all methods in one run;
* ratio: time / backprop's time;
* error: ``||g - g_bp|| / ||g_bp||`` against backprop with ``first_step`` pinned to the
  symplectic solve's (the same discrete solve; README, How it works).

Run: ``python -m symplectic_adjoint bench --backend torch``.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torchdiffeq
from torch.profiler import ProfilerActivity, profile

from ..adapters.torchdiffeq import SolveStats, odeint
from .protocol import BUDGETS, REPEATS, TORCH_BATCH, TORCH_STEPS, TORCH_WIDTH
from .report import add_ratios

__all__ = ["make_field", "measure", "median_seconds", "peak_memory"]

METHODS = ("backprop", "odeint_adjoint", "symplectic states", "symplectic stages")
#: The protocol's MLP width and batch (README, measurement protocol).
WIDTH, BATCH = TORCH_WIDTH, TORCH_BATCH


def make_field(
    seed: int = 0, *, width: int = WIDTH, dim: int = 16, decay: float = 0.0
) -> torch.nn.Module:
    """The MLP vector field ``f(t, y) = W3 tanh(W2 tanh(W1 y + b1) + b2) + b3``,
    ``dim`` -> ``width`` -> ``width`` -> ``dim``, minus ``decay * y`` when ``decay`` is
    nonzero (the stiff suite's fast linear mode)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(dim, width), torch.nn.Tanh(),
        torch.nn.Linear(width, width), torch.nn.Tanh(),
        torch.nn.Linear(width, dim),
    )  # fmt: skip

    class Field(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = self.net(y)
            return out - decay * y if decay else out

    return Field()


def _gradient_fn(name: str, field: torch.nn.Module, y0: torch.Tensor, case: dict) -> Callable:
    t = torch.tensor([0.0, case["t1"]], dtype=y0.dtype, device=y0.device)
    params = tuple(field.parameters())
    kw: dict[str, Any] = dict(method=case["method"], options=dict(case["options"]))
    kw.update(case.get("tols", {}))

    def solve() -> torch.Tensor:
        if name == "backprop":
            return torchdiffeq.odeint(field, y0, t, **kw)
        if name == "odeint_adjoint":
            return torchdiffeq.odeint_adjoint(field, y0, t, **kw)
        mode = name.split()[-1]
        checkpoint = int(mode[2:]) if mode.startswith("c=") else mode
        return odeint(field, y0, t, checkpoint=checkpoint, **kw)

    def gradient() -> tuple[torch.Tensor, ...]:
        ys = solve()
        return torch.autograd.grad((ys[-1] ** 2).sum(), (y0, *params))

    return gradient


def peak_memory(fn: Callable[[], Any], device: str | torch.device = "cpu") -> int:
    """Peak memory of ``fn()`` in bytes, above what was allocated before
    (the README's measurement protocol).

    CPU: the peak of the running sum of the allocator events recorded by
    ``torch.profiler`` with ``profile_memory=True`` (byte-reproducible); the profiler's
    C++ layer logs to file descriptor 2 meanwhile, which is silenced. CUDA:
    ``torch.cuda.max_memory_allocated``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        del out
        return int(torch.cuda.max_memory_allocated(device) - base)
    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        out = fn()
    del out
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in p.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return int(peak)


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null (the profiler's ``USDT ... profiler_start`` lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def median_seconds(
    fn: Callable[[], Any], *, repeats: int, warmup: int = 1, device: str | torch.device = "cpu"
) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls
    (synchronising a CUDA device around each call)."""
    cuda = torch.device(device).type == "cuda"

    def timed() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        fn()
    return statistics.median(timed() for _ in range(repeats))


def _relerr(g: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    num = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(g, ref, strict=True))
    den = sum(float(b.double().pow(2).sum()) for b in ref)
    return (num / den) ** 0.5


def _cases(steps: Sequence[int], dopri5: bool) -> list[dict]:
    cases = [dict(case="rk4", method="rk4", options=dict(step_size=1.0 / n), t1=1.0, steps=n)
             for n in steps]  # fmt: skip
    if dopri5:
        cases.append(dict(case="dopri5 tol 1e-6", method="dopri5", options={},
                          tols=dict(rtol=1e-6, atol=1e-6), t1=10.0))  # fmt: skip
    return cases


def _pinned(case: dict, field: torch.nn.Module, y0: torch.Tensor) -> tuple[dict, int]:
    """The case with ``first_step`` pinned to the symplectic solve's (the same discrete
    solve for every method, README, How it works), and its number of accepted steps."""
    stats = SolveStats()
    t = torch.tensor([0.0, case["t1"]], dtype=y0.dtype, device=y0.device)
    with torch.no_grad():
        odeint(field, y0, t, method=case["method"], options=dict(case["options"]), stats=stats,
               **case.get("tols", {}))  # fmt: skip
    pinned = dict(case, options=dict(case["options"]))
    if case["method"] == "dopri5":
        pinned["options"]["first_step"] = stats.first_step
    return pinned, stats.n_steps


def measure(
    *,
    steps: Sequence[int] = TORCH_STEPS,
    repeats: int = REPEATS,
    dopri5: bool = True,
    budgets: Sequence[int] = BUDGETS,
    device: str = "cpu",
    width: int = WIDTH,
    batch: int = BATCH,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Every case and method, one row each (see :mod:`.report` for the fields).

    ``width`` and ``batch`` size the MLP and the state; the protocol's are ``WIDTH`` and ``BATCH``.
    A larger network shows the ratios the arithmetic predicts (about (5s-1)F and 4sF
    against backprop's sF + sB) with the per-call Python and dispatch costs, which weigh
    on the small one on a CPU, amortised.
    """
    torch.set_num_threads(1)
    methods = [*METHODS, *(f"symplectic c={c}" for c in budgets)]
    rows: list[dict] = []
    for case in _cases(steps, dopri5):
        if (width, batch) != (WIDTH, BATCH):
            case = dict(case, case=f"{case['case']}, width {width}, batch {batch}")
        field = make_field(width=width).to(device)
        y0 = torch.randn(batch, 16, generator=torch.Generator().manual_seed(1)).to(device)
        case32, n = _pinned(case, field, y0)
        field64, y64 = make_field(width=width).to(device).double(), y0.double()
        case64, _ = _pinned(case, field64, y64)
        y0.requires_grad_(True)
        y64.requires_grad_(True)
        ref32 = _gradient_fn("backprop", field, y0, case32)()
        ref64 = _gradient_fn("backprop", field64, y64, case64)()
        for name in methods:
            if name.startswith("symplectic c=") and int(name.split("=")[1]) >= n:
                continue  # a budget of at least N states is the store-all mode
            if progress:
                progress(f"torch {case['case']} N={n} {name}")
            fn = _gradient_fn(name, field, y0, case32)
            rows.append(dict(
                backend="torch", case=case["case"], steps=n, method=name,
                memory_bytes=peak_memory(fn, device), memory_kind=f"{device} allocator peak",
                time_s=median_seconds(fn, repeats=repeats, device=device),
                error=_relerr(fn(), ref32),
                error_f64=_relerr(_gradient_fn(name, field64, y64, case64)(), ref64),
            ))  # fmt: skip
    return add_ratios(rows, reference="backprop")
