"""SymplecticAdjoint against RecursiveCheckpointAdjoint for ``SaveAt(fn=...)``,
``SaveAt(subs=...)`` and ``SaveAt(dense=True)`` (float64).

* ``fn``: the saved value is ``fn(t, y, args)`` of the state (interpolated for ``ts``);
  its VJP feeds the state's cotangent into the sweep, ``args`` and the save time.
* ``subs``: any PyTree of ``SubSaveAt``, each with its own ``t0/t1/ts/steps/fn``.
* ``dense``: ``sol.evaluate(t)`` and ``sol.derivative(t)`` differentiated with respect to
  ``y0``, ``args``, the vector field's parameters, ``t0``/``t1`` and the query time.
* terminating ``Event``s (boolean and real-valued ``cond_fn``), without and with a root
  finder (``optimistix.Newton``: the event time by root finding inside the last step).

Gradients with respect to the vector field's parameters, ``y0``, ``args`` and ``t0``,
``t1`` (output times built from them). The default cases compile one program pair
each; the wider sweep over solvers and controllers is marked ``slow``.
"""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
diffrax = pytest.importorskip("diffrax")
eqx = pytest.importorskip("equinox")

import jax.numpy as jnp  # noqa: E402
import jax.tree_util as jtu  # noqa: E402
from jax_support import make_problem, nonzero, relerr  # noqa: E402

from symplectic_adjoint import SymplecticAdjoint  # noqa: E402

pytestmark = pytest.mark.jax

RCA = diffrax.RecursiveCheckpointAdjoint()
FRACS = jnp.array([0.2, 0.55, 1.0])


def fn_t(t, y, args):
    """Reads t, y and args."""
    return jnp.sin(y) * (1.0 + t) * args[1]


def fn_tree(t, y, args):
    """A PyTree output."""
    return {"a": jnp.sum(y**2) * t, "b": y[:2] * args[1]}


def _saveat(kind, t0, t1):
    ts = t0 + (t1 - t0) * FRACS
    if kind == "fn":
        return diffrax.SaveAt(t0=True, t1=True, ts=ts, fn=fn_t)
    if kind == "fn-steps":
        return diffrax.SaveAt(t1=True, steps=True, fn=fn_tree)
    if kind == "subs":
        return diffrax.SaveAt(
            subs=[
                diffrax.SubSaveAt(t0=True, ts=ts, fn=fn_tree),
                {
                    "x": diffrax.SubSaveAt(steps=2, t1=True),
                    "y": diffrax.SubSaveAt(t1=True, ts=ts[:2], fn=fn_t),
                },
            ]
        )
    if kind == "dense":
        return diffrax.SaveAt(t1=True, dense=True)
    if kind == "all":  # everything at once: one compiled program pair
        return diffrax.SaveAt(
            subs=[
                diffrax.SubSaveAt(t0=True, ts=ts, fn=fn_t),
                {
                    "x": diffrax.SubSaveAt(steps=2, t1=True),
                    "y": diffrax.SubSaveAt(t1=True, fn=fn_tree),
                },
            ],
            dense=True,
        )
    raise AssertionError(kind)


def _finite(x):
    # Unwritten `steps` slots hold inf (the same for both adjoints).
    return jnp.where(jnp.isfinite(x), x, 0.0)


def _loss(adjoint, kind, solver, controller, max_steps=48):
    def loss(diff):
        field, y0, args, t0, t1 = diff
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field), solver, t0, t1, 0.1, y0, args,
            saveat=_saveat(kind, t0, t1), stepsize_controller=controller,
            adjoint=adjoint, max_steps=max_steps,
        )  # fmt: skip
        value = sum(jnp.sum(_finite(x) ** 2 + jnp.sin(_finite(x))) for x in jtu.tree_leaves(sol.ys))
        if kind in ("dense", "all"):
            # Query times inside the solve, at a step end, and tied to t0/t1.
            for t in (t0 + 0.05, jnp.asarray(0.4), 0.5 * (t0 + t1), t1 - 1e-3):
                value = value + jnp.sum(jnp.cos(sol.evaluate(t)))
                value = value + jnp.sum(sol.derivative(t) ** 2)
        return value

    return loss


def _compare(kind, solver, controller, checkpoint="states"):
    field, y0, args = make_problem()
    x = (field, y0, args, jnp.asarray(0.1), jnp.asarray(1.3))
    out = []
    for adjoint in (SymplecticAdjoint(checkpoint=checkpoint), RCA):
        f = eqx.filter_jit(eqx.filter_value_and_grad(_loss(adjoint, kind, solver, controller)))
        out.append(f(x))
    (v, g), (v_ref, g_ref) = out
    assert abs(float(v - v_ref)) <= 1e-12 * abs(float(v_ref))
    errs = {}
    for name, a, b in zip(("params", "y0", "args", "t0", "t1"), g, g_ref, strict=True):
        assert nonzero(b), name
        errs[name] = relerr(a, b)
    assert max(errs.values()) <= 1e-10, errs
    return errs


CONST = diffrax.ConstantStepSize()
PID = diffrax.PIDController(rtol=1e-5, atol=1e-5)


def test_saveat_fn_subs():
    # fn (reading t, y, args) and a PyTree of subs (t0, ts, steps=2, t1); Tsit5. Dense
    # output is covered unmarked by the vmap test, with t0/t1 in the slow sweep.
    _compare("subs", diffrax.Tsit5(), CONST)


