"""PyTorch builder: a case as an ``nn.Module`` vector field solved by torchdiffeq or by us.

Modes of :func:`solve`:

* ``"host"``: ``torchdiffeq.odeint`` with plain backprop, the reference. For adaptive
  methods ``first_step`` is pinned to the value torchdiffeq would select, because
  torchdiffeq 0.2.5 differentiates through its initial step selection (README, How it works).
* ``"states"`` / ``"stages"``: ``symplectic_adjoint.odeint(adjoint="symplectic",
  checkpoint=...)``, which selects its first step itself.

Forced-constant solves hold an adaptive method at ``h``: ``first_step=h``,
``max_step=h`` and tolerances so loose that every step is accepted.

Implicit methods are not in torchdiffeq: their ``"host"`` reference is
``symplectic_adjoint.odeint(adjoint="backprop")`` (autograd through every Newton
iteration), with Newton held at :data:`~conformance.cases.NEWTON_TOL` in every mode.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torchdiffeq

from ..cases import EVENT_ROOT_TOL, NEWTON_TOL, Case, EventCase, Solver, event_value
from . import Result, grad_keys, standin, unavailable

__all__ = [
    "MODES",
    "FieldModule",
    "StepRecordingField",
    "loss_of",
    "odeint_ours",
    "ours_available",
    "solve",
    "solve_event",
    "solve_times",
    "solver_options",
]

MODES = ("host", "states", "stages")
#: Loose tolerances that make every proposed step acceptable (forced-constant solves).
_ACCEPT_ALL = 1e12


def _dtype(name: str) -> torch.dtype:
    return {"float64": torch.float64, "float32": torch.float32}[name]


class FieldModule(torch.nn.Module):
    """The case's vector field with its parameters as ``nn.Parameter`` s."""

    def __init__(self, case: Case, dtype: torch.dtype, device: str) -> None:
        super().__init__()
        self.field = case.field
        self.params = torch.nn.ParameterDict(
            {
                k: torch.nn.Parameter(torch.tensor(v, dtype=dtype, device=device))
                for k, v in case.params.items()
            }
        )
        self.accepted: list[float] = []

    def forward(self, t: torch.Tensor, y: Any) -> Any:
        leaf = y[0] if isinstance(y, tuple) else y
        return self.field(t.to(leaf.dtype), y, dict(self.params.items()))


class StepRecordingField(FieldModule):
    """Also records the accepted step sizes (torchdiffeq's ``callback_accept_step``,
    which only the adaptive solvers call)."""

    def callback_accept_step(self, t0: torch.Tensor, y0: Any, dt: torch.Tensor) -> None:
        self.accepted.append(abs(float(dt.detach())))


def solver_options(case: Case, solver: Solver, dtype: str) -> tuple[float, float, dict]:
    """``(rtol, atol, options)`` for ``odeint`` (without the pinned first step)."""
    newton = {"newton_rtol": NEWTON_TOL, "newton_atol": NEWTON_TOL} if solver.implicit else {}
    if solver.grid == "fixed":
        return 0.0, 0.0, {"step_size": case.h, **newton}
    if solver.grid == "forced":
        return _ACCEPT_ALL, _ACCEPT_ALL, {"first_step": case.h, "max_step": case.h, **newton}
    rtol, atol = case.tolerances(dtype, solver.loosen)
    return rtol, atol, {}


@torch.no_grad()
def _torchdiffeq_first_step(
    func: torch.nn.Module, y0: Any, t: torch.Tensor, method: str, rtol: float, atol: float
) -> float:
    """The initial step torchdiffeq 0.2.5 selects (its private solver set-up, no grad)."""
    from torchdiffeq._impl.misc import _check_inputs
    from torchdiffeq._impl.odeint import SOLVERS

    _, f, y, tt, rt, at, m, opts, _, _ = _check_inputs(
        func, y0, t, rtol, atol, method, {}, None, SOLVERS
    )
    solver = SOLVERS[m](func=f, y0=y, rtol=rt, atol=at, **opts)
    solver._before_integrate(tt)
    return float(solver.rk_state.dt)


def ours_available() -> str | None:
    """``None`` if ``symplectic_adjoint.odeint`` is usable, else why not."""
    return unavailable("odeint")


