"""JAX builder: a case as a ``diffrax.ODETerm`` solved with our adjoint or diffrax's.

Modes of :func:`solve`:

* ``"host"``: ``diffrax.RecursiveCheckpointAdjoint`` (exact backprop), the reference.
* ``"states"`` / ``"stages"``: ``symplectic_adjoint.SymplecticAdjoint(checkpoint=...)``.

Constant-step solvers use ``ConstantStepSize`` with ``dt0 = +-h`` (the grid lands on
``t1`` and every output time); adaptive ones a ``PIDController`` at the case
tolerances. Implicit solvers (ImplicitEuler, Kvaerno3/4/5) get
``optimistix.Newton(rtol=atol=JAX_NEWTON_TOL)`` as their root finder.
Each (case, solver, dtype, mode) is traced and compiled once, as one
jitted ``value_and_grad`` that also returns the outputs, and cached for the session.
"""

from __future__ import annotations

import functools
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from ..cases import EVENT_ROOT_TOL, JAX_NEWTON_TOL, Case, EventCase, Solver, event_value
from . import Result, grad_keys, standin, unavailable

__all__ = [
    "MODES",
    "device_for",
    "make_loss",
    "ours_available",
    "solve",
    "solve_event",
    "solve_times",
]

MODES = ("host", "states", "stages")


def ours_available() -> str | None:
    """``None`` if ``symplectic_adjoint.SymplecticAdjoint`` is usable, else why not."""
    return unavailable("SymplecticAdjoint")


def _adjoint(mode: str) -> diffrax.AbstractAdjoint:
    if mode == "host" or standin():
        return diffrax.RecursiveCheckpointAdjoint()
    if mode not in ("states", "stages"):
        raise ValueError(f"unknown mode {mode!r}")
    from symplectic_adjoint import SymplecticAdjoint

    return SymplecticAdjoint(checkpoint=mode)


def device_for(name: str) -> jax.Device:
    """The first JAX device of a platform (``"cpu"``, ``"cuda"``/``"gpu"``)."""
    platform = "gpu" if name in ("cuda", "gpu") else name
    return jax.devices(platform)[0]


def _method(solver: Solver) -> diffrax.AbstractSolver:
    cls = getattr(diffrax, solver.diffrax_solver)
    if not solver.implicit:
        return cls()
    import optimistix

    return cls(root_finder=optimistix.Newton(rtol=JAX_NEWTON_TOL, atol=JAX_NEWTON_TOL))


def make_loss(case: Case, solver: Solver, dtype: str, mode: str):
    """``loss(params, y0, weights) -> (L, (ys, n_accepted))``: the case solved by diffrax
    with the mode's adjoint, ``L = sum_k <w_k, y(t_k)>`` (``weights``: one array per
    state leaf, stacked over the output times)."""
    if solver.diffrax_solver is None:
        raise ValueError(f"{solver.name} is not a diffrax solver")
    jdt = jnp.dtype(dtype)
    field = case.field

    def vf(t: Any, y: Any, p: Any) -> Any:
        return field(jnp.asarray(t, jdt), y, p)

    method = _method(solver)
    t0, t1 = float(case.t[0]), float(case.t[-1])
    if solver.constant_steps:
        controller: diffrax.AbstractStepSizeController = diffrax.ConstantStepSize()
        dt0, max_steps = case.signed_h, case.n_steps
    else:
        rtol, atol = case.tolerances(dtype, solver.loosen)
        controller = diffrax.PIDController(rtol=rtol, atol=atol)
        dt0, max_steps = None, 256
    saveat = diffrax.SaveAt(ts=jnp.asarray(case.t))
    adjoint = _adjoint(mode)

    def loss(p: dict, y0: Any, weights: tuple[jax.Array, ...]) -> tuple[jax.Array, Any]:
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vf), method, t0, t1, dt0, y0, args=p, saveat=saveat,
            stepsize_controller=controller, adjoint=adjoint, max_steps=max_steps,
        )  # fmt: skip
        leaves = sol.ys if case.is_tuple else (sol.ys,)
        aux = (sol.ys, sol.stats["num_accepted_steps"])
        return sum(jnp.sum(w * y) for w, y in zip(weights, leaves, strict=True)), aux

    return loss


@functools.cache
def _compiled(case: Case, solver: Solver, dtype: str, mode: str):
    return jax.jit(jax.value_and_grad(make_loss(case, solver, dtype, mode), (0, 1), has_aux=True))


def solve(case: Case, solver: Solver, dtype: str, device: str, mode: str) -> Result:
    """Solve the case, differentiate its loss, return NumPy outputs and gradients."""
    dev = device_for(device)
    jdt = jnp.dtype(dtype)
    p = {k: jax.device_put(jnp.asarray(v, jdt), dev) for k, v in case.params.items()}
    leaves = tuple(jax.device_put(jnp.asarray(x, jdt), dev) for x in case.y0_leaves)
    y0 = leaves if case.is_tuple else leaves[0]
    weights = tuple(jax.device_put(jnp.asarray(w, jdt), dev) for w in case.weight_leaves)
    (_, (ys, n_accepted)), (gp, gy) = _compiled(case, solver, dtype, mode)(p, y0, weights)
    gy = gy if case.is_tuple else (gy,)
    ys = ys if case.is_tuple else (ys,)
    names = grad_keys(len(leaves), list(p))
    values = [*gy, *(gp[k] for k in p)]
    return Result(
        ys=tuple(np.asarray(y, np.float64) for y in ys),
        grads={k: np.asarray(v, np.float64) for k, v in zip(names, values, strict=True)},
        n_accepted=int(n_accepted),
    )


