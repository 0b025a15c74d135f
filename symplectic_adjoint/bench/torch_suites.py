"""``--suite stiff`` and ``--suite budget`` for the torch adapter (issues 14 and 16).

Stiff (:func:`measure_stiff`): ``f(y) = mlp(y) - lambda y`` on a 64x8 state (MLP 8 -> 64 -> 64
-> 8, tanh, row-wise; ``lambda`` = :data:`~.protocol.STIFF_DECAY`), float64 on ``[0, 1]``,
Newton with a block-diagonal Jacobian (``per_sample=True``, the field is row-wise; the
default simplified Newton) at :data:`~.protocol.STIFF_NEWTON_TOL`: ``trbdf2`` on a fixed
grid of N steps and ``kvaerno5`` held at the constant step ``1/N`` (tolerances that accept
every step, ``first_step = max_step = 1/N``, as the JAX suite's constant steps).
Methods: ``adjoint="backprop"`` (autograd through the Newton iterations, the reference)
and the symplectic adjoint with ``"states"`` and ``"stages"``.

Budget (:func:`measure_budget`): ``checkpoint=c`` at large N on a tiny linear field
``y' = A y`` (16 states, ``A`` skew-symmetric plus a small damping: a rotation, so an
adaptive solver's steps are near uniform), rk4 on a fixed grid of N steps and dopri5 with
``t1`` scaled so that the step count lands near N. Columns: replayed steps
(``SolveStats.n_replayed_steps``) against the offline optimum
``binomial_forward_steps(N, c) - (N - 1)``, peak memory of one gradient (forward and
backward) and the median time of the backward alone, both against ``"states"``.

Memory: ``torch.profiler`` allocator peak (the README's measurement protocol); time: median of
``repeats`` after a warm-up, all methods of a case in one run, ``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..adapters.torchdiffeq import SolveStats, odeint
from ..core.checkpointing import binomial_forward_steps
from .protocol import (
    BUDGET_C,
    BUDGET_DIM,
    BUDGET_STEPS,
    REPEATS,
    STIFF_BATCH,
    STIFF_DECAY,
    STIFF_DIM,
    STIFF_NEWTON_TOL,
    STIFF_STEPS,
    STIFF_WIDTH,
)
from .report import add_ratios
from .torch_bench import _relerr, make_field, peak_memory

__all__ = ["STIFF_METHODS", "make_stiff_field", "measure_budget", "measure_stiff"]

STIFF_REFERENCE = "backprop"
STIFF_METHODS = (STIFF_REFERENCE, "symplectic states", "symplectic stages")
BUDGET_REFERENCE = "symplectic states"


def make_stiff_field(seed: int = 0, *, decay: float = STIFF_DECAY) -> torch.nn.Module:
    """``f(t, y) = mlp(y) - decay * y``, the MLP applied to each row of ``y`` (float64)."""
    return make_field(seed, width=STIFF_WIDTH, dim=STIFF_DIM, decay=decay).double()


#: Tolerances under which kvaerno5 accepts every step: held at ``first_step = max_step``.
_ACCEPT_ALL = 1e12


def _stiff_cases(steps: Sequence[int]) -> list[dict]:
    newton = dict(per_sample=True, newton_rtol=STIFF_NEWTON_TOL, newton_atol=STIFF_NEWTON_TOL)
    cases = []
    for n in steps:
        cases.append(dict(case="trbdf2", method="trbdf2", steps=n,
                          kw=dict(options=dict(newton, step_size=1.0 / n))))  # fmt: skip
        held = dict(newton, first_step=1.0 / n, max_step=1.0 / n)
        cases.append(dict(case="kvaerno5", method="kvaerno5", steps=n,
                          kw=dict(rtol=_ACCEPT_ALL, atol=_ACCEPT_ALL, options=held)))  # fmt: skip
    return cases


def _stiff_problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, tuple]:
    """``(field, y0, t, params)`` of the stiff suite (deterministic: fixed seeds)."""
    field = make_stiff_field()
    gen = torch.Generator().manual_seed(1)
    y0 = 0.5 * torch.randn(STIFF_BATCH, STIFF_DIM, generator=gen, dtype=torch.float64)
    y0.requires_grad_(True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    return field, y0, t, (y0, *field.parameters())


def _stiff_gradients(case: dict, problem: tuple) -> dict[str, Callable[[], Any]]:
    """Method name -> one gradient of ``sum(y(1)^2)`` in ``(y0, params)``."""
    field, y0, t, params = problem
    fns = {}
    for name in STIFF_METHODS:
        adjoint, checkpoint = ("backprop", "states") if name == "backprop" else \
            ("symplectic", name.split()[-1])  # fmt: skip
        kw = dict(method=case["method"], adjoint=adjoint, checkpoint=checkpoint)

        def gradient(kw: dict = kw, extra: dict = case["kw"]) -> tuple[torch.Tensor, ...]:
            ys = odeint(field, y0, t, **kw, **_copy(extra))
            return torch.autograd.grad(ys[-1].square().sum(), params)

        fns[name] = gradient
    return fns


def stiff_peak_memory(steps: int, case: str, method: str) -> int:
    """:func:`~.torch_bench.peak_memory` of one gradient of the stiff suite's ``case`` at
    ``steps`` steps by ``method`` (bytes), in this process."""
    torch.set_num_threads(1)
    spec = next(c for c in _stiff_cases([steps]) if c["case"] == case)
    return peak_memory(_stiff_gradients(spec, _stiff_problem())[method])


def isolated(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a fresh (spawned) process. Why: ``torch.profiler`` keeps every
    event of a measurement, and the process keeps that memory after it (measured: one
    kvaerno5 gradient at N = 800 with ``checkpoint="states"`` leaves 8.2 GiB resident),
    so the full stiff suite in one process outgrows a 24 GiB machine."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def measure_stiff(
    *,
    steps: Sequence[int] = STIFF_STEPS,
    repeats: int = REPEATS,
    progress: Callable[[str], None] | None = None,
    isolate: bool = True,
) -> list[dict]:
    """One row per case and method; ratios to backprop through Newton (issue 14).

    ``isolate``: each memory measurement in its own process (:func:`isolated`; the
    figures are the same, the profiler's memory is returned after each)."""
    torch.set_num_threads(1)
    tick = progress or (lambda message: None)
    problem = _stiff_problem()
    field, y0, t, _ = problem
    rows: list[dict] = []
    for case in _stiff_cases(steps):
        stats = SolveStats()
        with torch.no_grad():
            odeint(field, y0, t, method=case["method"], stats=stats, **_copy(case["kw"]))
        n = stats.n_steps
        fns = _stiff_gradients(case, problem)
        tick(f"torch stiff {case['case']} N={n}: memory")
        memory = {
            name: isolated(stiff_peak_memory, case["steps"], case["case"], name) if isolate
            else peak_memory(fn)
            for name, fn in fns.items()
        }  # fmt: skip
        tick(f"torch stiff {case['case']} N={n}: timing")
        times = _interleaved(fns, repeats)
        grads = {name: fn() for name, fn in fns.items()}
        for name in fns:
            rows.append(dict(
                backend="torch", case=case["case"], steps=n, method=name,
                memory_bytes=memory[name], memory_kind="cpu allocator peak", time_s=times[name],
                error=None, error_f64=_relerr(grads[name], grads[STIFF_REFERENCE]),
            ))  # fmt: skip
    return add_ratios(rows, reference=STIFF_REFERENCE)


def _copy(kw: dict) -> dict:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in kw.items()}


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per method: one warm-up each, then ``repeats`` rounds taking turns."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