def odeint_ours(func: torch.nn.Module, y0: Any, t: torch.Tensor, checkpoint: str, **kw: Any) -> Any:
    """``symplectic_adjoint.odeint(..., adjoint="symplectic", checkpoint=checkpoint)``."""
    if standin():
        return torchdiffeq.odeint(func, y0, t, **kw)
    from symplectic_adjoint import odeint

    return odeint(func, y0, t, adjoint="symplectic", checkpoint=checkpoint, **kw)


def _as_tensors(
    leaves: tuple[np.ndarray, ...], dtype: torch.dtype, device: str
) -> list[torch.Tensor]:
    return [torch.tensor(x, dtype=dtype, device=device, requires_grad=True) for x in leaves]


def loss_of(ys: Any, weights: tuple[np.ndarray, ...]) -> torch.Tensor:
    """``sum_k <w_k, y(t_k)>`` over every state leaf."""
    ys = ys if isinstance(ys, tuple) else (ys,)
    return sum(
        (torch.as_tensor(w, dtype=y.dtype, device=y.device) * y).sum()
        for w, y in zip(weights, ys, strict=True)
    )


def solve(case: Case, solver: Solver, dtype: str, device: str, mode: str) -> Result:
    """Solve the case, differentiate its loss, return NumPy outputs and gradients."""
    if solver.torch_method is None:
        raise ValueError(f"{solver.name} is not a torchdiffeq method")
    tdt = _dtype(dtype)
    func = (FieldModule if solver.grid == "fixed" else StepRecordingField)(case, tdt, device)
    y0s = _as_tensors(case.y0_leaves, tdt, device)
    y0 = tuple(y0s) if case.is_tuple else y0s[0]
    t = torch.tensor(case.t, dtype=tdt, device=device)
    rtol, atol, options = solver_options(case, solver, dtype)
    kw: dict[str, Any] = {"rtol": rtol, "atol": atol, "method": solver.torch_method}
    if mode == "host" and solver.implicit:
        from symplectic_adjoint import odeint

        ys = odeint(func, y0, t, adjoint="backprop", options=options, **kw)
    elif mode == "host":
        if solver.grid == "adaptive":
            first = _torchdiffeq_first_step(func, y0, t, solver.torch_method, rtol, atol)
            options = {**options, "first_step": first}
        ys = torchdiffeq.odeint(func, y0, t, options=options, **kw)
    elif mode in ("states", "stages"):
        ys = odeint_ours(func, y0, t, mode, options=options, **kw)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    params = list(func.params.values())
    grads = torch.autograd.grad(loss_of(ys, case.weight_leaves), [*y0s, *params], allow_unused=True)
    names = grad_keys(len(y0s), list(func.params.keys()))
    out = {
        k: (np.zeros(x.shape) if g is None else g.detach().cpu().double().numpy())
        for k, g, x in zip(names, grads, [*y0s, *params], strict=True)
    }
    leaves = ys if isinstance(ys, tuple) else (ys,)
    return Result(
        ys=tuple(y.detach().cpu().double().numpy() for y in leaves),
        grads=out,
        steps=None if solver.grid == "fixed" else tuple(func.accepted),
    )


def _uniform_grid(n: int):
    """``grid_constructor`` of the nodes ``t0 + (t1 - t0) k / n``, ``k = 0..n`` (diffrax's
    ``ConstantStepSize`` with ``dt0 = (t1 - t0) / n``)."""

    def construct(func: Any, y0: Any, t: torch.Tensor) -> torch.Tensor:
        k = torch.arange(n + 1, dtype=t.dtype, device=t.device) / n
        return t[0] + (t[-1] - t[0]) * k

    return construct


