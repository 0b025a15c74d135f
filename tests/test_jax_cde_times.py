"""SymplecticAdjoint against RecursiveCheckpointAdjoint for controlled terms and for the
times the step grid is built from (float64).

* Every term kind diffrax solves as an ODE/CDE -- ``ControlTerm`` over a
  ``CubicInterpolation`` / ``LinearInterpolation`` path, ``MultiTerm`` of an ``ODETerm``
  and a ``ControlTerm``, a diagonal ``ControlTerm`` (``lineax.DiagonalLinearOperator``,
  what ``WeaklyDiagonalControlTerm`` is now) -- with gradients with respect to the vector field's
  parameters, ``y0`` *and the control path's data* (which the stage VJPs differentiate
  through ``term.contr``).
* Gradients with respect to ``t0``, ``t1``, ``dt0`` and ``StepTo(ts=...)`` under
  ``ConstantStepSize``, ``StepTo`` and ``PIDController`` (with and without
  ``jump_ts``/``step_ts``, with ``dt0=None``), ``SaveAt(t1=True)`` and ``SaveAt(ts=...)``
  with ``ts`` a function of ``t0``/``t1``, under ``jit`` and ``vmap``.
"""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
diffrax = pytest.importorskip("diffrax")
eqx = pytest.importorskip("equinox")
lineax = pytest.importorskip("lineax")

import jax.numpy as jnp  # noqa: E402
from jax_support import Field, make_mlp, nonzero, norm, relerr  # noqa: E402

from symplectic_adjoint import SymplecticAdjoint  # noqa: E402

pytestmark = pytest.mark.jax

RCA = diffrax.RecursiveCheckpointAdjoint()
TSD = jnp.linspace(0.0, 1.0, 7)  # observation times of the control path
DATA = jnp.stack([jnp.sin(3 * TSD), jnp.cos(2 * TSD), TSD**2], -1)  # (7, 3) channels
Y0 = jnp.array([0.4, -0.3, 0.8])


class Matrix(eqx.Module):
    """A CDE vector field: (3,) -> (3, 3) matrix, non-autonomous."""

    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return jnp.tanh(self.mlp(y)).reshape(3, 3) * (1.0 + 0.2 * t)


def _terms(kind, mlp, data):
    cubic = diffrax.CubicInterpolation(TSD, diffrax.backward_hermite_coefficients(TSD, data))
    linear = diffrax.LinearInterpolation(TSD, data)
    if kind == "ode":
        return diffrax.ODETerm(Field(mlp))
    if kind == "cubic":
        return diffrax.ControlTerm(Matrix(_wide(mlp)), cubic)
    if kind == "linear":
        return diffrax.ControlTerm(Matrix(_wide(mlp)), linear)
    if kind == "multi":
        return diffrax.MultiTerm(
            diffrax.ODETerm(Field(mlp)), diffrax.ControlTerm(Matrix(_wide(mlp)), cubic)
        )
    if kind == "diagonal":
        # diffrax 0.7's replacement of the deprecated `WeaklyDiagonalControlTerm` (whose
        # shim closes over the vector field in a function, so its parameters cannot be
        # differentiated by a custom VJP; its control data and y0 can).
        return diffrax.ControlTerm(Diagonal(Field(mlp)), linear)
    raise AssertionError(kind)


class Diagonal(eqx.Module):
    field: Field

    def __call__(self, t, y, args):
        return lineax.DiagonalLinearOperator(self.field(t, y, args))


def _wide(mlp):
    # A (3,) -> (9,) network built from the shared one, so one set of parameters is
    # differentiated whatever the term kind.
    return eqx.nn.Sequential([mlp, eqx.nn.Lambda(lambda z: jnp.concatenate([z, z**2, -z]))])


@eqx.filter_jit
def _cde_grad(mlp, data, y0, *, kind, solver, adjoint):
    def loss(diff):
        mlp, data, y0 = diff
        sol = diffrax.diffeqsolve(
            _terms(kind, mlp, data), solver, 0.0, 1.0, 0.1, y0, 1.1,
            saveat=diffrax.SaveAt(ts=jnp.array([0.25, 0.6, 1.0])),
            adjoint=adjoint, max_steps=32,
        )  # fmt: skip
        return jnp.sum(sol.ys**2 + jnp.sin(sol.ys)), sol.ys

    return eqx.filter_value_and_grad(loss, has_aux=True)((mlp, data, y0))


# Unmarked: one case per term kind (the multi case holds a cubic path); the rest slow.
_SLOW = pytest.mark.slow
CDE_CASES = [
    pytest.param("cubic", diffrax.Heun(), marks=_SLOW, id="cubic-Heun"),
    pytest.param("cubic", diffrax.Dopri5(), marks=_SLOW, id="cubic-Dopri5"),
    pytest.param("linear", diffrax.Midpoint(), id="linear-Midpoint"),
    pytest.param("multi", diffrax.Ralston(), marks=_SLOW, id="multi-Ralston"),
    pytest.param("multi", diffrax.Bosh3(), id="multi-Bosh3"),
    pytest.param("diagonal", diffrax.Euler(), id="diagonal-Euler"),
    pytest.param("diagonal", diffrax.Dopri8(), marks=_SLOW, id="diagonal-Dopri8"),
]


