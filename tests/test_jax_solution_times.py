"""SymplecticAdjoint against RecursiveCheckpointAdjoint for losses that read the save
times ``sol.ts`` (float64).

``sol.ts`` is differentiable: a ``ts`` slot is the output time ``ts[j]``, the ``t0``
slot ``t0``, the ``t1`` slot the final time (``t1``, the end of the step where an event
fired, or the event time ``t*`` of a root finder, by the implicit function theorem),
and a ``steps`` slot the end of its step (through the step-size controller's recorded
forward-mode tangents). A silently zero gradient is the failure these tests catch.
"""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
diffrax = pytest.importorskip("diffrax")
eqx = pytest.importorskip("equinox")

import jax.numpy as jnp  # noqa: E402
from jax_support import make_problem, nonzero, relerr  # noqa: E402

from symplectic_adjoint import SymplecticAdjoint  # noqa: E402

pytestmark = pytest.mark.jax

RCA = diffrax.RecursiveCheckpointAdjoint()
CONST = diffrax.ConstantStepSize()
PID = diffrax.PIDController(rtol=1e-4, atol=1e-6)


def _finite(x):
    # Unwritten or deleted slots hold inf (the same for both adjoints).
    return jnp.where(jnp.isfinite(x), x, 0.0)


def _real_event(t, y, args, **kwargs):
    return jnp.sum(y**2) - 1.3 * args[1]  # reads args: their gradient through t*


def _bool_event(t, y, args, **kwargs):
    return jnp.sum(y**2) > 1.3


def _newton():
    optx = pytest.importorskip("optimistix")
    return optx.Newton(rtol=1e-12, atol=1e-12)


def _setup(kind):
    """``(saveat(ts), solver, controller, event, uses_ts)`` of a case."""
    sub_ts = lambda ts: diffrax.SaveAt(ts=ts)  # noqa: E731
    t1_only = lambda ts: diffrax.SaveAt(t1=True)  # noqa: E731
    if kind == "event-newton":
        event = diffrax.Event(_real_event, root_finder=_newton())
        return t1_only, diffrax.Tsit5(), CONST, event, True
    if kind == "event-discrete":
        return t1_only, diffrax.Heun(), CONST, diffrax.Event(_bool_event), True
    if kind == "t1":
        return t1_only, diffrax.Heun(), CONST, None, True
    if kind == "ts":
        return sub_ts, diffrax.Heun(), CONST, None, True
    if kind == "t1-ts":
        saveat = lambda ts: diffrax.SaveAt(ts=ts, t1=True)  # noqa: E731
        return saveat, diffrax.Heun(), CONST, None, True
    if kind == "steps-pid":
        saveat = lambda ts: diffrax.SaveAt(steps=True)  # noqa: E731
        return saveat, diffrax.Bosh3(), PID, None, True
    if kind == "no-ts":  # sol.ts unused: its cotangent is a symbolic zero
        return t1_only, diffrax.Heun(), CONST, None, False
    if kind == "subs":

        def saveat(ts):
            sub_b = diffrax.SubSaveAt(ts=ts[1:])
            return diffrax.SaveAt(
                subs=[
                    diffrax.SubSaveAt(t0=True, ts=ts, t1=True),
                    {"a": diffrax.SubSaveAt(steps=2, t1=True), "b": sub_b},
                ]
            )

        return saveat, diffrax.Bosh3(), PID, None, True
    if kind == "event-newton-ts":
        event = diffrax.Event(_real_event, root_finder=_newton())
        saveat = lambda ts: diffrax.SaveAt(t0=True, ts=ts, t1=True)  # noqa: E731
        return saveat, diffrax.Tsit5(), PID, event, True
    if kind == "t0-equals-t1":
        saveat = lambda ts: diffrax.SaveAt(t0=True, ts=ts, t1=True)  # noqa: E731
        return saveat, diffrax.Heun(), CONST, None, True
    raise AssertionError(kind)


def _grads(kind, adjoint, max_steps=16):
    saveat_of, solver, controller, event, uses_ts = _setup(kind)

    def loss(diff):
        field, y0, args, t0, t1, ts = diff
        if kind == "t0-equals-t1":
            t1 = t0
            ts = jnp.broadcast_to(t0, ts.shape) + 0.0 * ts
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field), solver, t0, t1, 0.2, y0, args, saveat=saveat_of(ts),
            stepsize_controller=controller, adjoint=adjoint, max_steps=max_steps, event=event,
        )  # fmt: skip
        leaves = jax.tree_util.tree_leaves(sol.ys)
        value = sum(jnp.sum(jnp.sin(_finite(x))) for x in leaves)
        if uses_ts:
            # Weighted so that each slot's cotangent differs.
            for times in jax.tree_util.tree_leaves(sol.ts):
                w = 1.0 + jnp.arange(times.shape[0], dtype=times.dtype)
                value = value + jnp.sum(w * _finite(times) ** 2)
        return value

    field, y0, args = make_problem()
    x = (field, y0, args, jnp.asarray(0.1), jnp.asarray(0.9), jnp.array([0.3, 0.45, 0.7]))
    return eqx.filter_jit(eqx.filter_grad(loss))(x)


def _compare(kind):
    g = _grads(kind, SymplecticAdjoint())
    g_ref = _grads(kind, RCA)
    field, y0, args, t0, t1, ts = g_ref
    assert nonzero(y0) and nonzero(t0)
    for a, b in zip(g, g_ref, strict=True):
        if nonzero(b):
            assert relerr(a, b) <= 1e-10
        else:
            assert not nonzero(a)
    return g, g_ref


@pytest.mark.parametrize("kind", ["event-newton", "event-discrete", "steps-pid", "no-ts"])
def test_solution_times(kind):
    _compare(kind)


def test_solution_t1_and_ts():
    # SaveAt(ts=ts, t1=True): sol.ts is (ts, t1), with ts and t1 differentiated.
    g, g_ref = _compare("t1-ts")
    assert nonzero(g_ref[4]) and nonzero(g_ref[5])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["t1", "ts", "subs", "event-newton-ts", "t0-equals-t1"])
def test_solution_times_slow(kind):
    _compare(kind)