def solve_times(
    case: Case, solver: Solver, dtype: str, device: str, mode: str, grid: str
) -> Result:
    """As :func:`solve` on ``t = [t0, t1]``, with ``t`` differentiated too: gradients
    ``"t0"`` (``t[0]``) and ``"t1"`` (``t[-1]``) besides ``y0`` and the parameters, on
    torchdiffeq's ``step_size`` grid (``grid="step"``) or the uniform grid of
    :func:`_uniform_grid` (``"uniform"``; :data:`~conformance.cases.TIME_GRIDS`)."""
    if solver.grid != "fixed" or len(case.t) != 2 or case.is_tuple:
        raise ValueError(f"no time-gradient configuration for {case.name} with {solver.name}")
    tdt = _dtype(dtype)
    func = FieldModule(case, tdt, device)
    (y0,) = _as_tensors(case.y0_leaves, tdt, device)
    t = torch.tensor(case.t, dtype=tdt, device=device, requires_grad=True)
    rtol, atol, options = solver_options(case, solver, dtype)
    if grid == "uniform":
        options = {k: v for k, v in options.items() if k != "step_size"}
        options["grid_constructor"] = _uniform_grid(case.n_steps)
    elif grid != "step":
        raise ValueError(f"unknown grid {grid!r}")
    kw: dict[str, Any] = {"rtol": rtol, "atol": atol, "method": solver.torch_method}
    if mode == "host" and solver.implicit:
        from symplectic_adjoint import odeint

        ys = odeint(func, y0, t, adjoint="backprop", options=options, **kw)
    elif mode == "host":
        ys = torchdiffeq.odeint(func, y0, t, options=options, **kw)
    else:
        ys = odeint_ours(func, y0, t, mode, options=options, **kw)
    params = list(func.params.values())
    grads = torch.autograd.grad(loss_of(ys, case.weight_leaves), [y0, *params, t])
    names = [*grad_keys(1, list(func.params.keys())), "t"]
    out = {k: g.detach().cpu().double().numpy() for k, g in zip(names, grads, strict=True)}
    tg = out.pop("t")
    out.update({"t0": tg[0], "t1": tg[-1]})
    return Result(ys=(ys.detach().cpu().double().numpy(),), grads=out)


def solve_event(ev: EventCase, solver: Solver, dtype: str, device: str, mode: str) -> Result:
    """``odeint_event`` until :func:`~conformance.cases.event_value` crosses zero, on the
    forced-constant grid of ``h``; outputs ``(t*, y(t*))``, gradients of ``w_t t* +
    <w_y, y(t*)>`` w.r.t. ``y0`` and the parameters. ``"host"``: ``torchdiffeq.odeint_event``
    through ``torchdiffeq.odeint`` (backprop); ours: :func:`symplectic_adjoint.odeint_event`
    with ``adjoint="symplectic"``. torchdiffeq bisects its interpolant to ``atol``, so
    ``atol`` is :data:`~conformance.cases.EVENT_ROOT_TOL` and ``rtol`` huge (every step of
    ``h`` is still accepted)."""
    if solver.grid != "forced":
        raise ValueError(f"no event configuration for {solver.name}")
    case = ev.case
    tdt = _dtype(dtype)
    func = StepRecordingField(case, tdt, device)
    (y0,) = _as_tensors(case.y0_leaves, tdt, device)
    t0 = torch.tensor(case.t[0], dtype=tdt, device=device)
    e = {k: torch.as_tensor(v, dtype=tdt, device=device) for k, v in ev.event.items()}

    def event_fn(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return event_value(t, y, e)

    _, _, options = solver_options(case, solver, dtype)
    kw: dict[str, Any] = {
        "rtol": _ACCEPT_ALL, "atol": EVENT_ROOT_TOL, "method": solver.torch_method,
        "options": options, "event_fn": event_fn,
    }  # fmt: skip
    if mode == "host":
        t_star, sol = torchdiffeq.odeint_event(
            func, y0, t0, odeint_interface=torchdiffeq.odeint, **kw
        )
    elif standin():
        t_star, sol = torchdiffeq.odeint_event(func, y0, t0, **kw)
    else:
        from symplectic_adjoint import odeint_event

        t_star, sol = odeint_event(func, y0, t0, adjoint="symplectic", checkpoint=mode, **kw)
    y_star = sol[-1]
    w_y = torch.as_tensor(ev.w_y, dtype=tdt, device=device)
    loss = ev.w_t * t_star + (w_y * y_star).sum()
    params = list(func.params.values())
    grads = torch.autograd.grad(loss, [y0, *params])
    names = grad_keys(1, list(func.params.keys()))
    return Result(
        ys=(
            t_star.detach().cpu().double().reshape(1).numpy(),
            y_star.detach().cpu().double().numpy(),
        ),
        grads={k: g.detach().cpu().double().numpy() for k, g in zip(names, grads, strict=True)},
        steps=tuple(func.accepted),
    )
