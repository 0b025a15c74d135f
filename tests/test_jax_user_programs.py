"""Programs a diffrax user would write, SymplecticAdjoint against RecursiveCheckpointAdjoint.

float64: outputs to 1e-12, gradients to 1e-10 relative; or a clear refusal naming RCA.
"""

from __future__ import annotations

import functools as ft

import pytest

jax = pytest.importorskip("jax")
diffrax = pytest.importorskip("diffrax")
eqx = pytest.importorskip("equinox")
optx = pytest.importorskip("optimistix")

import jax.numpy as jnp  # noqa: E402
import jax.tree_util as jtu  # noqa: E402

from symplectic_adjoint import SymplecticAdjoint  # noqa: E402

pytestmark = pytest.mark.jax

jax.config.update("jax_enable_x64", True)

RCA = diffrax.RecursiveCheckpointAdjoint()
Y0 = jnp.array([0.5, -0.3])


def _rel(a, b):
    m = 0.0
    for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True):
        m = max(m, float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-300)))
    return m


def _agree(f, *xs, argnums=0):
    vr, gr = jax.value_and_grad(lambda *a: f(RCA, *a), argnums=argnums)(*xs)
    vs, gs = jax.value_and_grad(lambda *a: f(SymplecticAdjoint(), *a), argnums=argnums)(*xs)
    assert _rel(vs, vr) <= 1e-12
    assert _rel(gs, gr) <= 1e-10


def _osc(t, y, a):
    return jnp.array([y[1], -a * y[0]])


def _decay_closure(adj, y, c):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, a: -y * c),
        diffrax.Tsit5(),
        0.0,
        1.0,
        0.1,
        y,
        adjoint=adj,
        max_steps=16,
    )
    return jnp.sum(sol.ys**2)


# A plain-function vector field closing over arrays traced by an enclosing jit/vmap/grad:
# closure-converted, so the closed-over arrays are inputs of the custom VJP (it used to be
# refused; before that JAX crashed with "No constant handler for type: ...Tracer").
def test_closure_over_jit_traced_constant_matches_rca():
    c = jnp.array([1.0, 2.0])

    def grad_y0(adj):
        return jax.jit(lambda y, c: jax.grad(lambda y: _decay_closure(adj, y, c))(y))(Y0, c)

    assert _rel(grad_y0(SymplecticAdjoint()), grad_y0(RCA)) <= 1e-10


def test_closure_over_vmap_traced_constant_matches_rca():
    cs = jnp.array([[1.0, 2.0], [2.0, 4.0]])

    def grads(adj):
        return jax.vmap(lambda c: jax.grad(lambda y: _decay_closure(adj, y, c))(Y0))(cs)

    assert _rel(grads(SymplecticAdjoint()), grads(RCA)) <= 1e-10


@pytest.mark.parametrize(
    "checkpoint", ["states", pytest.param("stages", marks=pytest.mark.slow),
                   pytest.param(3, marks=pytest.mark.slow)],
)  # fmt: skip
def test_closure_differentiated_matches_rca(checkpoint):
    # The closed-over array itself differentiated, per example under vmap and summed
    # under grad of vmap, with a second (constant) closure left alone.
    W = jnp.array([[0.0, 1.0], [-1.0, -0.1]])
    shift = jnp.array([0.1, -0.2])

    def loss(adj, W):
        term = diffrax.ODETerm(lambda t, y, a: jnp.tanh(W @ y) + shift * t)
        sol = diffrax.diffeqsolve(term, diffrax.Tsit5(), 0.0, 1.0, 0.1, Y0, adjoint=adj,
                                  saveat=diffrax.SaveAt(ts=jnp.array([0.35, 1.0])),
                                  max_steps=16)  # fmt: skip
        return jnp.sum(sol.ys**2)

    ours = SymplecticAdjoint(checkpoint=checkpoint)
    assert _rel(jax.grad(ft.partial(loss, ours))(W), jax.grad(ft.partial(loss, RCA))(W)) <= 1e-10
    Ws = jnp.stack([W, 0.5 * W])
    per_example = [jax.vmap(jax.grad(ft.partial(loss, a)))(Ws) for a in (ours, RCA)]
    assert _rel(*per_example) <= 1e-10
    summed = [jax.grad(lambda Ws, a=a: jnp.sum(jax.vmap(ft.partial(loss, a))(Ws)))(Ws)
              for a in (ours, RCA)]  # fmt: skip
    assert _rel(*summed) <= 1e-10


def test_backward_time_pid_ts_int_args():
    def f(adj, y, k):
        a = {"k": k, "n": 3}
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, a: -a["k"] * y * a["n"] + jnp.cos(t)),
            diffrax.Tsit5(),
            1.0,
            0.0,
            -0.1,
            y,
            args=a,
            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
            saveat=diffrax.SaveAt(ts=jnp.array([0.8, 0.3, 0.0])),
            adjoint=adj,
            max_steps=64,
        )
        return jnp.sum(sol.ys**2)

    _agree(f, Y0, 0.7, argnums=(0, 1))