class _Rotation(torch.nn.Module):
    """``y' = A y``, ``A = S - S^T - 0.01 I``: a slowly damped rotation, frequencies ~ 1."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        s = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / dim**0.5
        self.A = torch.nn.Parameter(s - s.T - 0.01 * torch.eye(dim, dtype=torch.float64))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ self.A.T


def measure_budget(
    *,
    steps: Sequence[int] = BUDGET_STEPS,
    budget: int = BUDGET_C,
    repeats: int = REPEATS,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Replays, memory and backward time of ``checkpoint=budget`` against ``"states"``."""
    torch.set_num_threads(1)
    tick = progress or (lambda message: None)
    field = _Rotation(BUDGET_DIM)
    y0 = torch.linspace(-1.0, 1.0, BUDGET_DIM, dtype=torch.float64).requires_grad_(True)
    params = (y0, field.A)
    tols = dict(rtol=1e-6, atol=1e-6)
    stats = SolveStats()
    with torch.no_grad():  # dopri5's steps per unit time on this rotation
        odeint(field, y0, torch.tensor([0.0, 100.0], dtype=torch.float64), method="dopri5",
               stats=stats, **tols)  # fmt: skip
    per_unit = stats.n_steps / 100.0
    rows: list[dict] = []
    for n in steps:
        cases = [("rk4", dict(method="rk4", options=dict(step_size=1.0 / n)), 1.0),
                 ("dopri5 tol 1e-6", dict(method="dopri5", **tols), n / per_unit)]  # fmt: skip
        for label, kw, t1 in cases:
            t = torch.tensor([0.0, t1], dtype=torch.float64)
            names = {BUDGET_REFERENCE: "states", f"symplectic c={budget}": budget}
            backward, forward_stats = {}, {}
            for name, checkpoint in names.items():

                def run(checkpoint: str | int = checkpoint, name: str = name, t: torch.Tensor = t,
                        kw: dict = kw, out: dict = forward_stats) -> Callable:  # fmt: skip
                    st = SolveStats()
                    ys = odeint(field, y0, t, checkpoint=checkpoint, stats=st, **_copy(kw))
                    loss = ys[-1].square().sum()
                    out[name] = st
                    return lambda: torch.autograd.grad(loss, params)

                backward[name] = run

            tick(f"torch budget {label} N~{n}: memory")
            memory = {name: peak_memory(lambda run=run: run()()) for name, run in backward.items()}
            grads = {name: run()() for name, run in backward.items()}
            tick(f"torch budget {label} N~{n}: timing")
            times = _backward_times(backward, repeats)
            for name in names:
                st = forward_stats[name]
                got = st.n_steps
                rows.append(dict(
                    backend="torch", case=label, steps=got, method=name,
                    memory_bytes=memory[name], memory_kind="cpu allocator peak, forward + backward",
                    time_s=times[name], error=None,
                    error_f64=_relerr(grads[name], grads[BUDGET_REFERENCE]),
                    replayed=st.n_replayed_steps,
                    formula=binomial_forward_steps(got, budget) - (got - 1)
                    if name != BUDGET_REFERENCE else 0,
                ))  # fmt: skip
    return add_ratios(rows, reference=BUDGET_REFERENCE)


def _backward_times(makers: dict[str, Callable[[], Callable]], repeats: int) -> dict[str, float]:
    """Median seconds of the backward alone (each forward untimed), methods taking turns."""
    for make in makers.values():
        make()()
    times: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(repeats):
        for name, make in makers.items():
            backward = make()
            start = time.perf_counter()
            backward()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