@pytest.mark.parametrize("kind, solver", CDE_CASES)
def test_terms_and_control_data(kind, solver):
    mlp = make_mlp()
    common = dict(kind=kind, solver=solver)
    (val, ys), g = _cde_grad(mlp, DATA, Y0, adjoint=SymplecticAdjoint(), **common)
    (val_ref, ys_ref), g_ref = _cde_grad(mlp, DATA, Y0, adjoint=RCA, **common)
    assert jnp.array_equal(ys, ys_ref)
    for name, a, b in zip(("params", "data", "y0"), g, g_ref, strict=True):
        assert nonzero(b), name
        assert relerr(a, b) <= 1e-10, (name, relerr(a, b))


def _time_loss(adjoint, controller, saveat_kind, solver, use_dt0=True):
    mlp = make_mlp()

    def loss(t0, t1, dt0, y0):
        if saveat_kind == "ts":
            saveat = diffrax.SaveAt(ts=t0 + (t1 - t0) * jnp.array([0.2, 0.55, 1.0]))
        else:
            saveat = diffrax.SaveAt(t1=True)
        ctrl = controller
        if isinstance(controller, str):  # StepTo over a grid built from t0 and t1
            ctrl = diffrax.StepTo(ts=t0 + (t1 - t0) * jnp.array([0.0, 0.15, 0.4, 0.7, 1.0]))
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(Field(mlp)), solver, t0, t1, dt0 if use_dt0 else None, y0, 1.2,
            saveat=saveat, stepsize_controller=ctrl, adjoint=adjoint, max_steps=48,
        )  # fmt: skip
        return jnp.sum(sol.ys**2 + jnp.sin(sol.ys)), sol.stats["num_accepted_steps"]

    return loss


PID = diffrax.PIDController(rtol=1e-6, atol=1e-6)
PID_JUMPS = diffrax.PIDController(
    rtol=1e-6, atol=1e-6, jump_ts=jnp.array([0.5, 0.9]), step_ts=jnp.array([0.3])
)
# Unmarked: ConstantStepSize (t0, t1, dt0) and StepTo (its ts); PIDController with
# jump_ts/step_ts is covered unmarked by the vmap test below; the rest slow.
TIME_CASES = [
    pytest.param("constant", diffrax.ConstantStepSize(), "ts", diffrax.Tsit5(), True,
                 id="constant-ts-Tsit5"),
    pytest.param("stepto", "stepto", "ts", diffrax.Bosh3(), False, id="stepto-ts-Bosh3"),
    pytest.param("pid", PID, "ts", diffrax.Dopri5(), True, marks=_SLOW, id="pid-ts-Dopri5"),
    pytest.param("pid-dt0-none", PID, "t1", diffrax.Tsit5(), False, marks=_SLOW,
                 id="pid-dt0-none-t1-Tsit5"),
    pytest.param("pid-jumps", PID_JUMPS, "ts", diffrax.Tsit5(), True, marks=_SLOW,
                 id="pid-jumps-ts-Tsit5"),
]  # fmt: skip


@pytest.mark.parametrize("name, controller, saveat_kind, solver, use_dt0", TIME_CASES)
def test_time_gradients(name, controller, saveat_kind, solver, use_dt0):
    argnums = (0, 1, 2, 3) if use_dt0 else (0, 1, 3)
    x = (jnp.asarray(0.1), jnp.asarray(1.3), jnp.asarray(0.1), Y0)
    out = {}
    for key, adjoint in (("ours", SymplecticAdjoint()), ("ref", RCA)):
        loss = _time_loss(adjoint, controller, saveat_kind, solver, use_dt0)
        out[key] = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(*x)
    (val, n), g = out["ours"]
    (val_ref, n_ref), g_ref = out["ref"]
    assert int(n) == int(n_ref) >= 3
    assert abs(float(val - val_ref)) <= 1e-12 * abs(float(val_ref))
    # dt0 enters through the first step only (ConstantStepSize: its end; PID: the first
    # step size), so its gradient can be a near-cancellation: every component is held to
    # 1e-10 of the whole gradient's norm, and the whole to 1e-10 relative.
    scale = norm(g_ref)
    assert relerr(g, g_ref) <= 1e-10
    for i, (a, b) in enumerate(zip(g, g_ref, strict=True)):
        assert norm(jnp.asarray(a) - b) <= 1e-10 * scale, i
    for i in (0, 1, len(g) - 1):  # t0, t1, y0
        assert nonzero(g_ref[i]), i


@pytest.mark.slow  # two vmapped budget sweeps with time tangents: minutes to compile
def test_time_gradients_vmap():
    # Ragged adaptive step counts across the batch; grad-of-vmap and vmap-of-grad.
    t0s, t1s = jnp.array([0.0, 0.1, -0.2]), jnp.array([1.0, 1.5, 0.7])
    y0s = jnp.array([[0.4, -0.3, 0.8], [2.0, 1.0, -1.5], [0.0, 0.1, 0.0]])
    dt0 = jnp.asarray(0.1)

    def grads(adjoint):
        loss = _time_loss(adjoint, PID_JUMPS, "ts", diffrax.Tsit5())
        one = lambda a, b, y: loss(a, b, dt0, y)[0]  # noqa: E731
        vg = jax.jit(jax.vmap(jax.grad(one, argnums=(0, 1, 2))))(t0s, t1s, y0s)
        total = lambda a, b, y: jnp.sum(jax.vmap(one)(a, b, y))  # noqa: E731
        gv = jax.jit(jax.grad(total, argnums=(0, 1, 2)))(t0s, t1s, y0s)
        return vg, gv

    (vg, gv), (vg_ref, _) = grads(SymplecticAdjoint(checkpoint=2)), grads(RCA)
    assert relerr(vg, vg_ref) <= 1e-10
    assert relerr(gv, vg_ref) <= 1e-10