SWEEP = [
    ("fn", diffrax.Tsit5(), PID, "states"),
    ("fn", diffrax.Bosh3(), PID, "stages"),
    ("fn", diffrax.Euler(), CONST, "states"),
    ("fn-steps", diffrax.Heun(), CONST, 3),
    ("fn-steps", diffrax.Dopri5(), PID, "states"),
    ("subs", diffrax.Euler(), CONST, "states"),
    ("subs", diffrax.Dopri5(), PID, 2),
    ("dense", diffrax.Dopri5(), PID, "states"),
    ("dense", diffrax.Heun(), CONST, "stages"),
    ("dense", diffrax.Euler(), CONST, 2),
    ("all", diffrax.Tsit5(), CONST, "states"),
    ("all", diffrax.Dopri5(), PID, "states"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, solver, controller, checkpoint",
    SWEEP,
    ids=[f"{k}-{type(s).__name__}-{type(c).__name__}-{p}" for k, s, c, p in SWEEP],
)
def test_saveat_sweep(kind, solver, controller, checkpoint):
    _compare(kind, solver, controller, checkpoint)


def test_saveat_vmap_dense_fn():
    # PID (ragged step counts across the batch), a checkpoint budget, fn at ts and
    # dense output; vmap of grad under jit, with the query time differentiated too.
    field, _, args = make_problem()
    y0s = jnp.array([[0.4, -0.3, 0.8], [2.0, 1.0, -1.5], [0.0, 0.1, 0.0]])
    tqs = jnp.array([0.3, 0.77, 1.1])

    def grads(adjoint):
        def loss(y0, tq, args):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(field), diffrax.Dopri5(), 0.0, 1.2, 0.1, y0, args,
                saveat=diffrax.SaveAt(ts=FRACS, fn=fn_t, dense=True),
                stepsize_controller=PID, adjoint=adjoint, max_steps=32,
            )  # fmt: skip
            return (
                jnp.sum(sol.ys**2)
                + jnp.sum(jnp.sin(sol.evaluate(tq)))
                + jnp.sum(sol.derivative(tq) ** 2)
            )

        @eqx.filter_jit
        def batched(d):
            return jax.vmap(eqx.filter_grad(lambda e: loss(*e)), in_axes=((0, 0, None),))(d)

        return batched((y0s, tqs, args))

    g, g_ref = grads(SymplecticAdjoint(checkpoint=2)), grads(RCA)
    for a, b in zip(g, g_ref, strict=True):
        assert nonzero(b)
        assert relerr(a, b) <= 1e-10


def _bool_event(t, y, args, **kwargs):
    return jnp.sum(y**2) > 1.3


def _real_event(t, y, args, **kwargs):
    return jnp.sum(y**2) - 1.3


def _newton():
    optx = pytest.importorskip("optimistix")
    return optx.Newton(rtol=1e-12, atol=1e-12)


def _real_event_args(t, y, args, **kwargs):
    return jnp.sum(y**2) - 1.3 * args[1]  # reads args: their gradient through t*


EVENTS = [
    pytest.param("bool", _bool_event, None, diffrax.Tsit5(), CONST, marks=pytest.mark.slow),
    pytest.param("real", _real_event, None, diffrax.Dopri5(), PID, marks=pytest.mark.slow),
    ("real-newton", _real_event_args, "newton", diffrax.Tsit5(), CONST),
    pytest.param(
        "bool-newton", _bool_event, "newton", diffrax.Dopri5(), PID, marks=pytest.mark.slow
    ),
    pytest.param(
        "real-newton-pid", _real_event, "newton", diffrax.Bosh3(), PID, marks=pytest.mark.slow
    ),
]


@pytest.mark.parametrize(
    "name, cond_fn, root_finder, solver, controller",
    EVENTS,
    ids=["bool", "real", "real-newton", "bool-newton", "real-newton-pid"],
)
def test_terminating_event(name, cond_fn, root_finder, solver, controller):
    # Without a root finder the solve stops at the end of the step where the event fired;
    # with one, at the root t* inside that step (the final value is the interpolant at
    # t*; t*'s gradient by the implicit function theorem, as RCA's through optimistix).
    field, y0, args = make_problem()
    x = (field, y0, args, jnp.asarray(0.1), jnp.asarray(1.3))
    event = diffrax.Event(cond_fn, root_finder=None if root_finder is None else _newton())
    out = []
    for adjoint in (SymplecticAdjoint(), RCA):

        def loss(diff, adjoint=adjoint):
            field, y0, args, t0, t1 = diff
            ts = t0 + (t1 - t0) * FRACS
            saveat = diffrax.SaveAt(
                subs=[diffrax.SubSaveAt(t1=True, ts=ts, fn=fn_t), diffrax.SubSaveAt(t1=True)]
            )
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(field), solver, t0, t1, 0.1, y0, args, saveat=saveat,
                stepsize_controller=controller, adjoint=adjoint, max_steps=48, event=event,
            )  # fmt: skip
            value = sum(jnp.sum(_finite(x) ** 2) for x in sol.ys)
            return value, (sol.ts[1][-1], sol.result == diffrax.RESULTS.event_occurred)

        f = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
        out.append(f(x))
    ((v, (t_end, fired)), g), ((v_ref, (t_end_ref, _)), g_ref) = out
    assert bool(fired) and float(t_end) < 1.3  # the event stopped the solve
    assert float(t_end) == float(t_end_ref)
    assert abs(float(v - v_ref)) <= 1e-12 * abs(float(v_ref))
    for a, b in zip(g, g_ref, strict=True):
        assert nonzero(b)
        assert relerr(a, b) <= 1e-10