@functools.cache
def _compiled_times(case: Case, solver: Solver, dtype: str, mode: str, grid: str):
    if grid not in ("step", "uniform"):
        raise ValueError(f"unknown grid {grid!r}")
    jdt = jnp.dtype(dtype)
    field, method, adjoint = case.field, _method(solver), _adjoint(mode)

    def vf(t: Any, y: Any, p: Any) -> Any:
        return field(jnp.asarray(t, jdt), y, p)

    def loss(p: dict, y0: Any, t0: Any, t1: Any, w: jax.Array) -> tuple[jax.Array, Any]:
        dt0 = case.signed_h if grid == "step" else (t1 - t0) / case.n_steps
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vf), method, t0, t1, dt0, y0, args=p,
            saveat=diffrax.SaveAt(t0=True, t1=True), stepsize_controller=diffrax.ConstantStepSize(),
            adjoint=adjoint, max_steps=case.n_steps,
        )  # fmt: skip
        return jnp.sum(w * sol.ys), sol.ys

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))


def solve_times(
    case: Case, solver: Solver, dtype: str, device: str, mode: str, grid: str
) -> Result:
    """As :func:`solve` with ``t0`` and ``t1`` differentiated too (``ConstantStepSize``,
    outputs ``SaveAt(t0=True, t1=True)``): gradients ``"t0"`` and ``"t1"`` besides ``y0``
    and the parameters. ``grid="step"``: ``dt0 = +-h`` a constant (diffrax's own grid);
    ``"uniform"``: ``dt0 = (t1 - t0) / N``, every node ``t0 + (t1 - t0) n / N``
    (:data:`~conformance.cases.TIME_GRIDS`)."""
    if not solver.constant_steps or len(case.t) != 2 or case.is_tuple:
        raise ValueError(f"no time-gradient configuration for {case.name} with {solver.name}")
    dev = device_for(device)
    jdt = jnp.dtype(dtype)
    p = {k: jax.device_put(jnp.asarray(v, jdt), dev) for k, v in case.params.items()}
    y0 = jax.device_put(jnp.asarray(case.y0, jdt), dev)
    t0, t1 = (jax.device_put(jnp.asarray(x, jdt), dev) for x in case.t)
    w = jax.device_put(jnp.asarray(case.weights, jdt), dev)
    (_, ys), (gp, gy, g0, g1) = _compiled_times(case, solver, dtype, mode, grid)(p, y0, t0, t1, w)
    grads = {"y0": gy, **{f"p.{k}": gp[k] for k in p}, "t0": g0, "t1": g1}
    return Result(
        ys=(np.asarray(ys, np.float64),),
        grads={k: np.asarray(v, np.float64) for k, v in grads.items()},
    )


@functools.cache
def _compiled_event(ev: EventCase, solver: Solver, dtype: str, mode: str):
    import optimistix

    jdt = jnp.dtype(dtype)
    case, method, adjoint = ev.case, _method(solver), _adjoint(mode)

    def vf(t: Any, y: Any, p: Any) -> Any:
        return case.field(jnp.asarray(t, jdt), y, p)

    e = {k: jnp.asarray(v, jdt) for k, v in ev.event.items()}

    def cond_fn(t: Any, y: Any, args: Any, **kwargs: Any) -> jax.Array:
        return event_value(jnp.asarray(t, jdt), y, e)

    event = diffrax.Event(
        cond_fn, root_finder=optimistix.Newton(rtol=EVENT_ROOT_TOL, atol=EVENT_ROOT_TOL)
    )

    def loss(p: dict, y0: Any, w_y: jax.Array) -> tuple[jax.Array, Any]:
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vf), method, float(case.t[0]), ev.t_end, case.h, y0, args=p,
            saveat=diffrax.SaveAt(t1=True), stepsize_controller=diffrax.ConstantStepSize(),
            event=event, adjoint=adjoint, max_steps=ev.max_steps,
        )  # fmt: skip
        t_star, y_star = sol.ts[-1], sol.ys[-1]
        aux = (t_star, y_star, sol.stats["num_accepted_steps"])
        return ev.w_t * t_star + jnp.sum(w_y * y_star), aux

    return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))


def solve_event(ev: EventCase, solver: Solver, dtype: str, device: str, mode: str) -> Result:
    """A terminating ``diffrax.Event`` with the real-valued
    :func:`~conformance.cases.event_value` as ``cond_fn`` and ``optimistix.Newton`` at
    :data:`~conformance.cases.EVENT_ROOT_TOL` as its root finder, on ``ConstantStepSize``
    steps of ``h``; outputs ``(t*, y(t*))`` (``sol.ts[-1]``, ``sol.ys[-1]``), gradients of
    ``w_t t* + <w_y, y(t*)>`` w.r.t. ``y0`` and the parameters."""
    if not solver.constant_steps:
        raise ValueError(f"no event configuration for {solver.name}")
    dev = device_for(device)
    jdt = jnp.dtype(dtype)
    p = {k: jax.device_put(jnp.asarray(v, jdt), dev) for k, v in ev.case.params.items()}
    y0 = jax.device_put(jnp.asarray(ev.case.y0, jdt), dev)
    w_y = jax.device_put(jnp.asarray(ev.w_y, jdt), dev)
    (_, (t_star, y_star, n)), (gp, gy) = _compiled_event(ev, solver, dtype, mode)(p, y0, w_y)
    grads = {"y0": gy, **{f"p.{k}": gp[k] for k in p}}
    return Result(
        ys=(np.asarray(t_star, np.float64).reshape(1), np.asarray(y_star, np.float64)),
        grads={k: np.asarray(v, np.float64) for k, v in grads.items()},
        n_accepted=int(n),
    )