def test_root_event_threshold_in_args_grad_t0():
    def f(adj, y, a, t0):
        ev = diffrax.Event(
            lambda t, y, args, **kw: y[0] - args[1],
            root_finder=optx.Newton(rtol=1e-10, atol=1e-10),
        )
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, a: _osc(t, y, a[0])),
            diffrax.Dopri5(),
            t0,
            10.0,
            0.1,
            y,
            args=a,
            adjoint=adj,
            max_steps=64,
            event=ev,
            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
            saveat=diffrax.SaveAt(t0=True, t1=True),
        )
        return jnp.sum(sol.ys**2) + jnp.sum(sol.ts**2)

    _agree(f, jnp.array([1.0, 0.5]), jnp.array([1.0, 0.2]), 0.1, argnums=(0, 1, 2))


def test_tuple_state_dense_pid_jump_step_ts():
    def f(adj, y):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, a: (y[1], -y[0] - 0.1 * y[1] ** 3)),
            diffrax.Bosh3(),
            0.0,
            1.0,
            None,
            y,
            adjoint=adj,
            max_steps=64,
            stepsize_controller=diffrax.PIDController(
                rtol=1e-5, atol=1e-5, jump_ts=jnp.array([0.33]), step_ts=jnp.array([0.5])
            ),
            saveat=diffrax.SaveAt(dense=True),
        )
        return sol.evaluate(0.77)[0] ** 2 + sol.derivative(0.4)[1]

    _agree(f, (jnp.array(0.3), jnp.array(1.0)))


def test_implicit_grid_time_grad():
    # Formerly refused; the stage VJPs give the step ends' cotangents (a linear field:
    # Newton converges in one step, so both adjoints see the same stages exactly).
    def f(adj, t1):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, a: -10 * y),
            diffrax.ImplicitEuler(root_finder=optx.Newton(rtol=1e-10, atol=1e-10)),
            0.0,
            t1,
            0.1,
            Y0,
            adjoint=adj,
            max_steps=16,
        )
        return jnp.sum(sol.ys)

    _agree(f, jnp.asarray(1.0))


@pytest.mark.slow
def test_cubic_cde_budget_two():
    ts = jnp.linspace(0.0, 1.0, 5)

    def f(adj, data, y):
        if adj is not RCA:
            adj = SymplecticAdjoint(checkpoint=2)
        path = diffrax.CubicInterpolation(ts, diffrax.backward_hermite_coefficients(ts, data))
        term = diffrax.ControlTerm(
            lambda t, y, a: jnp.tanh(a * y)[:, None] * jnp.ones((2, 2)), path
        )
        sol = diffrax.diffeqsolve(
            term,
            diffrax.Tsit5(),
            0.0,
            1.0,
            None,
            y,
            args=jnp.array([1.0, 0.5]),
            adjoint=adj,
            max_steps=32,
            stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-5, jump_ts=ts),
        )
        return jnp.sum(sol.ys**2)

    _agree(f, jnp.stack([ts, jnp.sin(3 * ts)], -1), Y0, argnums=(0, 1))


def test_closure_over_differentiated_module_matches_rca():
    # `ODETerm(lambda t, y, a: model(y))` with `model` the input of eqx.filter_grad.
    model = eqx.nn.MLP(2, 2, 8, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))

    def loss(model, adj):
        term = diffrax.ODETerm(lambda t, y, a: model(y) * jnp.cos(t))
        sol = diffrax.diffeqsolve(term, diffrax.Tsit5(), 0.0, 1.0, 0.1, Y0, adjoint=adj,
                                  max_steps=16)  # fmt: skip
        return jnp.sum(sol.ys**2)

    grads = [eqx.filter_grad(loss)(model, adj) for adj in (SymplecticAdjoint(), RCA)]
    assert _rel(*grads) <= 1e-10


@pytest.mark.parametrize("root", [False, True])
def test_event_cond_closing_over_traced_array_refused_naming_args(root):
    # The event travels outside the custom VJP's inputs: JAX used to fail obscurely
    # ("No constant handler for type: ...Tracer" / CustomVJPException).
    def loss(y0, thr):
        if root:
            ev = diffrax.Event(lambda t, y, a, **kw: y[0] - thr, root_finder=optx.Newton(
                rtol=1e-10, atol=1e-10))  # fmt: skip
        else:
            ev = diffrax.Event(lambda t, y, a, **kw: y[0] < thr)
        sol = diffrax.diffeqsolve(diffrax.ODETerm(_osc), diffrax.Tsit5(), 0.0, 10.0, 0.1, y0,
                                  args=1.0, adjoint=SymplecticAdjoint(), max_steps=64,
                                  event=ev)  # fmt: skip
        return jnp.sum(sol.ys**2)

    with pytest.raises(TypeError, match="cond_fn.*args=.*RecursiveCheckpointAdjoint"):
        jax.jit(jax.grad(loss))(jnp.array([1.0, 0.5]), jnp.array(0.2))
