"""Benchmark: the symplectic adjoint against torchdiffeq's backprop and continuous adjoint.

Protocol (DESIGN.md section 5): an MLP vector field 16 -> 64 -> 64 -> 16 (tanh), batch
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
  symplectic solve's (the same discrete solve; DESIGN 3.1).

Run: ``python -m symplectic_adjoint.bench.torch_bench [--repeats 7] [--steps 50 100 200]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchdiffeq
from torch.profiler import ProfilerActivity, profile

from ..adapters.torchdiffeq import SolveStats, odeint

__all__ = ["make_field", "run", "main"]

METHODS = ("backprop", "odeint_adjoint", "symplectic states", "symplectic stages")


def make_field(seed: int = 0) -> torch.nn.Module:
    """The MLP vector field ``f(t, y) = W3 tanh(W2 tanh(W1 y + b1) + b2) + b3``."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 16),
    )  # fmt: skip

    class Field(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.net(y)

    return Field()


def _gradient_fn(name: str, field: torch.nn.Module, y0: torch.Tensor, case: dict) -> Callable:
    t = torch.tensor([0.0, case["t1"]])
    params = tuple(field.parameters())
    kw: dict[str, Any] = dict(method=case["method"], options=dict(case["options"]))
    kw.update(case.get("tols", {}))

    def solve() -> torch.Tensor:
        if name == "backprop":
            return torchdiffeq.odeint(field, y0, t, **kw)
        if name == "odeint_adjoint":
            return torchdiffeq.odeint_adjoint(field, y0, t, **kw)
        return odeint(field, y0, t, checkpoint=name.split()[-1], **kw)

    def gradient() -> tuple[torch.Tensor, ...]:
        ys = solve()
        return torch.autograd.grad((ys[-1] ** 2).sum(), (y0, *params))

    return gradient


def peak_memory(fn: Callable[[], Any]) -> int:
    """Peak of the running sum of the CPU allocator events while ``fn`` runs (bytes)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _relerr(g: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    num = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(g, ref, strict=True))
    den = sum(float(b.double().pow(2).sum()) for b in ref)
    return (num / den) ** 0.5


def run(*, steps: Sequence[int] = (50, 100, 200), repeats: int = 7, dopri5: bool = True) -> str:
    """Run every case and method; return the Markdown table."""
    torch.set_num_threads(1)
    cases = [dict(label=f"rk4, {n} steps", method="rk4", options=dict(step_size=1.0 / n), t1=1.0)
             for n in steps]  # fmt: skip
    if dopri5:
        cases.append(dict(label="dopri5, tol 1e-6, [0, 10]", method="dopri5", options={},
                          tols=dict(rtol=1e-6, atol=1e-6), t1=10.0))  # fmt: skip
    rows = [
        "| case | method | peak memory (MiB) | memory / backprop | time per gradient (ms) "
        "| time / backprop | rel. error vs backprop |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        field = make_field()
        y0 = torch.randn(128, 16, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        stats = SolveStats()
        t = torch.tensor([0.0, case["t1"]])
        odeint(field, y0, t, method=case["method"], options=dict(case["options"]), stats=stats,
               **case.get("tols", {}))  # fmt: skip
        if case["method"] == "dopri5":  # the same discrete solve for every method
            case["options"]["first_step"] = stats.first_step
        label = f"{case['label']} ({stats.n_steps} steps)" if case["method"] == "dopri5" else (
            case["label"])  # fmt: skip
        fns = {name: _gradient_fn(name, field, y0, case) for name in METHODS}
        ref = fns["backprop"]()
        results = {}
        for name, fn in fns.items():
            results[name] = (peak_memory(fn), _median_time(fn, repeats), _relerr(fn(), ref))
        mem_bp, time_bp, _ = results["backprop"]
        for name, (mem, sec, err) in results.items():
            rows.append(
                f"| {label} | {name} | {mem / 2**20:.2f} | {mem / mem_bp:.3f} | {sec * 1e3:.1f} "
                f"| {sec / time_bp:.2f} | {err:.1e} |"
            )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per method (>= 5)")
    parser.add_argument("--no-dopri5", action="store_true", help="skip the dopri5 case")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (median of >= 5 runs)")
    print(run(steps=args.steps, repeats=args.repeats, dopri5=not args.no_dopri5))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
